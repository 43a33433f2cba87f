"""Benchmarks that go through the whole trainer: convergence (dense vs demo) and recovery times.

Each prints JSON and can append a row to docs/BENCHMARKS.md. Figures come from the runs' own
summaries (what workers measured), never from configuration.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from elastic.config import load_config

BENCHMARKS_MD = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"  # elastic/bench/ -> the repo


def machine() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    return f"{platform.machine()} CPU x{os.cpu_count()}"


def append_row(section: str, command: str, result: str, machine_name: str | None = None,
               date: str | None = None) -> None:
    """Append one row under `## section` in docs/BENCHMARKS.md (creating the section if needed).
    `machine_name`/`date`: where and when it was measured, when that is not here and today (a result that
    came back from a GPU machine)."""
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    header = f"## {section}"
    row = f"| {date or datetime.date.today().isoformat()} | `{command}` | {machine_name or machine()} | {result} |"
    if header not in text:
        text = text.rstrip() + f"\n\n{header}\n\n| date | command | machine | result |\n|---|---|---|---|\n{row}\n"
    else:
        start = text.index(header)
        nxt = text.find("\n## ", start + len(header))
        end = len(text) if nxt == -1 else nxt
        block = text[start:end].rstrip() + "\n" + row + "\n"
        text = text[:start] + block + text[end:]
    BENCHMARKS_MD.write_text(text)


def bench_converge(preset: str, overrides: list[str], syncs: list[str], record: bool = False) -> dict:
    """Train each sync strategy on the same data, steps and tokens; compare held-out loss and bytes."""
    from elastic.driver import train

    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict] = {}
    for sync in syncs:
        cfg = load_config(preset, [*overrides, f"sync.name={sync}", f"run.name=converge-{sync}-{stamp}"])
        s = train(cfg, progress_stream=sys.stderr)
        if s.get("state") != "FINISHED":
            raise RuntimeError(f"bench-converge: the {sync} run ended {s.get('state')}: {s.get('error')}")
        results[sync] = {
            "val_loss": s["val_loss"], "final_loss": s["final_loss"], "tokens": s["tokens"],
            "steps": s["steps"], "bytes_sent_per_step": s["bytes_sent_per_step_mean"],
            "dense_bf16_bytes_per_step": s["dense_equivalent_bytes_per_step"],
            "codec_ms_median": s["codec_ms_median"], "wall_s": s["wall_s"],
            "loss_history": s["loss_history"],
        }
    out: dict = {"preset": preset, "overrides": overrides, "runs": {k: {kk: vv for kk, vv in v.items()
                                                                      if kk != "loss_history"}
                                                                  for k, v in results.items()}}
    if "dense" in results:
        base = results["dense"]
        for sync, r in results.items():
            if sync == "dense":
                continue
            out[f"{sync}_vs_dense"] = {
                "val_loss_ratio": r["val_loss"] / base["val_loss"],
                "bytes_ratio_vs_dense_bf16": r["dense_bf16_bytes_per_step"] / max(1, r["bytes_sent_per_step"]),
                "bytes_ratio_vs_dense_as_sent": base["bytes_sent_per_step"] / max(1, r["bytes_sent_per_step"]),
                "same_tokens": r["tokens"] == base["tokens"],
            }
    out["loss_history"] = {k: v["loss_history"] for k, v in results.items()}
    if record:
        nan = float("nan")
        parts = ["val_loss " + ", ".join(f"{k} {v['val_loss']:.4f}" for k, v in results.items())]
        for sync in results:
            cmp = out.get(f"{sync}_vs_dense")
            if cmp:
                parts.append(f"{sync}/dense {cmp.get('val_loss_ratio', nan):.3f}, {sync} sends "
                             f"{cmp.get('bytes_ratio_vs_dense_bf16', nan):,.0f}x fewer bytes than dense bf16")
        parts.append(f"{max(r['tokens'] for r in results.values()):,} tokens each")
        which = "" if syncs == ["dense", "demo"] else f" --syncs {','.join(syncs)}"
        append_row("Convergence: dense vs demo at equal tokens",
                   f"python -m elastic bench-converge --config {preset}{which} {' '.join(overrides)}",
                   "; ".join(parts))
    return out


class ExternalFaults:
    """Faults from outside the run, as users meet them, applied by the driver's process while it trains:
    SIGSTOP on a worker's process (a frozen VM, a partition) and SIGKILL on the coordinator's. Each is timed
    by this clock, at the moment of the signal. Only processes of the cluster this driver started are touched,
    by PID."""

    def __init__(self, run: str, namespace: str, plan: list[tuple[int, str]]):
        self.run, self.namespace, self.todo = run, namespace, sorted(plan)
        self.done: list[dict] = []
        self.stopped_pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="external-faults", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        for pid in self.stopped_pids:  # Ray ended them when it evicted them; make sure
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break

    def _loop(self) -> None:
        import ray

        from elastic.group import coordinator_name

        coord = None
        while self.todo and not self._stop.is_set():
            time.sleep(0.05)
            try:
                if not ray.is_initialized():
                    continue
                coord = coord or ray.get_actor(coordinator_name(self.run), namespace=self.namespace)
                p = ray.get(coord.progress.remote(), timeout=10)
            except Exception:
                continue  # not started yet, or restarting
            step, kind = self.todo[0]
            if p.get("step", 0) < step or p.get("state") != "RUNNING" or len(p.get("members", [])) < 2:
                continue
            if kind == "sigstop":
                victim = p["members"][-1]  # never rank 0: it serves joiners
                os.kill(victim["pid"], signal.SIGSTOP)
                self.stopped_pids.append(victim["pid"])
                who = victim["worker_id"]
            else:
                pid = ray.get(coord.pid.remote(), timeout=10)
                os.kill(pid, signal.SIGKILL)
                who, coord = "coordinator", None
            self.done.append({"kind": kind, "t": time.time(), "step": p["step"], "who": who})
            self.todo.pop(0)


def _first_commit_after(summary: dict, t: float, at_least_step: int = 0) -> float | None:
    """Seconds from `t` to the first step committed after it (summary.json step_timing: [step, t, ...])."""
    after = [row[1] for row in summary.get("step_timing", []) if row[1] > t and row[0] >= at_least_step]
    return min(after) - t if after else None


def _stats(values: list[float]) -> dict:
    values = [round(v, 3) for v in values if v is not None]
    return {"n": len(values), "median": statistics.median(values) if values else None, "values": values}


def bench_recovery(events: int = 5, overrides: list[str] | None = None, record: bool = False) -> dict:
    """What a user feels, on a simulated multi-node cluster (ray.cluster_utils.Cluster), in one run:
    - a worker killed mid-step: seconds from the kill to the next committed step;
    - a worker frozen (SIGSTOP from outside): from the signal to the next committed step, against
      `train.silent_peer_s`;
    - a joiner (a replacement, or a node added): from its being ready to its first contributed step, and from
      the node's appearance;
    - the coordinator's process killed (SIGKILL from outside): from the kill to the next committed step, and
      whether the run finished with no operator action."""
    from elastic.driver import train

    spacing = 60
    kills = [20 + i * 2 * spacing for i in range(events)]
    removes = [20 + spacing + i * 2 * spacing for i in range(events)]
    adds = [s + 5 for s in removes]
    silents = [k + spacing // 2 for k in kills]
    steps = adds[-1] + spacing
    coordinator_kill = steps - spacing // 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config("tiny", [
        f"run.name=bench-recovery-{stamp}", f"train.steps={steps}", "train.workers=3",
        "cluster.simulate=[A100,L4,L4]", "data.tokenizer=bytes", "data.max_doc_tokens=256",
        "model.n_layer=2", "model.n_embd=128", "model.block_size=128", "train.seq_len=128",
        "train.batch_tokens=1536", "train.step_timeout_s=10", "train.silent_peer_s=5", "checkpoint.every=0",
        f"chaos.kill_at=[{','.join(map(str, kills))}]",
        f"chaos.remove_node_at=[{','.join(map(str, removes))}]",
        f"chaos.add_node_at=[{','.join(map(str, adds))}]",
        *(overrides or []),
    ])
    plan = [(s, "sigstop") for s in silents] + [(coordinator_kill, "sigkill-coordinator")]
    with ExternalFaults(cfg.run.name, cfg.cluster.namespace, plan) as faults:
        s = train(cfg, progress_stream=sys.stderr)
    changes = s["membership_changes"]
    killed_at = {e["step"] for e in s["events"] if e["what"].startswith("chaos-kill")}
    # a kill (ray.kill mid-step, timed from the kill) vs a node lost (removed without notice: timed from the
    # worker's last sign of life, so it includes how long Ray takes to tell the node is gone)
    deaths = [c["seconds_to_resume"] for c in changes if c["kind"] == "death" and c["step"] in killed_at]
    node_losses = [c["seconds_to_resume"] for c in changes if c["kind"] == "death" and c["step"] not in killed_at]
    joins = [c["seconds_to_resume"] for c in changes if c["kind"] == "join"]
    node_joins = [c["seconds_from_capacity"] for c in changes if c["kind"] == "join" and "seconds_from_capacity" in c]
    silent_changes = [c for c in changes if c["kind"] == "silent_peer"]
    stopped = [f for f in faults.done if f["kind"] == "sigstop"]
    silent = [_first_commit_after(s, f["t"], c["step"]) for f, c in zip(stopped, silent_changes)]
    coord = [_first_commit_after(s, f["t"]) for f in faults.done if f["kind"] == "sigkill-coordinator"]
    limit = cfg.train.silent_peer_s
    out = {
        "state": s["state"], "steps": s["steps"],
        "death_to_next_step_s": {**_stats(deaths), "target_s": 2.0},
        "node_lost_to_next_step_s": _stats(node_losses),
        "sigstop_to_next_step_s": {**_stats(silent), "silent_peer_s": limit, "target_s": limit + 2,
                                   "signals": len(stopped), "evictions": len(silent_changes),
                                   "detection_s": _stats([c.get("detection_s") for c in silent_changes])},
        "joiner_ready_to_first_contributed_step_s": {**_stats(joins), "target_s": 2.0},
        "capacity_to_first_contributed_step_s": _stats(node_joins),
        "coordinator_kill_to_next_step_s": {**_stats(coord), "finished_without_operator": s["state"] == "FINISHED",
                                            "resumed_from_step": s.get("resumed_from_step")},
        "replica_hashes_agree": s["replica_hashes_agree"], "data": s["data"],
    }
    if record:
        def med(key):
            m = out[key]["median"]
            return "n/a" if m is None else f"{m:.2f} s (n={out[key]['n']})"

        append_row("Recovery: from the fault to the next committed step",
                   "python -m elastic bench-recovery --json",
                   f"kill -> next step {med('death_to_next_step_s')}; node lost -> next step "
                   f"{med('node_lost_to_next_step_s')}; SIGSTOP -> next step "
                   f"{med('sigstop_to_next_step_s')} with silent_peer_s={limit:g}; joiner ready -> first "
                   f"contributed step {med('joiner_ready_to_first_contributed_step_s')}; new node -> first contributed "
                   f"step {med('capacity_to_first_contributed_step_s')}; coordinator SIGKILL -> next step "
                   f"{med('coordinator_kill_to_next_step_s')}, run {s['state']} with no operator action; replicas "
                   f"agree {s['replica_hashes_agree']}, duplicated {s['data'].get('duplicated')} skipped "
                   f"{s['data'].get('skipped')}; simulated A100/L4 nodes on one machine, CPU workers")
    return out


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
