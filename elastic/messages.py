"""The messages between the coordinator and its workers: one step call, one step report, a worker's status.

Plain dataclasses, no Ray: the protocol reads here, not in dict keys scattered over two files.

A step is two-phase (docs/elastic.md): the coordinator's `StepCall` for step s carries the decision to commit
step s-1 (`commit_first`), so a healthy run costs one RPC per step; the worker answers with a `StepReport`.

On the wire (every step's messages cross the users' links) each message pickles as its class and only the
fields that differ from their defaults, by position (`_Compact`): no field names, no defaults, document ranges
as plain ints, and a liveness `WorkerStatus` carries its static `info` once per generation. Same values out as
in; the sizes before and after are in docs/slowlink.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from datasets import DocRange


def _ranges_out(v):
    """[DocRange, ...] -> (shard, row_group, start, stop, ...) flat; anything else as is."""
    if isinstance(v, list) and v and all(type(r) is DocRange for r in v):
        return _FlatRanges(x for r in v for x in (r.shard, r.row_group, r.start, r.stop))
    return v


def _ranges_in(v):
    if type(v) is _FlatRanges:
        return [DocRange(v[i], v[i + 1], v[i + 2], v[i + 3]) for i in range(0, len(v), 4)]
    return v


class _FlatRanges(tuple):
    """A list of DocRange on the wire: their ints, four per range."""


_FIELDS: dict = {}  # class -> its dataclass fields, in order


def _fields_of(cls) -> tuple:
    if cls not in _FIELDS:
        _FIELDS[cls] = tuple(dataclasses.fields(cls))
    return _FIELDS[cls]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _rebuild(cls, changed: tuple):
    fields = _fields_of(cls)
    obj = cls.__new__(cls)
    for f in fields:
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            obj.__dict__[f.name] = _default(f)
    for i, v in zip(changed[::2], changed[1::2]):
        obj.__dict__[fields[i].name] = _ranges_in(v)
    return obj


class _Compact:
    """Pickles a dataclass as its class plus (index, value) of each field that differs from its default: what
    crosses the link every step is the step's news, not the schema. Unpickled, it is the same dataclass with
    the same values (required fields always travel)."""

    def __reduce__(self):
        changed = []
        for i, f in enumerate(_fields_of(type(self))):
            v = self.__dict__[f.name]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required or v != _default(f):
                changed += [i, _ranges_out(v)]
        return _rebuild, (type(self), tuple(changed))


@dataclass
class StepChaos(_Compact):
    """Faults the coordinator injects into one worker's step (`chaos` config)."""
    hang: bool = False             # stop answering inside the step, until killed
    corrupt_payload: bool = False  # random bytes replace this worker's payload on the wire
    comm_error: bool = False       # the collective raises on this rank
    commit_error: bool = False     # applying the previous step raises (as an out-of-memory would)
    diverge: bool = False          # this replica's parameters drift after applying the previous step


@dataclass
class StepCall(_Compact):
    step: int
    ranges: list                               # datasets.DocRange: the rows this rank trains
    lr: float
    chaos: StepChaos = field(default_factory=StepChaos)
    commit_first: int | None = None            # apply this step first (the decision rides on this call)
    prefetch: list | None = None               # the next step's likely rows, read ahead meanwhile
    prefetch_margin: list | None = None        # neighbours' rows next to them (a re-split may move them here)
    window: dict | None = None                 # datasets.Window.to_json(): a token-level cut of the step
    next_fixed: bool = False                   # if this step commits and the group stays, the next call brings
                                               # exactly `prefetch`, whole documents (train.compute_ahead)
    carry: list | None = None                  # datasets.Carry.to_list(): the stream starts with this tail of
                                               # the previous step's last document (rank 0; train.carry_tail)
    cut_tail: bool = False                     # stop after the last full row, leaving the last document's tail
    next_cut_tail: bool = False                # what the next call's cut_tail will be (train.compute_ahead)


def tokens_per_s(tokens: int, seconds: float) -> float:
    """Throughput, the one definition for a worker's step and the group's: a step too short to time (0 s) reads
    as very fast, never as a division error."""
    return tokens / max(1e-9, seconds)


@dataclass
class StepReport(_Compact):
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
    ahead_s: float = 0.0                       # of compute_s, done before this call arrived (train.compute_ahead)
    rows: int = 0                              # packed rows trained (tokens / (rows x seq_len): the packing)
    doc_slots: int = 0                         # target slots of the documents it answers for (tokens + 1 each)
    carry_out: list | None = None              # cut_tail: the tail left for the next step (datasets.Carry)
    dropped: list = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    local_bytes_sent: int = 0                  # sync.hierarchy=node: sent inside the node (bytes_sent: across)
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
        """This worker's compute throughput in the step (read, forward/backward, exchange)."""
        return tokens_per_s(self.tokens, self.compute_s)

    def update_error(self, e: BaseException, error: str | None = None, **flags: Any) -> None:
        """Mark the step failed by `e` (first line of its message unless `error` says better)."""
        first = str(e).splitlines()[0] if str(e) else ""
        self.ok = False
        self.error = error or f"{type(e).__name__}: {first}"
        for k, v in flags.items():
            setattr(self, k, v)


@dataclass
class WorkerStatus(_Compact):
    """A worker's answer on its control lane (answers even while its step thread is blocked)."""
    worker_id: str
    phase: str                   # idle | compute | exchange | exchanged | failed | hung | ...
    progress: int                # bumped at every micro-batch and phase change: a stuck worker stops moving
    generation: int
    rank: int
    step_count: int              # committed steps applied to this replica's parameters
    pending_step: int | None     # exchanged, not yet committed or aborted
    pid: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # static: sent with a generation's first status only
