"""`python -m elastic bench-gpu`: throughput of the full stack against the baseline a user would pick.

In one invocation, on one machine, for a model preset (default gpt2-small):
- `dense` and `demo` through the full stack: `elastic.driver.train` (coordinator + worker actors on Ray,
  ray.util.collective over NCCL on CUDA), read back from summary.json;
- `ddp`: plain torch DistributedDataParallel + fused AdamW, one process per GPU (torch.multiprocessing,
  NCCL process group; gloo on CPU), the same `elastic.model.GPT`, bf16 autocast, synthetic tokens, as many
  rows per GPU per step as the stack runs averaged (`--ddp-rows match`) or a fixed number, eager;
- `ddp-compiled`: the same with the model under `torch.compile` (static shapes, compiled then wrapped in DDP,
  as nanoGPT does), so the stack (`train.compile`: on for CUDA by default) is compared with like;
- `loop-compiled` (only for `--workers 1`): the plain single-process loop nanoGPT users run: `torch.compile`d
  model, fused AdamW, no process group at all.
Each stack row carries its ratio to every baseline measured in the same invocation (`ddp_tokens_per_s_ratio`,
`ddp_compiled_tokens_per_s_ratio`, `loop_compiled_tokens_per_s_ratio`).
Per config: steady-state tokens/s (steps after `--warmup`, from commit timestamps: everything between
steps counts, RPCs and the coordinator's own work included), median step ms and where it goes, MFU,
codec ms per step, bytes each worker sends per step and the ratio vs the model sent dense in bf16.

MFU = 6 * N * tokens/s / (peak bf16 dense FLOP/s per GPU * GPUs); reported for N = all parameters
(`mfu`; the tied embedding counted once: it is the lm_head matmul) and N = non-embedding parameters
(`mfu_nonembedding`; wte and wpe excluded). Attention's own FLOPs are not counted in either.
Optional extras: `profile` (one worker step outside Ray, timers + torch.profiler), `chaos` (a 2-worker
run with a worker killed mid-step, the replacement joining on its GPU) and a loss-vs-tokens plot.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from elastic.progress import json_only_stdout
from elastic.messages import StepCall
from elastic.summary import STEP_TIMING_COLS

PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


# ---- shared helpers ---------------------------------------------------------------------------------
def machine_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        if out.returncode == 0 and names:
            return f"{len(names)}x {names[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPUs"


def peak_flops(machine: str) -> float | None:
    for key, peak in PEAK_BF16_DENSE.items():
        if key in machine:
            return peak
    return None


def param_counts(model_section, tokenizer_vocab: int) -> dict:
    """Parameter counts of the preset's GPT, built on the meta device (no memory)."""
    import torch

    from elastic.model import build_model

    with torch.device("meta"):
        model = build_model(model_section, tokenizer_vocab, 0)
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    emb = model.wte.weight.numel() + model.wpe.weight.numel()
    return {"params": total, "params_nonembedding": total - emb, "vocab": model.shape.vocab_size}


