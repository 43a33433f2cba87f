"""`python -m elastic bench-converge-gpu`: the convergence study of dense vs demo on ONE device, without Ray.

W ranks are simulated in one process, each a thread (`compression.run_threads`) with its own model replica,
its own slice of every step's rows, its own momentum / error feedback / AdamW state, and the real
`compression.build_sync` objects exchanging through a `ThreadCommunicator` (the same payload bytes, the same
validation and decode as on a cluster). So the math is that of W GPUs; only the clock is not (the ranks share
one GPU, so wall time is not a throughput figure).

Why threads and not a sequential simulation: `Sync.exchange` blocks inside the collective, so a sequential
driver would have to split every strategy's exchange in two; threads run the unmodified code path. On one
GPU the threads' kernels queue on the same device and run one after another anyway (the GPU is the
bottleneck, not the GIL: gpt2-small at 16k tokens per step is ~60 ms of kernels against a few ms of launches).

What it does per run (a `--runs` entry at each `--workers` count), on a FineWeb-format parquet corpus
(`python -m datasets prepare-sample --corpus ...`):
- tokens: the train split's documents in file order, GPT-2 BPE, an EOT after each (cached next to the parquet
  as `.tokens-gpt2-<digest>.npy`, so a machine without the tokenizer can run from a carried cache);
- step s trains on B = batch_tokens / seq_len windows of seq_len + 1 tokens (stride seq_len), drawn from a
  seeded permutation of all windows (a new one per epoch): the same rows for every run and every W; rank r
  of W gets rows [r B/W, (r+1) B/W). Equal tokens by construction;
- the trainer's recipe (elastic.worker): lr `elastic.schedule.lr_at`, micro-batches of
  train.micro_batch_tokens, bf16 autocast when train.dtype=bfloat16, grad clip per rank, `exchange(lr,
  weight=tokens, weight_decay)` then `commit`;
- val loss on the first train.eval_tokens tokens of the val split (held-out works / books), every
  `--eval-every` steps and at the end; train loss every step (mean over ranks).
Prints JSON (per run: val loss, curves, bytes per worker per step, ratio vs dense bf16, replicas bit-equal),
writes it and a PNG of the curves to `--out`, and with `--record` appends rows to docs/BENCHMARKS.md.
`--from-json` re-plots / records a saved result (e.g. one that came back from a GPU machine).
Imports no Ray (nor `elastic.worker` / `elastic.coordinator`, which do).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

SECTION = "Convergence on one device (bench-converge-gpu): dense vs demo, W ranks simulated"


# ---- data -------------------------------------------------------------------------------------------------
def corpus_tokens(root: str, split: str, tokenizer: str = "gpt2"):
    """All documents of `root/split/*.parquet` (text column), tokenized, each followed by the EOT id, as one
    uint16/int32 numpy array. Cached beside the parquet files, keyed by the files' bytes and the tokenizer."""
    import numpy as np

    d = Path(root) / split
    files = sorted(d.glob("*.parquet"))
    if not files:
        raise SystemExit(f"bench-converge-gpu: no parquet files in {d}; build a corpus with "
                         f"`python -m datasets prepare-sample --corpus shakespeare|kjv {root}`")
    h = hashlib.sha256(tokenizer.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    cache = d / f".tokens-{tokenizer}-{h.hexdigest()[:16]}.npy"
    if cache.exists():
        return np.load(cache)
    import pyarrow.parquet as pq

    from datasets.tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer)
    parts = []
    for f in files:
        texts = pq.read_table(f, columns=["text"]).column("text").to_pylist()
        for ids in tok.encode_batch(texts):
            parts.append(np.asarray(ids + [tok.eot], dtype=np.int64))
    arr = np.concatenate(parts)
    arr = arr.astype(np.uint16 if arr.max() < 65536 else np.int32)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache)
    return arr


class StepRows:
    """Step s -> the [B, T+1] token windows every run trains on at step s (see the module docstring)."""

    def __init__(self, tokens, seq_len: int, rows_per_step: int, seed: int):
        import numpy as np

        self.tokens, self.T, self.B, self.seed = tokens, seq_len, rows_per_step, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < rows_per_step:
            raise SystemExit(f"bench-converge-gpu: the corpus has {self.n_windows} windows of {seq_len} tokens, "
                             f"fewer than the {rows_per_step} rows of one step")
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int):
        import numpy as np

        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def rows(self, step: int):
        import numpy as np

        picks = []
        for j in range(step * self.B, (step + 1) * self.B):
            epoch, i = divmod(j, self.n_windows)
            picks.append(int(self._perm(epoch)[i]))
        idx = np.asarray(picks)[:, None] * self.T + np.arange(self.T + 1)[None, :]
        return self.tokens[idx].astype(np.int64)

    def epochs(self, steps: int) -> float:
        return steps * self.B / self.n_windows


