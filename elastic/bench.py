"""Benchmarks that go through the whole trainer: convergence (dense vs demo) and recovery times.

Each prints JSON and can append a row to docs/BENCHMARKS.md. Figures come from the runs' own
summaries (what workers measured), never from configuration.
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from elastic.config import load_config

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def machine() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    return f"{platform.machine()} CPU x{os.cpu_count()}"


def append_row(section: str, command: str, result: str) -> None:
    """Append one row under `## section` in docs/BENCHMARKS.md (creating the section if needed)."""
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    header = f"## {section}"
    row = f"| {datetime.date.today().isoformat()} | `{command}` | {machine()} | {result} |"
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
    from elastic.cli import train

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


def bench_recovery(events: int = 5, overrides: list[str] | None = None, record: bool = False) -> dict:
    """Seconds from a worker's death to the next committed step, and from a new node's appearance
    to its first contributed step, on a simulated multi-node cluster (ray.cluster_utils.Cluster)."""
    from elastic.cli import train

    spacing = 60
    kills = [20 + i * 2 * spacing for i in range(events)]
    removes = [20 + spacing + i * 2 * spacing for i in range(events)]
    adds = [s + 5 for s in removes]
    steps = adds[-1] + spacing
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config("tiny", [
        f"run.name=bench-recovery-{stamp}", f"train.steps={steps}", "train.workers=3",
        "cluster.simulate=[A100,L4,L4]", "data.tokenizer=bytes", "data.max_doc_tokens=256",
        "model.n_layer=2", "model.n_embd=128", "model.block_size=128", "train.seq_len=128",
        "train.batch_tokens=1536", "train.step_timeout_s=10", "checkpoint.every=0",
        f"chaos.kill_at=[{','.join(map(str, kills))}]",
        f"chaos.remove_node_at=[{','.join(map(str, removes))}]",
        f"chaos.add_node_at=[{','.join(map(str, adds))}]",
        *(overrides or []),
    ])
    s = train(cfg, progress_stream=sys.stderr)
    changes = s["membership_changes"]
    deaths = [c["seconds_to_resume"] for c in changes if c["kind"] == "death"]
    node_joins = [c["seconds_from_capacity"] for c in changes
                  if c["kind"] == "join" and "seconds_from_capacity" in c]
    out = {
        "state": s["state"], "steps": s["steps"],
        "death_to_next_step_s": {"n": len(deaths), "median": statistics.median(deaths) if deaths else None,
                                 "values": deaths},
        "capacity_to_first_contributed_step_s": {
            "n": len(node_joins), "median": statistics.median(node_joins) if node_joins else None,
            "values": node_joins},
        "replica_hashes_agree": s["replica_hashes_agree"], "data": s["data"],
    }
    if record:
        append_row("Recovery: death -> next step, new capacity -> first contributed step",
                   "python -m elastic bench-recovery --json",
                   f"death->next step median {out['death_to_next_step_s']['median']:.2f} s (n={len(deaths)}); "
                   f"new node/worker -> first contributed step median "
                   f"{out['capacity_to_first_contributed_step_s']['median']:.2f} s (n={len(node_joins)}); "
                   f"simulated A100/L4 nodes on one machine, CPU workers")
    return out


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