def mfu(tokens_per_s: float | None, n_params: int, n_gpus: int, peak: float | None) -> float | None:
    if not tokens_per_s or not peak or n_gpus < 1:
        return None
    return round(6 * n_params * tokens_per_s / (peak * n_gpus), 4)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def steady_state(summary: dict, warmup: int) -> dict:
    """Throughput and per-phase medians over committed steps after the first `warmup` ones.

    tokens/s = tokens of steps warmup+1..last / (commit time of last - commit time of step `warmup`):
    all time between commits counts (coordinator control work, RPCs, the slowest worker)."""
    timing = [dict(zip(STEP_TIMING_COLS, row)) for row in summary.get("step_timing", [])]
    hist = summary.get("loss_history", [])
    cum = {row[0]: row[2] for row in hist}
    tokens = {}
    prev = None
    for row in hist:
        tokens[row[0]] = row[2] - (prev if prev is not None else 0)
        prev = row[2]
    steady = timing[warmup:]
    out = {"steps_measured": max(0, len(steady) - 1)}
    if len(steady) >= 2:
        span = steady[-1]["t"] - steady[0]["t"]
        toks = cum.get(steady[-1]["step"], 0) - cum.get(steady[0]["step"], 0)
        out["tokens_per_s"] = round(toks / span, 1) if span > 0 else None
        gaps = [(b["t"] - a["t"]) * 1e3 for a, b in zip(steady, steady[1:])]
        out["step_ms_between_commits_median"] = _median(gaps)
        out["step_ms_between_commits_mean"] = round(statistics.mean(gaps), 3)
        out["step_ms_between_commits_p90"] = round(sorted(gaps)[int(0.9 * (len(gaps) - 1))], 3)
        out["tokens_per_worker_step_mean"] = round(
            statistics.mean(tokens[r["step"]] for r in steady[1:]) / max(1, summary.get("_workers", 1)), 1)
    if steady:
        out["step_ms_median"] = _median(r["wall_s"] * 1e3 for r in steady)
        out["phases_ms_median"] = {
            "commit": _median(r.get("commit_s", 0.0) * 1e3 for r in steady),
            "read": _median(r["read_s"] * 1e3 for r in steady),
            "fwd_bwd": _median(r.get("fwd_bwd_s", 0.0) * 1e3 for r in steady),
            "commit_read_fwd_bwd": _median(r["compute_s"] * 1e3 for r in steady),
            "codec": _median(r["codec_ms"] for r in steady),
            "comm_incl_wait_for_peers": _median(r["comm_ms"] for r in steady),
            "worker_step": _median(r["step_s"] * 1e3 for r in steady),
            # of the worker's step, what ran before its call arrived (train.compute_ahead): hidden behind the
            # previous step's report, the coordinator's turn and this call
            "computed_ahead": _median(r.get("ahead_s", 0.0) * 1e3 for r in steady),
            # coordinator's wall (dispatch -> all reports back) minus the slowest worker's step from the call's
            # arrival on: Ray RPC cost
            "step_rpc_overhead": _median((r["wall_s"] - r["step_s"] + r.get("ahead_s", 0.0)) * 1e3 for r in steady),
            # the rest of the time between commits: the commit RPC (apply update + parameter fingerprint
            # on every worker) and the coordinator's bookkeeping/control before the next dispatch
            "commit_fingerprint_and_control": _median((b["t"] - a["t"] - b["wall_s"]) * 1e3
                                                      for a, b in zip(steady, steady[1:])),
        }
    return out


# ---- (a), (b): the full stack ---------------------------------------------------------------------------
def stack_bench(preset: str, sync: str, workers: int, steps: int, warmup: int, per_gpu_tokens: int,
                overrides: list[str], run_root: str, extra: list[str] = (), label: str = "") -> dict:
    from elastic.driver import train
    from elastic.config import load_config

    name = f"bench-gpu-{re.sub(r'[^A-Za-z0-9_.-]+', '-', label or sync)}-w{workers}-{int(time.time())}"
    ov = [f"sync.name={sync}", f"train.workers={workers}", f"train.steps={steps}",
          f"train.batch_tokens={per_gpu_tokens * workers}", "checkpoint.every=0", "train.eval_tokens=4096",
          f"run.name={name}", f"run.dir={run_root}"] + list(overrides) + list(extra)
    cfg = load_config(preset, ov)
    t0 = time.time()
    with json_only_stdout(True):
        summary = train(cfg, progress_stream=sys.stderr)
    summary["_workers"] = workers
    res = {"config": label or sync, "path": "ray actors + ray.util.collective "
           f"({'nccl' if cfg.train.device == 'cuda' else 'gloo'})", "workers": workers, "steps": summary.get("steps"),
           "state": summary.get("state"), "wall_s_total": round(time.time() - t0, 1),
           "compile": cfg.train.compile,
           "overrides": ov, "sync_config": {k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in vars(cfg.sync).items()}}
    res.update(steady_state(summary, warmup))
    sent = summary.get("bytes_sent_per_step_mean") or 0
    dense = summary.get("dense_equivalent_bytes_per_step") or 0
    received = summary.get("bytes_received_per_worker_total") or {}
    n_steps = summary.get("steps") or 0
    res.update(codec_ms_median=_round(summary.get("codec_ms_median"), 2),
               bytes_sent_per_worker_per_step=round(sent), dense_bf16_bytes=dense,
               # an all-gather receives (W-1) payloads: this grows with the group, unlike what a worker sends
               bytes_received_per_worker_per_step=round(statistics.mean(received.values()) / n_steps)
               if received and n_steps else None,
               ratio_vs_dense_bf16=round(dense / sent, 1) if sent else None,
               # per node and level (sync.hierarchy=node: compressed off the node, dense inside it)
               cross_node_bytes_per_step=_round(summary.get("cross_node_bytes_per_step"), 1),
               in_node_bytes_per_step=_round(summary.get("in_node_bytes_per_step"), 1),
               initial_loss=summary.get("initial_loss"), final_loss=summary.get("final_loss"),
               val_loss=summary.get("val_loss"), replica_hashes_agree=summary.get("replica_hashes_agree"),
               rebalanced_steps=summary.get("rebalanced_steps"), profiles=summary.get("profiles") or None,
               # target tokens per packed slot over the run (1.0: no padding; train.carry_tail with one worker)
               packing=_round(summary["tokens"] / (summary["rows"] * cfg.train.seq_len), 4)
               if summary.get("rows") else None,
               computed_ahead_steps=summary.get("computed_ahead_steps"),
               loss_history=summary.get("loss_history"), membership_changes=summary.get("membership_changes"),
               world_size_history=summary.get("world_size_history"), error=summary.get("error"),
               summary_path=os.path.join(run_root, name, "summary.json"))
    return res