_INIT_LOCK = threading.Lock()


class Diverged(RuntimeError):
    """A run's loss went non-finite."""


# ---- one run ------------------------------------------------------------------------------------------------
def best_labels(path: str) -> dict[str, str]:
    """{sync name: label of its lowest val loss} over the runs of a saved study (the tuning corpus)."""
    with open(path) as f:
        runs = [r for r in json.load(f)["runs"] if "val_loss" in r]
    best: dict[str, dict] = {}
    for r in runs:
        if r["sync"] not in best or r["val_loss"] < best[r["sync"]]["val_loss"]:
            best[r["sync"]] = r
    return {k: v["label"] for k, v in best.items()}


def resolve_best(spec: str, best_from: str) -> str:
    """Replace 'dense@best' / 'demo@best' entries of a --runs spec by the best run of that sync in
    `best_from` (a JSON of this command): tune on one corpus, confirm the same settings on another."""
    if "@best" not in spec:
        return spec
    if not best_from:
        raise SystemExit("bench-converge-gpu: --runs uses NAME@best but no --best-from JSON was given")
    best = best_labels(best_from)
    out = []
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        if part.endswith("@best"):
            name = part[:-len("@best")]
            if name not in best:
                raise SystemExit(f"bench-converge-gpu: {best_from} has no finished {name} run for {part}")
            part = best[name]
        if part not in out:
            out.append(part)
    return ";".join(out)


def parse_runs(spec: str) -> list[tuple[str, str, list[str]]]:
    """'dense; demo:sync.decay=0.99,train.lr=1e-3' -> [(label, sync name, overrides)]."""
    runs = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, _, rest = part.partition(":")
        name = name.strip()
        if name not in ("dense", "demo", "diloco"):
            raise SystemExit(f"bench-converge-gpu: --runs entry {part!r}: the sync must be dense, demo or diloco")
        overrides = [o.strip() for o in rest.split(",") if o.strip()]
        if any("=" not in o for o in overrides):
            raise SystemExit(f"bench-converge-gpu: --runs entry {part!r}: overrides are key=value, comma separated")
        runs.append((part, name, overrides))
    if not runs:
        raise SystemExit("bench-converge-gpu: --runs names no run")
    return runs


