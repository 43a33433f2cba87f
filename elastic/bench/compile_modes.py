"""`python -m elastic.bench.compile_modes`: one micro-batch's forward + backward under the compile modes a worker
could use, alone and beside a Python thread that takes the GIL in bursts (as an actor's helper threads do).

Why: at 8k tokens per GPU a gpt2-small step launches its kernels about as fast as the GPU runs them, so the
host's share of the GIL decides the step time. Rows (median ms per fwd+bwd, after `--warmup`):
- `static`: `torch.compile(model, dynamic=False)`, as the bench's compiled loop;
- `dynamic`: `elastic.model.CompiledLoss` (the batch dimension dynamic: what workers run, `train.compile`);
- `reduce_overhead`: `torch.compile(mode="reduce-overhead")`, static shapes: the step replayed as CUDA graphs;
- each `*_busy_thread`: the same with a thread that runs ~20k Python additions, sleeps 0.5 ms, repeats.
Prints one JSON object. CUDA only (on CPU the question does not arise: the host does the work itself).
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time


def _time(step, steps: int, warmup: int, busy: bool) -> float:
    import torch

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            s = 0
            for i in range(20000):
                s += i
            time.sleep(0.0005)

    thread = threading.Thread(target=spin, daemon=True) if busy else None
    if thread:
        thread.start()
    try:
        ms = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        stop.set()
    return round(statistics.median(ms[warmup:]), 2)


def main(argv: list[str] | None = None) -> dict:
    import torch

    from elastic.config import load_config
    from elastic.model import CompiledLoss, build_model

    ap = argparse.ArgumentParser(prog="python -m elastic.bench.compile_modes", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="gpt2-small")
    ap.add_argument("--rows", type=int, default=8, help="rows of train.seq_len tokens per micro-batch")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("compile_modes: needs a CUDA device")
    cfg = load_config(a.config, [])
    dev, seq, vocab = torch.device("cuda"), cfg.train.seq_len, 50257
    model = build_model(cfg.model, vocab, 0).to(dev)
    b = torch.randint(0, vocab, (a.rows, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = b[:, :-1].contiguous().to(dev), b[:, 1:].contiguous().to(dev)

    def stepper(loss_fn):
        def step():
            for p in model.parameters():
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(x, y)
            loss.backward()
            float(loss.detach())  # the step's one host sync, as a worker's loss read
        return step

    static = torch.compile(model, dynamic=False)
    dynamic = CompiledLoss(model, name=a.config)
    dynamic.warm_up(a.rows, seq, vocab, dev, True)
    graphed = torch.compile(lambda xx, yy: model(xx, yy)[1], mode="reduce-overhead", dynamic=False)

    def replayed(xx, yy):
        torch.compiler.cudagraph_mark_step_begin()
        return graphed(xx, yy)

    res = {"config": a.config, "rows": a.rows, "seq_len": seq, "machine": torch.cuda.get_device_name(dev),
           "torch": torch.__version__, "steps": a.steps, "warmup": a.warmup, "ms_per_fwd_bwd_median": {}}
    for name, fn in (("static", lambda xx, yy: static(xx, yy)[1]), ("dynamic", dynamic),
                     ("reduce_overhead", replayed)):
        for busy in (False, True):
            res["ms_per_fwd_bwd_median"][name + ("_busy_thread" if busy else "")] = \
                _time(stepper(fn), a.steps, a.warmup, busy)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