def _round(x, n):
    return None if x is None else round(x, n)


# ---- (c): the baseline: torch DDP + fused AdamW ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, a: dict, result_path: str) -> None:
    """One rank of the baseline: DDP (`a["plain"]` false) or the plain single-process loop, eager or under
    torch.compile (`a["compile"]`)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from elastic.model import build_model

    cuda = a["device"] == "cuda"
    plain = a.get("plain", False)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, a.get("threads", 1)))
    if not plain:
        dist.init_process_group(a["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = build_model(SimpleNamespace(**a["model"]), a["tokenizer_vocab"], a["seed"]).to(dev)
        # static shapes (a fixed batch, as nanoGPT's loop): a graph per micro-batch size, the fastest code
        net = torch.compile(model, dynamic=False) if a.get("compile") else model
        ddp = net if plain else DDP(net, device_ids=[rank] if cuda else None, gradient_as_bucket_view=True)
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=a["lr"], betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        except (RuntimeError, ValueError):
            opt = torch.optim.AdamW(model.parameters(), lr=a["lr"], betas=(0.9, 0.95), weight_decay=0.1)
        g = torch.Generator().manual_seed(1000 + rank)
        rows, seq = a["rows"], a["seq_len"]
        batches = []
        for _ in range(4):
            b = torch.randint(0, a["tokenizer_vocab"], (rows, seq + 1), generator=g)
            xy = (b[:, :-1].contiguous(), b[:, 1:].contiguous())
            batches.append(tuple(t.pin_memory() for t in xy) if cuda else xy)
        use_bf16 = cuda and a["bf16"]
        times, losses = [], []
        for i in range(a["steps"]):
            t0 = time.perf_counter()
            xb, yb = batches[i % len(batches)]
            x = xb.to(dev, non_blocking=True)
            y = yb.to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            # gradient accumulation over micro-batches of `micro_rows` rows, as the stack's workers do;
            # DDP all-reduces during the last one's backward only (no_sync for the others)
            micro = max(1, a.get("micro_rows") or rows)
            starts = list(range(0, rows, micro))
            for j in starts:
                sync_now = plain or j == starts[-1]
                with (contextlib.nullcontext() if sync_now else ddp.no_sync()), \
                        torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = ddp(x[j:j + micro], y[j:j + micro])[1]
                (loss * (min(micro, rows - j) / rows)).backward()
            if a["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a["grad_clip"])
            opt.step()
            losses.append(float(loss))  # one host sync per step, as a training loop that logs loss has
            if cuda:
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        all_times = [times]
        if not plain:
            all_times = [None] * world
            dist.all_gather_object(all_times, times)
        if rank == 0:
            step_s = [max(ts[i] for ts in all_times) for i in range(a["steps"])]
            with open(result_path, "w") as f:
                json.dump({"step_s": step_s, "losses": losses,
                           "params": sum(p.numel() for p in model.parameters())}, f)
    finally:
        if not plain:
            dist.destroy_process_group()


def baseline_name(compiled: bool, plain: bool) -> str:
    """The config name of a baseline row: ddp, ddp-compiled, loop, loop-compiled."""
    return ("loop" if plain else "ddp") + ("-compiled" if compiled else "")


def ddp_bench(world: int, steps: int, warmup: int, rows: int, seq_len: int, model: dict, tokenizer_vocab: int,
              device: str = "cuda", lr: float = 6e-4, grad_clip: float = 1.0, bf16: bool = True,
              seed: int = 0, threads: int = 1, micro_rows: int = 0, compiled: bool = False,
              plain: bool = False) -> dict:
    """Plain DDP + fused AdamW, `world` processes (one per GPU), `rows` x `seq_len` tokens per GPU per step,
    in micro-batches of `micro_rows` rows (0: one). `compiled`: the model under torch.compile (static
    shapes); the compile happens in the first steps, which `warmup` excludes. `plain`: no DDP and no process
    group, one process (what a single-GPU nanoGPT run is; needs `world` 1)."""
    import torch.multiprocessing as mp

    if plain and world != 1:
        raise ValueError(f"the plain loop runs in one process; world={world}")
    backend = "nccl" if device == "cuda" else "gloo"
    a = {"device": device, "backend": backend, "model": dict(model), "tokenizer_vocab": tokenizer_vocab,
         "seed": seed, "rows": rows, "seq_len": seq_len, "steps": steps, "lr": lr, "grad_clip": grad_clip,
         "bf16": bf16, "threads": threads, "micro_rows": micro_rows, "compile": compiled, "plain": plain}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        path = os.path.join(tmp, "result.json")
        t0 = time.time()
        mp.start_processes(_ddp_worker, args=(world, _free_port(), a, path), nprocs=world, join=True,
                           start_method="spawn")
        with open(path) as f:
            r = json.load(f)
    steady = r["step_s"][warmup:] or r["step_s"]
    tok_step = world * rows * seq_len
    numel = r["params"]
    ring = int(2 * (world - 1) / world * numel * 4)  # DDP all-reduces fp32 gradients (ring: 2(W-1)/W x size)
    path = ("one process, no process group" if plain else f"torch DDP ({backend}), torch.multiprocessing") + \
        (" + torch.compile (static shapes)" if compiled else ", eager") + " + fused AdamW"
    return {"config": baseline_name(compiled, plain), "path": path, "workers": world, "compiled": compiled,
            "steps": steps, "steps_measured": len(steady), "rows_per_gpu": rows, "seq_len": seq_len,
            "micro_batch_rows": micro_rows or rows,
            "tokens_per_worker_step_mean": rows * seq_len,
            "tokens_per_s": round(tok_step * len(steady) / sum(steady), 1),
            "step_ms_median": round(statistics.median(steady) * 1e3, 3),
            "codec_ms_median": 0.0, "bytes_sent_per_worker_per_step": ring,
            "bytes_received_per_worker_per_step": ring, "dense_bf16_bytes": numel * 2,
            "ratio_vs_dense_bf16": round(numel * 2 / ring, 2) if ring else None,
            "final_loss": round(r["losses"][-1], 5), "wall_s_total": round(time.time() - t0, 1),
            "data": "synthetic uniform tokens"}


# the baselines bench-gpu can run: (config name, under torch.compile, plain single-process loop)
BASELINES = (("ddp", False, False), ("ddp-compiled", True, False), ("loop-compiled", True, True))


# ---- profile: one worker step outside Ray -----------------------------------------------------------------
def _profile_worker(rank: int, cfg, steps: int, per_gpu_tokens: int, result_path: str) -> None:
    import torch

    from compression.communicator import ThreadCommunicator
    from datasets import DataPlan, discover
    from elastic.fingerprint import params_fingerprint
    from elastic.worker import WorkerReplica

    d = cfg.data
    shards = discover(d.source, d.storage_options, text_column=d.text_column)
    rep = WorkerReplica(cfg, "profile", shards, cfg.run.seed)
    rep.join_local(ThreadCommunicator.group(1)[0])  # a group of one in this process: no Ray
    plan = DataPlan(shards, seed=d.seed, epoch=0)
    cuda = rep.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for step in range(steps):
        ranges = plan.assign(step, {0: per_gpu_tokens})[0]
        t0 = time.perf_counter()
        rep_ = rep.step(StepCall(step, ranges, 1e-4))
        t1 = time.perf_counter()
        rep.commit(step)
        sync()
        t2 = time.perf_counter()
        params_fingerprint(rep.params)
        sync()
        t3 = time.perf_counter()
        plan.commit(step)
        rows.append({"tokens": rep_.tokens, "step_ms": (t1 - t0) * 1e3, "read_ms": rep_.read_s * 1e3,
                     "read_fwd_bwd_ms": rep_.compute_s * 1e3, "codec_ms": rep_.codec_ms,
                     "commit_incl_fingerprint_ms": (t2 - t1) * 1e3, "fingerprint_ms": (t3 - t2) * 1e3})
    warm = rows[2:] or rows
    out = {k: round(statistics.median(r[k] for r in warm), 2) for k in warm[0]}
    table = ""
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for step in range(steps, steps + 3):
                ranges = plan.assign(step, {0: per_gpu_tokens})[0]
                rep.step(StepCall(step, ranges, 1e-4))
                rep.commit(step)
                plan.commit(step)
            sync()
            wall = time.perf_counter() - t0
        from elastic.profiling import summarize

        ka = prof.key_averages()
        prof_summary = summarize(prof.events(), 3, wall, cuda=True)  # what train.profile_at reports too
        out["profiled_steps"] = 3
        out["profiled_wall_ms_per_step"] = prof_summary["wall_ms_per_step"]
        out["gpu_kernel_ms_per_step"] = prof_summary["gpu_kernel_ms_per_step"]
        out["gpu_busy_fraction"] = prof_summary["gpu_busy_fraction"]
        out["profile"] = prof_summary
        table = ka.table(sort_by="self_device_time_total", row_limit=25)
        table += "\n" + ka.table(sort_by="self_cpu_time_total", row_limit=15)
    with open(result_path, "w") as f:
        json.dump({"timers": out, "table": table}, f)


def profile_bench(preset: str, sync: str, steps: int, per_gpu_tokens: int, overrides: list[str]) -> dict:
    import torch.multiprocessing as mp

    from elastic.config import load_config

    cfg = load_config(preset, [f"sync.name={sync}", "train.workers=1"] + list(overrides))
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        path = os.path.join(tmp, "r.json")
        mp.start_processes(_profile_worker, args=(cfg, steps, per_gpu_tokens, path), nprocs=1, join=True,
                           start_method="spawn")
        with open(path) as f:
            r = json.load(f)
    return {"config": f"profile-{sync}", "path": "WorkerReplica.step + commit in one process (no Ray), 1 GPU",
            **r["timers"], "table": r["table"]}


# ---- plot ---------------------------------------------------------------------------------------------------
def plot_loss(runs: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        h = r.get("loss_history") or []
        if h:
            ax.plot([x[2] / 1e6 for x in h], [x[1] for x in h],
                    label=f"{r['config']} ({r['workers']} GPUs, {_human(r.get('bytes_sent_per_worker_per_step'))}/step)")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(runs[0].get("_plot_title", "dense vs demo"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _human(n) -> str:
    if not n:
        return "0 B"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


# ---- the command ---------------------------------------------------------------------------------------------
def worker_counts(spec, device_count: int) -> list[int]:
    """`--workers`: '' or 0 -> all visible GPUs (2 on CPU); N; or a comma list '1,2,4' (a scaling sweep)."""
    text = str(spec or "").strip()
    if text in ("", "0"):
        return [device_count or 2]
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"bench-gpu: --workers {text!r}: expected a number or a comma list such as 1,2,4") from None
    if not counts or any(c < 1 for c in counts):
        raise SystemExit(f"bench-gpu: --workers {text!r}: every count must be >= 1")
    if device_count and max(counts) > device_count:
        raise SystemExit(f"bench-gpu: --workers {text!r} asks for {max(counts)} GPUs but {device_count} are visible")
    return sorted(set(counts))


def scaling(runs: list[dict]) -> dict:
    """Per config: tokens/s at each worker count and the weak-scaling efficiency against the fewest workers
    measured: (tokens/s at W / W) / (tokens/s at W0 / W0)."""
    out: dict = {}
    for r in runs:
        if r.get("tokens_per_s") and not r.get("error") and r.get("config") in ("dense", "demo", "ddp", "ddp-compiled") \
                and r.get("rows_rule", "match") == "match":
            out.setdefault(r["config"], {})[r["workers"]] = r["tokens_per_s"]
    table = {}
    for config, by_w in out.items():
        w0 = min(by_w)
        base = by_w[w0] / w0
        table[config] = {str(w): {"tokens_per_s": tps, "scaling_efficiency": round(tps / w / base, 3),
                                  "vs_workers": w0} for w, tps in sorted(by_w.items())}
    return table


def run(args) -> dict:
    import torch

    from datasets import get_tokenizer
    from elastic.config import load_config

    machine = machine_name()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"  # cuda.is_available: no context made
    counts_w = worker_counts(args.workers, torch.cuda.device_count() if device == "cuda" else 0)
    overrides = list(args.overrides)
    if device == "cpu":
        overrides = ["train.device=cpu", "train.dtype=float32"] + overrides
    base = load_config(args.preset, overrides)
    tok_vocab = get_tokenizer(base.data.tokenizer).vocab_size
    counts = param_counts(base.model, tok_vocab)
    peak = peak_flops(machine) if device == "cuda" else None
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "torch": torch.__version__, "preset": args.preset,
              "workers": counts_w[0] if len(counts_w) == 1 else counts_w, "device": device,
              "steps": args.steps, "warmup_steps_excluded": args.warmup, "per_gpu_tokens_requested": args.per_gpu_tokens,
              **counts, "peak_flops_per_gpu": peak,
              "mfu_definition": "6*N*tokens/s / (peak bf16 dense per GPU * GPUs); mfu: N = all params (tied "
                                "embedding once), mfu_nonembedding: N without wte/wpe; attention FLOPs not counted",
              "runs": []}
    run_root = args.run_dir or tempfile.mkdtemp(prefix="bench-gpu-runs-")
    configs = [c for c in args.configs.split(",") if c]

    def save() -> None:
        if len(counts_w) > 1:
            result["scaling"] = scaling(result["runs"])
        if args.out:  # partial results survive a later failure
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    def add(r: dict) -> None:
        tps = r.get("tokens_per_s")
        n_gpus = r.get("workers", 1) if device == "cuda" else 0
        r["mfu"] = mfu(tps, counts["params"], n_gpus, peak)
        r["mfu_nonembedding"] = mfu(tps, counts["params_nonembedding"], n_gpus, peak)
        result["runs"].append(r)
        save()
        print(f"bench-gpu: {r['config']} w{r.get('workers')}: tokens/s {tps} step ms {r.get('step_ms_median')} "
              f"mfu {r['mfu']} sent {r.get('bytes_sent_per_worker_per_step')} B", file=sys.stderr, flush=True)

    all_stack = []
    for workers in counts_w:
        stack_runs = []
        # a stack config is dense or demo, optionally with its own overrides: demo:train.compute_ahead=false
        for spec in [c for c in configs if c.split(":")[0] in ("dense", "demo")]:
            sync, *extra = spec.split(":")
            try:
                r = stack_bench(args.preset, sync, workers, args.steps, args.warmup, args.per_gpu_tokens,
                                overrides, run_root, extra=extra, label=spec)
            except Exception as e:  # keep going: the other configs still say something
                r = {"config": spec, "workers": workers, "error": f"{type(e).__name__}: {e}"}
            stack_runs.append(r)
            add(r)
        matched = {}  # baseline config -> its row at the stack's tokens per worker
        seq = base.train.seq_len
        means = [r["tokens_per_worker_step_mean"] for r in stack_runs if r.get("tokens_per_worker_step_mean")]
        for name, compiled, plain in BASELINES:
            if name not in configs or (plain and workers != 1):
                continue
            for spec in str(args.ddp_rows).split(","):
                rows = math.ceil(statistics.mean(means) / seq) if spec == "match" and means else (
                    max(1, args.per_gpu_tokens // seq) if spec == "match" else int(spec))
                try:
                    r = ddp_bench(workers, args.steps, args.warmup, rows, seq, vars(base.model).copy(), tok_vocab,
                                  device=device, lr=base.train.lr, grad_clip=base.train.grad_clip,
                                  bf16=base.train.dtype == "bfloat16", seed=base.run.seed,
                                  micro_rows=max(1, base.train.micro_batch_tokens // seq), compiled=compiled,
                                  plain=plain)
                    r["rows_rule"] = spec
                except Exception as e:
                    r = {"config": name, "workers": workers, "error": f"{type(e).__name__}: {e}"}
                if spec == "match" and r.get("tokens_per_s"):
                    matched[name] = r
                add(r)
        ddp = matched.get("ddp")
        for r in stack_runs:
            r["ddp_tokens_per_s_ratio"] = None
            for name, base_row in matched.items():  # e.g. loop_compiled_tokens_per_s_ratio
                if r.get("tokens_per_s"):
                    r[f"{name.replace('-', '_')}_tokens_per_s_ratio"] = round(
                        r["tokens_per_s"] / base_row["tokens_per_s"], 3)
            if ddp and r.get("tokens_per_s"):
                r["bytes_ratio_vs_ddp"] = round(ddp["bytes_sent_per_worker_per_step"] /
                                                r["bytes_sent_per_worker_per_step"], 1) \
                    if r.get("bytes_sent_per_worker_per_step") and ddp["bytes_sent_per_worker_per_step"] else None
        all_stack += stack_runs
    workers = counts_w[-1]
    if "profile" in configs:
        for sync in ("dense", "demo"):
            try:
                r = profile_bench(args.preset, sync, max(6, min(args.steps, 12)), args.per_gpu_tokens, overrides)
                r["workers"] = 1
            except Exception as e:
                r = {"config": f"profile-{sync}", "workers": 1, "error": f"{type(e).__name__}: {e}"}
            table = r.pop("table", "")
            if args.out and table:
                with open(os.path.splitext(args.out)[0] + f"-profile-{sync}.txt", "w") as f:
                    f.write(table)
            result["runs"].append(r)
    if "chaos" in configs and workers >= 2:
        try:
            r = stack_bench(args.preset, args.chaos_sync, workers, args.chaos_steps, args.warmup, args.per_gpu_tokens,
                            overrides, run_root, extra=[f"chaos.kill_at=[{args.chaos_kill_at}]"],
                            label=f"chaos-kill-{args.chaos_sync}")
            r["recovered"] = (r.get("state") == "FINISHED" and r.get("steps") == args.chaos_steps
                              and bool(r.get("membership_changes")))
        except Exception as e:
            r = {"config": f"chaos-kill-{args.chaos_sync}", "workers": workers, "error": f"{type(e).__name__}: {e}"}
        add(r)
    plotted = [r for r in all_stack if r.get("loss_history") and r.get("workers") == workers]
    if args.plot and plotted:
        plotted[0]["_plot_title"] = f"{args.preset}, {workers} workers, {machine}"
        try:
            result["plot"] = plot_loss(plotted, args.plot)
        except Exception as e:  # the figures matter more than the picture
            result["plot"] = f"failed: {type(e).__name__}: {e}"
        plotted[0].pop("_plot_title", None)
    if not args.keep_runs and not args.run_dir:
        shutil.rmtree(run_root, ignore_errors=True)
    save()
    return result


RECORD_SECTION = "elastic bench-gpu: recorded runs (`python -m elastic bench-gpu ... --record`)"


def command_line(args) -> str:
    """The bench-gpu command that reproduces `args` (what a recorded row names)."""
    parts = ["python -m elastic bench-gpu", f"--workers {args.workers}" if args.workers else "",
             f"--steps {args.steps} --warmup {args.warmup} --per-gpu-tokens {args.per_gpu_tokens}",
             f"--configs {args.configs}", f"--ddp-rows {args.ddp_rows}" if set(args.configs.split(",")) & {b[0] for b in BASELINES} else "",
             f"--preset {args.preset}" if args.preset != "gpt2-small" else "", "--cpu" if args.cpu else ""]
    return " ".join(p for p in parts + list(args.overrides) if p)


def record_text(res: dict) -> str:
    """One BENCHMARKS.md result cell: every run's tokens/s (and ratio to DDP), bytes, then the scaling."""
    parts = []
    for r in res["runs"]:
        head = f"{r.get('config')} w{r.get('workers')}"
        if r.get("error"):
            parts.append(f"{head}: error {str(r['error']).splitlines()[0][:120]}")
            continue
        if not r.get("tokens_per_s"):
            continue
        text = f"{head} {r['tokens_per_s']:,.0f} tokens/s"
        if r.get("ddp_tokens_per_s_ratio"):
            text += f" = **{r['ddp_tokens_per_s_ratio']:.3f}x DDP**"
        for key, what in (("ddp_compiled_tokens_per_s_ratio", "compiled DDP"),
                          ("loop_compiled_tokens_per_s_ratio", "compiled loop")):
            if r.get(key):
                text += f" = **{r[key]:.3f}x {what}**"
        if r.get("bytes_sent_per_worker_per_step") is not None:
            text += f", {r['bytes_sent_per_worker_per_step']:,} B sent/worker/step"
        if r.get("mfu"):
            text += f", MFU {r['mfu']:.3f}"
        parts.append(text)
    for config, by_w in (res.get("scaling") or {}).items():
        parts.append(f"{config} scaling efficiency " + ", ".join(
            f"{w} GPUs {v['scaling_efficiency']}" for w, v in by_w.items()))
    return "; ".join(parts) + f" (torch {res.get('torch')}, {res.get('date')})"


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench-gpu", help="tokens/s, MFU and bytes: dense and demo on the full stack vs torch DDP")
    b.add_argument("--json", action="store_true", help="print the result as JSON (default: a table)")
    b.add_argument("--preset", "--config", dest="preset", default="gpt2-small")
    b.add_argument("--steps", type=int, default=60)
    b.add_argument("--warmup", type=int, default=10, help="leading steps excluded from the figures")
    b.add_argument("--workers", default="", help="GPUs per run (default: all visible), or a comma list such as "
                                                 "1,2,4 for a scaling sweep (efficiency in the JSON's 'scaling')")
    b.add_argument("--per-gpu-tokens", type=int, default=8192, help="train.batch_tokens = this x workers")
    b.add_argument("--ddp-rows", default="match",
                   help="rows per GPU for DDP: 'match' (the stack runs' mean tokens per worker) or N, comma list")
    b.add_argument("--configs", default="dense,demo,ddp,ddp-compiled,loop-compiled",
                   help="any of dense,demo,ddp,ddp-compiled,loop-compiled (--workers 1 only),profile,chaos; a stack "
                        "config may carry its own overrides after colons (demo:train.compute_ahead=false), so "
                        "variants are measured in one call against the same baselines")
    b.add_argument("--chaos-sync", default="demo")
    b.add_argument("--chaos-steps", type=int, default=40)
    b.add_argument("--chaos-kill-at", type=int, default=20)
    b.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is visible (smoke tests)")
    b.add_argument("--out", default="", help="also write the JSON here (updated after every config)")
    b.add_argument("--plot", default="", help="PNG of loss vs tokens of the stack runs")
    b.add_argument("--run-dir", default="", help="keep run directories here (default: a temp dir, removed)")
    b.add_argument("--keep-runs", action="store_true")
    b.add_argument("--record", action="store_true", help="append a row (command, machine, results) to "
                                                         "docs/BENCHMARKS.md")
    b.add_argument("overrides", nargs="*", help="key=value run-config overrides for the stack runs")
    return b


def main(args) -> int:
    with json_only_stdout(args.json):
        res = run(args)
    if args.record:
        from elastic.bench.runs import append_row

        append_row(RECORD_SECTION, command_line(args), record_text(res))
    if args.json:
        slim = dict(res)
        slim["runs"] = [{k: v for k, v in r.items() if k not in ("loss_history", "overrides")} for r in res["runs"]]
        print(json.dumps(slim, indent=1, default=str))
    else:
        for r in res["runs"]:
            print(f"{r.get('config'):>16} w{r.get('workers')} tokens/s {r.get('tokens_per_s')} "
                  f"step ms {r.get('step_ms_median')} mfu {r.get('mfu')} codec ms {r.get('codec_ms_median')} "
                  f"sent/worker/step {r.get('bytes_sent_per_worker_per_step')} ratio {r.get('ratio_vs_dense_bf16')}"
                  + (f" error {r['error']}" if r.get("error") else ""))
    return 0 if all(not r.get("error") for r in res["runs"]) else 1