def run_one(cfg, workers: int, train_rows: StepRows, val_tokens, eval_every: int, log=print, nodes: int = 1) -> dict:
    """Train `cfg` with `workers` thread ranks on one device; returns the run's figures and curves.

    `nodes`: rank r sits on simulated node r % nodes (what `cross_node_bytes_per_step` counts); a
    `sync.hierarchy=node` run forms its in-node and cross-node groups from that (`run_node_threads`)."""
    import numpy as np
    import torch

    from compression import build_sync, run_threads
    from compression.hierarchy import run_node_threads
    from elastic.model import build_model
    from elastic.schedule import lr_at

    t = cfg.train
    steps, T, B = t.steps, t.seq_len, train_rows.B
    if B % workers:
        raise SystemExit(f"bench-converge-gpu: {B} rows per step do not split evenly over {workers} ranks")
    device = (torch.device("cuda", torch.cuda.current_device()) if t.device in ("auto", "cuda") and
              torch.cuda.is_available() else torch.device("cpu"))
    bf16 = t.dtype == "bfloat16" and device.type == "cuda"
    micro = max(1, t.micro_batch_tokens // T)
    n_val = max(1, min(t.eval_tokens // T, (len(val_tokens) - 1) // T))
    val = torch.as_tensor(np.asarray(val_tokens[:n_val * T + 1], dtype=np.int64))
    val_x = torch.stack([val[i * T:(i + 1) * T] for i in range(n_val)]).to(device)
    val_y = torch.stack([val[i * T + 1:(i + 1) * T + 1] for i in range(n_val)]).to(device)
    losses = np.full((workers, steps), np.nan)
    val_curve: list[list[float]] = []
    stats_box: dict = {}
    per = B // workers
    if workers % nodes:
        raise SystemExit(f"bench-converge-gpu: {workers} ranks do not split evenly over {nodes} simulated nodes")
    node_of = [f"node{r % nodes}" for r in range(workers)]
    sent_by_rank = [0] * workers

    def evaluate(model) -> float:
        model.eval()
        tot = 0.0
        with torch.no_grad():
            for i in range(0, n_val, micro):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(val_x[i:i + micro], val_y[i:i + micro])[1]
                tot += float(loss) * val_x[i:i + micro].shape[0]
        model.train()
        return tot / n_val

    def body(comm, r: int):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with _INIT_LOCK:  # build_model seeds torch's global generator, which the threads share
            model = build_model(cfg.model, 50257 if cfg.data.tokenizer == "gpt2" else 257, cfg.run.seed).to(device)
        params = list(model.parameters())
        sync = build_sync(cfg.sync, params, comm)
        for step in range(steps):
            lr = lr_at(step, t.lr, t.warmup_steps, steps, t.min_lr_ratio)
            rows = torch.as_tensor(train_rows.rows(step)[r * per:(r + 1) * per])
            x, y = rows[:, :-1].contiguous().to(device), rows[:, 1:].contiguous().to(device)
            for p in params:
                p.grad = None
            acc = torch.zeros((), dtype=torch.float64, device=device)
            for i in range(0, per, micro):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(x[i:i + micro], y[i:i + micro])[1]
                n = x[i:i + micro].shape[0]
                (loss * (n / per)).backward()
                acc += loss.detach().double() * n
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            stats = sync.exchange(lr=lr, weight=float(per * T), weight_decay=t.weight_decay)
            sync.commit()
            losses[r, step] = float(acc) / per
            sent_by_rank[r] += stats.bytes_sent  # hierarchy=node: what this rank sends off its node
            if r == 0:
                stats_box.setdefault("first", stats)
                stats_box["sent"] = stats_box.get("sent", 0) + stats.bytes_sent  # diloco: only at outer steps
                stats_box["received"] = stats_box.get("received", 0) + stats.bytes_received
                if not math.isfinite(losses[r, step]):
                    raise Diverged(f"loss is {losses[r, step]} at step {step + 1}")
                if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
                    val_curve.append([step + 1, (step + 1) * B * T, evaluate(model)])
                if step % 50 == 0 or step + 1 == steps:
                    log(f"  step {step + 1}/{steps} rank-0 loss {losses[0, step]:.4f}")
        return [p.detach() for p in sync.replica_tensors()]

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if cfg.sync.hierarchy == "node":
        replicas = run_node_threads(node_of, lambda r, groups: body(groups, r), timeout=900.0)
    else:
        replicas = run_threads(workers, lambda comm: body(comm, comm.rank), timeout=900.0)
    wall = time.perf_counter() - t0
    equal = all(torch.equal(a, b) for rep in replicas[1:] for a, b in zip(replicas[0], rep))
    del replicas
    st = stats_box["first"]
    curve = losses.mean(0)
    return {
        "sync": cfg.sync.name, "workers": workers, "steps": steps, "tokens": steps * B * T,
        "tokens_per_step": B * T, "val_loss": val_curve[-1][2], "val_tokens": n_val * T,
        "final_train_loss_mean10": float(np.mean(curve[-10:])),
        # averaged over the run's steps: diloco sends only at its outer steps
        "bytes_sent_per_worker_per_step": stats_box["sent"] / steps,
        "bytes_received_per_worker_per_step": stats_box["received"] / steps,
        "dense_bf16_bytes_per_step": st.dense_equivalent_bytes,
        "ratio_vs_dense_bf16": (st.dense_equivalent_bytes * steps / stats_box["sent"]) if stats_box["sent"] else None,
        "nodes": nodes,  # per simulated node, the mean over nodes and steps of what its ranks send off it
        "cross_node_bytes_per_step": sum(sent_by_rank) / nodes / steps,
        "replicas_bit_equal": bool(equal), "wall_s": round(wall, 1), "ms_per_step": round(wall / steps * 1e3, 1),
        "epochs": round(train_rows.epochs(steps), 2),
        "loss_curve": [round(float(v), 4) for v in curve], "val_curve": val_curve,
    }


# ---- the study ----------------------------------------------------------------------------------------------
def study(preset: str, data: str, runs: str, workers: list[int], overrides: list[str], eval_every: int,
          out_dir: str | None, budget_s: float, log=print, tag: str = "", nodes: int = 1) -> dict:
    from elastic.config import load_config

    base = load_config(preset, list(overrides))
    train_tok = corpus_tokens(data, "train", base.data.tokenizer)
    val_tok = corpus_tokens(data, "val", base.data.tokenizer)
    t0 = time.time()
    result: dict = {"preset": preset, "data": os.path.basename(os.path.normpath(data)), "tag": tag,
                    "overrides": overrides,
                    "workers": workers, "runs_spec": runs, "machine": _machine(),
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "train_tokens_in_corpus": int(len(train_tok)), "val_tokens_in_corpus": int(len(val_tok)),
                    "runs": [], "skipped": []}
    for W in workers:
        for label, name, extra in parse_runs(runs):
            if budget_s and time.time() - t0 > budget_s:
                result["skipped"].append({"label": label, "workers": W})
                continue
            cfg = load_config(preset, [*overrides, f"sync.name={name}", *extra])
            rows = StepRows(train_tok, cfg.train.seq_len, cfg.train.batch_tokens // cfg.train.seq_len,
                            cfg.data.seed)
            log(f"run {label} W={W}: {cfg.train.steps} steps x {rows.B * rows.T} tokens")
            try:
                r = run_one(cfg, W, rows, val_tok, eval_every or max(1, cfg.train.steps // 6), log=log,
                            nodes=nodes)
            except Diverged as e:  # a diverged run is a result too
                r = {"sync": name, "workers": W, "error": f"diverged: {e}"}
            r.update(label=label, overrides=extra, lr=cfg.train.lr, sync_config=_sync_dict(cfg.sync))
            result["runs"].append(r)
            log(f"  -> val {r.get('val_loss')}, {r.get('ratio_vs_dense_bf16')}x, {r.get('wall_s')} s")
            compare(result)
            if out_dir:
                write_json(result, out_dir)
    return result


def _sync_dict(sc) -> dict:
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(sc).items()}


def compare(result: dict) -> None:
    """Per non-dense run: val loss against the best dense run at the same W (AdamW at its best lr tried)."""
    best = {}
    for r in result["runs"]:
        if r.get("sync") == "dense" and "val_loss" in r:
            W = r["workers"]
            if W not in best or r["val_loss"] < best[W]["val_loss"]:
                best[W] = r
    for r in result["runs"]:
        b = best.get(r["workers"])
        if r.get("sync") != "dense" and b and "val_loss" in r:
            r["vs_best_dense"] = {"dense_label": b["label"], "dense_val_loss": b["val_loss"],
                                  "val_loss_ratio": round(r["val_loss"] / b["val_loss"], 4)}


def _machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    import platform

    return f"{platform.machine()} CPU x{os.cpu_count()}"


def _stem(result: dict) -> str:
    return f"converge-{result['preset']}-{result['data']}" + (f"-{result['tag']}" if result.get("tag") else "")


def write_json(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{_stem(result)}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


def plot(result: dict, path: str) -> str | None:
    """Train loss (every step, mean over ranks) and val loss against tokens, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in result["runs"] if "loss_curve" in r]
    if not runs:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    for r in runs:
        step_tokens = r["tokens_per_step"]
        xs = [(i + 1) * step_tokens / 1e6 for i in range(len(r["loss_curve"]))]
        ratio = r.get("ratio_vs_dense_bf16")
        label = f"{r['label']} W={r['workers']}" + (f" ({ratio:,.0f}x fewer bytes)" if r["sync"] != "dense" and ratio
                                                     else "")
        k = 10  # moving average over 10 steps for readability
        ys = [sum(r["loss_curve"][max(0, i - k + 1):i + 1]) / len(r["loss_curve"][max(0, i - k + 1):i + 1])
              for i in range(len(r["loss_curve"]))]
        style = "--" if r["sync"] == "dense" else "-"
        (line,) = a1.plot(xs, ys, style, lw=1.2, label=label)
        a2.plot([v[1] / 1e6 for v in r["val_curve"]], [v[2] for v in r["val_curve"]], style + "o", ms=3,
                color=line.get_color(), label=label)
    a1.set_title(f"train loss (10-step mean), {result['preset']} on {result['data']}")
    a2.set_title("held-out val loss")
    for a in (a1, a2):
        a.set_xlabel("tokens (millions)")
        a.grid(alpha=0.3)
    a1.set_ylabel("loss")
    a2.legend(fontsize=7)
    lows = [v[2] for r in runs for v in r["val_curve"]]
    if lows:
        a2.set_ylim(min(lows) - 0.1, min(max(lows), min(lows) + 3))
    a1.set_ylim(min(min(r["loss_curve"]) for r in runs) - 0.1, min(lows) + 4 if lows else None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def record(result: dict, command: str, png: str | None) -> None:
    """One docs/BENCHMARKS.md row per W: every run's val loss, ratio to the best dense and bytes ratio."""
    from elastic.bench.runs import append_row

    for W in result["workers"]:
        rs = [r for r in result["runs"] if r["workers"] == W]
        if not rs:  # nothing measured at this W (the budget ran out first): no row
            continue
        parts = []
        for r in rs:
            if "val_loss" not in r:
                parts.append(f"{r['label']}: {r.get('error')}")
                continue
            s = f"{r['label']} val {r['val_loss']:.3f}"
            if "vs_best_dense" in r:
                s += f" ({r['vs_best_dense']['val_loss_ratio']:.3f}x dense"
                s += f", {r['ratio_vs_dense_bf16']:,.0f}x fewer bytes)" if r.get("ratio_vs_dense_bf16") else ")"
            parts.append(s)
        not_run = [x["label"] for x in result.get("skipped", []) if x["workers"] == W]
        if not_run:
            parts.append("not run (out of --budget-s): " + ", ".join(not_run))
        first = rs[0]
        extra = (f"W={W}; {first.get('steps')} steps x {first.get('tokens_per_step'):,} tokens "
                 f"({first.get('epochs')} epochs of {result['data']}); " + "; ".join(parts)
                 + f"; measured {result['date']}" + (f"; curves {png}" if png else ""))
        append_row(SECTION, command, extra, machine_name=result["machine"], date=result["date"][:10])


def _command(args) -> str:
    parts = ["python -m elastic bench-converge-gpu", f"--config {args.config}", f"--data {args.data}",
             f"--workers {args.workers}", f"--runs '{args.runs}'"]
    parts += [f"--eval-every {args.eval_every}"] if args.eval_every else []
    parts += [f"--nodes {args.nodes}"] if getattr(args, "nodes", 1) > 1 else []
    return " ".join(parts + list(args.overrides))


def add_parser(sub) -> None:
    p = sub.add_parser("bench-converge-gpu", help="dense vs demo convergence on one device, W ranks simulated as "
                                                  "threads (no Ray); JSON, PNG, BENCHMARKS rows")
    p.add_argument("--config", default="gpt2-small")
    p.add_argument("--data", default=".cache/converge/sample",
                   help="corpus root with train/ and val/ parquet (python -m datasets prepare-sample --corpus ...)")
    p.add_argument("--runs", default="dense;demo",
                   help="';'-separated runs, each SYNC[:key=value,...], e.g. 'dense;demo:sync.decay=0.99'")
    p.add_argument("--workers", default="1,2,4", help="comma list of simulated rank counts")
    p.add_argument("--nodes", type=int, default=1, help="simulated nodes (rank r on node r %% N): "
                   "cross-node bytes per node, and the groups of sync.hierarchy=node runs")
    p.add_argument("--eval-every", type=int, default=0, help="val loss every N steps (0: steps/6)")
    p.add_argument("--out", default="", help="directory for the JSON (written after every run) and the PNG")
    p.add_argument("--plot", default="", help="PNG path (default: OUT/converge-<preset>-<data>.png)")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no run after this many seconds (0: no limit)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--best-from", default="", help="a JSON of this command: 'dense@best' / 'demo@best' in --runs "
                                                   "stand for its best run of that sync")
    p.add_argument("--record", action="store_true", help="append rows to docs/BENCHMARKS.md")
    p.add_argument("--from-json", default="", help="re-plot / record a saved result instead of training")
    p.add_argument("overrides", nargs="*", help="key=value for every run, e.g. train.steps=300")


def main(args) -> int:
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        command = result.get("command", _command(args))
    else:
        workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
        args.runs = resolve_best(args.runs, args.best_from)
        result = study(args.config, args.data, args.runs, workers, args.overrides, args.eval_every,
                       args.out or None, args.budget_s, log=lambda m: print(m, file=sys.stderr, flush=True),
                       tag=args.tag, nodes=args.nodes)
        command = result["command"] = _command(args)
        if args.out:
            write_json(result, args.out)
    png = args.plot or (os.path.join(args.out, f"{_stem(result)}.png") if args.out else "")
    if png:
        png = plot(result, png)
        result["plot"] = png
    if args.record:
        record(result, command, png)
    slim = {k: v for k, v in result.items() if k != "runs"}
    slim["runs"] = [{k: v for k, v in r.items() if k not in ("loss_curve", "sync_config")} for r in result["runs"]]
    print(json.dumps(slim, indent=1, default=str))
    return 0
