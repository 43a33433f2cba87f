"""The messages between the coordinator and its workers: one step call, one step report, a worker's status.

Plain dataclasses, no Ray: the protocol reads here, not in dict keys scattered over two files.

A step is two-phase (docs/elastic.md): the coordinator's `StepCall` for step s carries the decision to commit
step s-1 (`commit_first`), so a healthy run costs one RPC per step; the worker answers with a `StepReport`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepChaos:
    """Faults the coordinator injects into one worker's step (`chaos` config)."""
    hang: bool = False             # stop answering inside the step, until killed
    corrupt_payload: bool = False  # random bytes replace this worker's payload on the wire
    comm_error: bool = False       # the collective raises on this rank
    commit_error: bool = False     # applying the previous step raises (as an out-of-memory would)
    diverge: bool = False          # this replica's parameters drift after applying the previous step


@dataclass
class StepCall:
    step: int
    ranges: list                               # datasets.DocRange: the rows this rank trains
    lr: float
    chaos: StepChaos = field(default_factory=StepChaos)
    commit_first: int | None = None            # apply this step first (the decision rides on this call)
    prefetch: list | None = None               # the next step's likely rows, read ahead meanwhile
    prefetch_margin: list | None = None        # neighbours' rows next to them (a re-split may move them here)
    window: dict | None = None                 # datasets.Window.to_json(): a token-level cut of the step


@dataclass
class StepReport:
    worker_id: str
    rank: int
    step: int
    ok: bool
    # what the step did (ok reports)
    tokens: int = 0
    docs: int = 0
    loss: float = 0.0
    compute_s: float = 0.0
    read_s: float = 0.0
    commit_s: float = 0.0
    fwd_bwd_s: float = 0.0
    step_s: float = 0.0
    dropped: list = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    dense_equivalent_bytes: int = 0
    codec_ms: float = 0.0
    comm_ms: float = 0.0
    ahead_tokens: list | None = None           # [[shard, row_group, row, tokens], ...] of the next step's rows
    profile: dict | None = None
    # the commit that rode on this call
    committed_step: int | None = None
    fingerprint: str | None = None
    commit_failed: bool = False                # applying `commit_first` raised: this replica is not trustworthy
    # why a step failed (ok=False)
    error: str | None = None
    traceback: str | None = None
    pre_exchange: bool = False                 # failed before the exchange (took part with a NaN weight)
    window_mismatch: bool = False
    data_error: bool = False                   # the data source failed: nobody's fault, the run stops
    bad_sender: int | None = None              # rank whose payload failed validation
    left_group: bool = False                   # the collective failed and this rank closed its side

    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, self.compute_s)

    def update_error(self, e: BaseException, error: str | None = None, **flags: Any) -> None:
        """Mark the step failed by `e` (first line of its message unless `error` says better)."""
        first = str(e).splitlines()[0] if str(e) else ""
        self.ok = False
        self.error = error or f"{type(e).__name__}: {first}"
        for k, v in flags.items():
            setattr(self, k, v)


@dataclass
class WorkerStatus:
    """A worker's answer on its control lane (answers even while its step thread is blocked)."""
    worker_id: str
    phase: str                   # idle | compute | exchange | exchanged | failed | hung | ...
    progress: int                # bumped at every micro-batch and phase change: a stuck worker stops moving
    generation: int
    rank: int
    step_count: int              # committed steps applied to this replica's parameters
    pending_step: int | None     # exchanged, not yet committed or aborted
    pid: int = 0
    info: dict[str, Any] = field(default_factory=dict)
