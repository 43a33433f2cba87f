"""What the person at the terminal sees: a live rich table on a TTY, plain log lines elsewhere.

Plain lines (no control codes) when stdout is not a terminal, so the Ray dashboard's log viewer and
`ray job logs` read well.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _ratio(p: dict) -> str:
    if not p.get("bytes_sent"):
        return "-"
    r = p.get("dense_bytes", 0) / p["bytes_sent"]
    return f"{r:,.0f}x" if r >= 10 else f"{r:.1f}x"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GB"


class ProgressView:
    def __init__(self, cfg, stream=None):
        """`stream`: where people read progress; stdout by default, stderr when stdout carries JSON."""
        self.cfg = cfg
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.console = Console(file=self.stream, force_terminal=self.tty, no_color=not self.tty, highlight=False)
        self.live = None
        self.last_logged = -1
        self.last = {}

    def __enter__(self):
        if self.tty:
            self.live = Live(self._table({}), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        else:
            print(f"raydistro: run {self.cfg.run.name}: starting {self.cfg.train.workers} workers, "
                  f"sync={self.cfg.sync.name}, {self.cfg.train.steps} steps", file=self.stream, flush=True)
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def _table(self, p: dict) -> Table:
        t = Table(title=f"raydistro · {self.cfg.run.name} · sync={self.cfg.sync.name}", expand=False)
        for col in ("step", "loss", "tokens/s", "sent/step", "vs dense", "world", "gen", "state"):
            t.add_column(col, justify="right")
        if p:
            t.add_row(
                f"{p.get('step', 0)}/{p.get('total', self.cfg.train.steps)}",
                f"{p['loss']:.4f}" if "loss" in p else "-",
                f"{p.get('tokens_per_s', 0):,.0f}",
                _bytes(p.get("bytes_sent", 0)),
                _ratio(p),
                f"{p.get('world_size', 0)} {','.join(sorted(set(p.get('accelerators', []))))}",
                str(p.get("generation", "-")),
                p.get("state", ""),
            )
        return t

    def update(self, p: dict) -> None:
        self.last = p
        if self.live is not None:
            self.live.update(self._table(p))
            return
        step = p.get("step", 0)
        every = max(1, self.cfg.train.log_every)
        # fast steps outrun the driver's polling: log when a multiple of `every` was crossed, not hit
        crossed = step // every > self.last_logged // every
        if "loss" in p and step != self.last_logged and (crossed or step == p.get("total")):
            self.last_logged = step
            print(f"step {step}/{p.get('total')} loss {p['loss']:.4f} tokens/s {p.get('tokens_per_s', 0):.0f} "
                  f"sent/step {_bytes(p.get('bytes_sent', 0))} (dense bf16 / sent = {_ratio(p)}) "
                  f"world {p.get('world_size')} gen {p.get('generation')} {p.get('state', '')}",
                  file=self.stream, flush=True)

    def final(self, summary: dict, out: Path) -> None:
        lines = [
            f"run {summary.get('run_name')} {summary.get('state')}: {summary.get('steps')} steps, "
            f"{summary.get('tokens', 0):,} tokens",
        ]
        if summary.get("initial_loss") is not None:
            lines.append(f"loss {summary['initial_loss']:.4f} -> {summary['final_loss']:.4f}"
                         + (f", val_loss {summary['val_loss']:.4f}" if summary.get("val_loss") else ""))
        if summary.get("compression_ratio"):
            r = summary["compression_ratio"]
            lines.append(f"bytes sent per worker per step {_bytes(summary['bytes_sent_per_step_mean'])} "
                         f"(dense bf16 / sent = {r:,.0f}x)" if r >= 10 else
                         f"bytes sent per worker per step {_bytes(summary['bytes_sent_per_step_mean'])} "
                         f"(dense bf16 / sent = {r:.2f}x)")
        if summary.get("membership_changes"):
            lines.append(f"membership changes: {len(summary['membership_changes'])}")
        if summary.get("error"):
            lines.append(f"error: {summary['error']}")
        lines.append(f"run directory: {out}")
        for line in lines:
            print(line, file=self.stream, flush=True)


@contextlib.contextmanager
def json_only_stdout(enabled: bool):
    """With --json, stdout carries the JSON alone: whatever is written meanwhile (Ray's lines from
    other processes, such as a raylet's death notice, and progress) goes to stderr, at the fd level."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
