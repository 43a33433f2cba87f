"""`python -m elastic.bench.checkpoint`: how much longer the step during which a checkpoint is taken is than
a normal step, on one GPU (or CPU), printed as JSON.

One process, no Ray and no coordinator: a model of the preset (default gpt2-small) and its sync strategy
(a group of one) train on synthetic tokens; every `--every` steps (once the previous write is done) the step
starts with the worker's own checkpoint path: `state_trees` + `HostSnapshot` (the committed state copied to
pinned host memory, queued on the training stream) + `BackgroundWrites` (serialized and written by a thread
while the next steps run), then meta.json + COMMIT as the coordinator writes them. Reported: median normal
step, median checkpoint step, their difference, the steps that ran while a write was in flight, each write's
duration and bytes, and for reference the blocking path the coordinator used before (copy the state to host
synchronously, serialize, write, then train on), measured once. The last checkpoint is read back and compared
bit for bit with the state it was taken from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def bench(preset: str, overrides: list[str], steps: int, every: int, warmup: int, directory: str) -> dict:
    import torch

    from compression import build_sync
    from compression.communicator import ThreadCommunicator
    from elastic.bench.gpu import machine_name
    from elastic.checkpoint import (BackgroundWrites, CheckpointStore, HostSnapshot, checkpoint_layout,
                                    files_by_rank, state_trees, to_bytes)
    from elastic.config import load_config
    from elastic.model import build_model

    cfg = load_config(preset, ["train.workers=1"] + list(overrides))
    t = cfg.train
    cuda = torch.cuda.is_available() and t.device != "cpu"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    vocab = 50257
    model = build_model(cfg.model, vocab, cfg.run.seed).to(device)
    params = list(model.parameters())
    sync = build_sync(cfg.sync, params, ThreadCommunicator.group(1)[0])
    rows, micro = t.batch_tokens // t.seq_len, max(1, t.micro_batch_tokens // t.seq_len)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (rows, t.seq_len), generator=gen).to(device)
    y = torch.randint(0, vocab, (rows, t.seq_len), generator=gen).to(device)
    bf16 = t.dtype == "bfloat16" and cuda

    def train_step(step: int) -> None:
        for p in params:
            p.grad = None
        for i in range(0, rows, micro):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x[i:i + micro], y[i:i + micro])[1]
            (loss * (min(micro, rows - i) / rows)).backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        sync.exchange(lr=1e-4, weight=float(rows * t.seq_len), weight_decay=t.weight_decay, boundary=False)
        sync.commit()

    def wait_device() -> None:
        if cuda:
            torch.cuda.synchronize()

    replicated = cfg.sync.name in ("dense", "diloco")  # compression.sync.joiners_need_peer_state
    files = files_by_rank(1, replicated)[0]
    store = CheckpointStore(directory, keep=2)
    writes = BackgroundWrites("bench")
    # as a CUDA worker does at set-up (checkpoint.pin_ahead): its first checkpoint then pins nothing
    pin_ahead = cuda and cfg.checkpoint.pin_ahead
    t0 = time.perf_counter()
    pinned_bytes = writes.pinned.reserve(checkpoint_layout(model, sync)) if pin_ahead else 0
    pin_ahead_s = time.perf_counter() - t0
    rows_out, pending, written, parts, checks = [], [], [], [], []
    last_ckpt = -every
    for step in range(steps):
        in_flight = writes.in_flight() > 0
        take = step >= warmup and step - last_ckpt >= every and not in_flight and not pending
        wait_device()
        t0 = time.perf_counter()
        snapshot_s = None
        if take:
            version, uri = store.begin(step)
            trees = state_trees(files, model, sync)  # device tensors: the snapshot queues their copies
            t1 = time.perf_counter()
            snap = HostSnapshot(trees, clone_host=not cuda, pool=writes.pinned)
            writes.start(uri, snap)
            del trees
            snapshot_s = time.perf_counter() - t0
            parts.append({"state_dicts_ms": _r((t1 - t0) * 1e3), "staged_on_device": snap.staged,
                          "host_copy_queue_ms": _r((time.perf_counter() - t1) * 1e3)})
            pending.append((step, version, uri, time.perf_counter(), snap.bytes))
            last_ckpt = step
        train_step(step)
        wait_device()
        rows_out.append({"step": step, "ms": (time.perf_counter() - t0) * 1e3, "checkpoint": take,
                         "write_in_flight": in_flight and not take, "snapshot_ms": snapshot_s and snapshot_s * 1e3})
        for item in list(pending):  # commit finished writes as the coordinator does: between steps
            s, v, uri, started, nbytes = item
            if writes.in_flight() == 0:
                records = writes.result(uri, timeout=600)
                store.commit(s, v, {"step": s, "bench": True}, records)
                written.append({"step": s, "write_s": round(time.perf_counter() - started, 3),
                                "state_bytes": nbytes, "file_bytes": sum(r["bytes"] for r in records.values())})
                pending.remove(item)
    writes.wait_all(600)
    for s, v, uri, started, nbytes in pending:
        store.commit(s, v, {"step": s, "bench": True}, writes.result(uri, timeout=600))
    # what is written is the state the snapshot was taken of, bit for bit: through a cold pinned pool (the
    # device-staged path of a worker's first checkpoint) and through the warm pool the checkpoints above left
    wait_device()
    reference = HostSnapshot(state_trees(files, model, sync), clone_host=True)
    reference.wait()
    identical = True
    for check, w in ((1, BackgroundWrites("cold")), (2, writes)):
        version, uri = store.begin(steps + check)
        snap = HostSnapshot(state_trees(files, model, sync), clone_host=not cuda, pool=w.pinned)
        staged = snap.staged
        w.start(uri, snap)
        store.commit(steps + check, version, {"step": steps + check}, w.result(uri, timeout=600))
        ck = store.load_latest()
        ok = ck is not None and ck.step == steps + check and all(_equal(reference.trees[n], ck.tensor_file(n))
                                                                 for n in files)
        identical = identical and ok
        checks.append({"pool": "cold" if check == 1 else "warm", "staged_on_device": staged, "identical": ok})
    # the path the coordinator took before: state to host synchronously, serialized and written, then train
    wait_device()
    t0 = time.perf_counter()
    blob = {"model.pt": to_bytes({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})}
    for name, what in files.items():
        if what == "sync":
            blob[name] = to_bytes(sync.state_dict())
    CheckpointStore(os.path.join(directory, "blocking"), keep=1).write(steps, {"step": steps}, blob)
    blocking_s = time.perf_counter() - t0

    normal = [r["ms"] for r in rows_out[warmup:] if not r["checkpoint"] and not r["write_in_flight"]]
    taken = [r for r in rows_out if r["checkpoint"]]
    during = [r["ms"] for r in rows_out if r["write_in_flight"]]
    med = statistics.median
    # a normal step is one with no write in flight; when writes overlapped every step (a write longer than
    # --every steps), the steps during writes are the baseline instead (they include the writes' cost)
    normal_ms = med(normal) if normal else (med(during) if during else None)
    baseline = "no write in flight" if normal else "during writes"
    ckpt_ms = med(r["ms"] for r in taken) if taken else None
    worst_ms = max((r["ms"] for r in taken), default=None)
    return {
        "bench": "checkpoint", "machine": machine_name(), "preset": preset, "sync": cfg.sync.name,
        "device": str(device), "tokens_per_step": rows * t.seq_len, "steps": steps, "warmup": warmup,
        "normal_step_ms_median": _r(normal_ms), "normal_steps": len(normal), "normal_baseline": baseline,
        "checkpoint_step_ms_median": _r(ckpt_ms), "checkpoint_steps": len(taken),
        "checkpoint_step_extra_ms": _r(ckpt_ms - normal_ms) if taken and normal_ms else None,
        "worst_checkpoint_step_extra_ms": _r(worst_ms - normal_ms) if taken and normal_ms else None,
        "checkpoint_step_ms_each": [_r(r["ms"]) for r in taken],
        "snapshot_ms_each": [_r(r["snapshot_ms"]) for r in taken], "snapshot_parts": parts,
        "steps_during_write_ms_median": _r(med(during)) if during else None, "steps_during_write": len(during),
        "writes": written, "blocking_checkpoint_s": round(blocking_s, 3),
        "pin_ahead": pin_ahead, "pin_ahead_s": round(pin_ahead_s, 3), "pinned_ahead_bytes": pinned_bytes,
        "read_back_identical": identical, "read_back_checks": checks,
        "target_extra_ms": 1000, "target_met": bool(taken and normal_ms and worst_ms - normal_ms <= 1000),
    }


def _r(x):
    return None if x is None else round(x, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elastic.bench.checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="gpt2-small", help="preset name or YAML path (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=8, help="steps between checkpoints (each waits for the last write)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dir", default="", help="where checkpoints go (default: a temporary directory)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. sync.name=demo")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        res = bench(args.config, args.overrides, args.steps, args.every, args.warmup, args.dir or tmp)
    res["command"] = "python -m elastic.bench.checkpoint " + " ".join(argv if argv is not None else sys.argv[1:])
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(res, indent=1))
    return 0 if res["read_back_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
