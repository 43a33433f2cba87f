"""The elastic data plan: which rows each rank reads at each step, with exactly-once delivery per epoch.

Pure logic: no I/O, no threads, no Ray. The coordinator owns one `DataPlan`; workers only read the
`DocRange`s it hands out.

Order. An epoch's global order depends only on (seed, epoch, shard list): the list of row groups is
shuffled with a RNG seeded by (seed, epoch), rows stay in file order inside a row group (so a reader streams
a row group front to back). One global cursor walks that order; world size and ranks never enter the order,
which is what lets the world change between any two steps (the MosaicML-streaming idea), and, unlike
those, shares may be uneven.

Steps. `assign(step, shares)` gives each rank (sorted by rank id) documents worth about `shares[rank]`
estimated tokens (per-row-group average tokens/document from the parquet footer; at least one document per
rank), taking first from the returned queue (ranges of aborted steps, oldest first) and then from the
cursor. `commit(step)` declares that step's documents delivered. `abort(step)` puts its ranges - including
those of a worker that died mid-step - on the returned queue, where the next `assign` re-splits them over
whoever is alive. Up to `max_pending` steps may be assigned before they commit (prefetching the next step
while the current one trains); they may commit or abort in any order.
How a drawn step is then split between ranks by real token counts is `datasets.split`'s (pure
functions); `resplit` records such a split.

Promise: across any sequence of world sizes, shares, commits, aborts and state_dict round-trips, every
document of an epoch is committed exactly once. The plan does not assume it: it keeps a compact delivery
record (merged committed intervals per row group) so `accounting()` *measures* duplicates and skips.

Epochs. When the cursor passes the last row group and nothing is returned, the plan rolls over to epoch+1
with a new order (a step may then mix the tail of epoch e and the head of e+1; ranges are accounted to the
epoch they were drawn in, including ranges aborted after the rollover).
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import math
import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

PLAN_STATE_VERSION = 2  # 2: whole row groups as a bitmap; version 1 states still load


class PlanError(RuntimeError):
    """The plan was driven in a way it does not support (unknown step, too many pending steps, ...)."""


class PlanStateMismatch(PlanError):
    """A saved plan state does not belong to this shard list (the dataset changed between runs)."""


@dataclass(frozen=True)
class DocRange:
    """Rows [start, stop) of row group `row_group` of shard number `shard` (index into the shard list)."""

    shard: int
    row_group: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def to_list(self) -> list[int]:
        return [self.shard, self.row_group, self.start, self.stop]

    @classmethod
    def from_list(cls, v: Sequence[int]) -> "DocRange":
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]))


@dataclass(frozen=True)
class ShardInfo:
    """What the parquet footer says about one file; enough to plan without opening it again."""

    path: str                              # full URL (s3://b/k.parquet, /abs/path.parquet, gs://...)
    size: int                              # bytes
    row_group_rows: tuple[int, ...]        # rows per row group
    schema_names: tuple[str, ...]          # column names
    row_group_tokens: tuple[int, ...]      # estimated tokens per row group (text bytes / BYTES_PER_TOKEN)
    column_types: tuple[str, ...] = ()     # arrow type of each column, as schema_names ((): not read)

    @property
    def rows(self) -> int:
        return sum(self.row_group_rows)

    @property
    def num_row_groups(self) -> int:
        return len(self.row_group_rows)

    @property
    def token_estimate(self) -> int:
        return sum(self.row_group_tokens)


def shard_fingerprint(shards: Sequence[ShardInfo]) -> str:
    """Identity of a shard list for resume checks: file names (not their bucket/dir, so a copied dataset
    still resumes), sizes and row-group layout, in plan order."""
    ident = [[os.path.basename(s.path.rstrip("/")), s.size, list(s.row_group_rows)] for s in shards]
    return hashlib.sha256(json.dumps(ident, separators=(",", ":")).encode()).hexdigest()[:16]


class _Layout:
    """Every row group of the shard list numbered 0..total-1 (shard-major), from per-shard offsets:
    O(shards) memory, so a FineWeb-sized list (millions of row groups) costs no per-row-group objects."""

    def __init__(self, shards: Sequence[ShardInfo]):
        self.rows = [sh.row_group_rows for sh in shards]
        self.offsets, n = [], 0
        for sh in shards:
            self.offsets.append(n)
            n += sh.num_row_groups
        self.total = n

    def index(self, shard: int, row_group: int) -> int:
        return self.offsets[shard] + row_group


@dataclass
class _EpochRecord:
    """Delivery record of one epoch: merged committed row intervals per (shard, row_group).

    A row group delivered whole moves from `delivered` to the `full` bitmap (one bit per row group), so
    memory and checkpoint size stay bounded over an epoch of millions of row groups."""

    layout: _Layout
    delivered: dict[tuple[int, int], list[list[int]]] = field(default_factory=dict)
    duplicated: int = 0
    filtered: int = 0
    unusable: int = 0
    full: bytearray = field(default_factory=bytearray)
    full_rows: int = 0

    def __post_init__(self):
        if not self.full:
            self.full = bytearray((self.layout.total + 7) // 8)

    def _is_full(self, i: int) -> bool:
        return bool(self.full[i >> 3] >> (i & 7) & 1)

    def mark(self, r: DocRange) -> None:
        """Record rows [start, stop) as committed; rows already committed count as duplicated."""
        key = (r.shard, r.row_group)
        i = self.layout.index(*key)
        if self._is_full(i):
            self.duplicated += len(r)
            return
        spans = self.delivered.get(key, [])
        lo, hi = r.start, r.stop
        merged: list[list[int]] = []
        for a, b in spans:
            if b < lo or a > hi:                     # disjoint, not touching
                merged.append([a, b])
                continue
            self.duplicated += max(0, min(b, r.stop) - max(a, r.start))
            lo, hi = min(lo, a), max(hi, b)
        merged.append([lo, hi])
        merged.sort()
        rows = self.layout.rows[r.shard][r.row_group]
        if merged == [[0, rows]]:
            self.full[i >> 3] |= 1 << (i & 7)
            self.full_rows += rows
            self.delivered.pop(key, None)
        else:
            self.delivered[key] = merged

    def committed_rows(self) -> int:
        return self.full_rows + sum(b - a for spans in self.delivered.values() for a, b in spans)

    def to_json(self) -> dict:
        return {
            "full": base64.b64encode(zlib.compress(bytes(self.full), 6)).decode("ascii"),
            "full_rows": self.full_rows,
            "delivered": {f"{s}:{g}": spans for (s, g), spans in sorted(self.delivered.items())},
            "duplicated": self.duplicated, "filtered": self.filtered, "unusable": self.unusable,
        }

    @classmethod
    def from_json(cls, d: Mapping, layout: _Layout) -> "_EpochRecord":
        rec = cls(layout, duplicated=int(d["duplicated"]), filtered=int(d["filtered"]), unusable=int(d["unusable"]))
        if "full" in d:
            full = zlib.decompress(base64.b64decode(d["full"]))
            if len(full) != len(rec.full):
                raise PlanStateMismatch(f"data plan state: delivery bitmap of {len(full)} bytes for "
                                        f"{layout.total} row groups")
            rec.full, rec.full_rows = bytearray(full), int(d["full_rows"])
        for key, spans in d["delivered"].items():  # version 1 kept whole row groups here too: re-mark
            s, g = (int(x) for x in key.split(":"))
            for a, b in spans:  # disjoint merged spans: re-marking them counts no duplicates
                rec.mark(DocRange(s, g, int(a), int(b)))
        return rec


_Drawn = tuple[int, DocRange]   # (epoch the rows were drawn in, rows)


class DataPlan:
    """Deterministic, resumable assignment of documents to ranks. See the module docstring."""

    def __init__(self, shards: Sequence[ShardInfo], seed: int, epoch: int = 0, max_pending: int = 4):
        self.shards: list[ShardInfo] = list(shards)
        self.seed = int(seed)
        self.max_pending = int(max_pending)
        self._units = [(s, g) for s, sh in enumerate(self.shards)
                       for g, n in enumerate(sh.row_group_rows) if n > 0]
        if not self._units:
            raise PlanError("data plan: the shard list holds no rows")
        self.documents = sum(sh.rows for sh in self.shards)
        self.fingerprint = shard_fingerprint(self.shards)
        self._layout = _Layout(self.shards)
        self._avg_tokens = {
            (s, g): max(1.0, sh.row_group_tokens[g] / sh.row_group_rows[g])
            for s, sh in enumerate(self.shards) for g in range(sh.num_row_groups) if sh.row_group_rows[g] > 0
        }
        self._start_epoch(int(epoch))
        self._returned: collections.deque[_Drawn] = collections.deque()
        self._pending: dict[int, dict[int, list[_Drawn]]] = {}
        # the last committed step's carried tail ([shard, row_group, row, skip, slots]: datasets.Carry.to_list()),
        # which the next step trains first; None when that step ended on a whole document
        self.carry: list[int] | None = None
        self._records: dict[int, _EpochRecord] = {self.epoch: _EpochRecord(self._layout)}
        self._finished: dict[int, dict] = {}

    # ---------------------------------------------------------------- order and cursor
    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """The (shard, row_group) visiting order of `epoch`; a function of (seed, epoch, shard list) only."""
        order = list(self._units)
        random.Random(f"raydistro-dataplan:{self.seed}:{epoch}").shuffle(order)
        return order

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = self.epoch_order(epoch)
        self._cursor_unit = 0
        self._cursor_row = 0

    def _rows_of(self, unit: tuple[int, int]) -> int:
        return self.shards[unit[0]].row_group_rows[unit[1]]

    def _take(self, n_want: int) -> _Drawn:
        """Up to n_want rows from one row group: the returned queue first, then the cursor."""
        if self._returned:
            epoch, r = self._returned[0]
            n = min(n_want, len(r))
            if n == len(r):
                self._returned.popleft()
            else:
                self._returned[0] = (epoch, DocRange(r.shard, r.row_group, r.start + n, r.stop))
            return epoch, DocRange(r.shard, r.row_group, r.start, r.start + n)
        if self._cursor_unit >= len(self._order):          # epoch exhausted: roll over
            self._start_epoch(self.epoch + 1)
            self._records.setdefault(self.epoch, _EpochRecord(self._layout))
        unit = self._order[self._cursor_unit]
        start = self._cursor_row
        stop = min(self._rows_of(unit), start + n_want)
        self._cursor_row = stop
        if stop >= self._rows_of(unit):
            self._cursor_unit += 1
            self._cursor_row = 0
        return self.epoch, DocRange(unit[0], unit[1], start, stop)

    def _next_unit(self) -> tuple[int, int]:
        if self._returned:
            r = self._returned[0][1]
            return (r.shard, r.row_group)
        if self._cursor_unit >= len(self._order):
            return self.epoch_order(self.epoch + 1)[0]
        return self._order[self._cursor_unit]

    # ---------------------------------------------------------------- the step protocol
    def assign(self, step: int, shares: Mapping[int, int]) -> dict[int, list[DocRange]]:
        """Documents for each rank at `step`, about shares[rank] estimated tokens each (>= 1 document)."""
        if not shares:
            raise PlanError(f"assign(step={step}): no ranks given")
        for rank, tokens in shares.items():
            if not (isinstance(tokens, (int, float)) and tokens > 0):
                raise PlanError(f"assign(step={step}): share of rank {rank} must be > 0 tokens, got {tokens!r}")
        if step in self._pending:
            raise PlanError(f"assign(step={step}): step already assigned and not committed or aborted")
        if len(self._pending) >= self.max_pending:
            raise PlanError(f"assign(step={step}): {len(self._pending)} steps pending "
                            f"({sorted(self._pending)}); commit or abort one first (max_pending={self.max_pending})")
        drawn = self._draw(shares)
        self._pending[step] = drawn
        return {rank: [r for _, r in got] for rank, got in drawn.items()}

    def _draw(self, shares: Mapping[int, int]) -> dict[int, list[_Drawn]]:
        drawn: dict[int, list[_Drawn]] = {}
        for rank in sorted(shares):
            budget = float(shares[rank])
            got: list[_Drawn] = []
            while True:
                avg = self._avg_tokens[self._next_unit()]
                n_want = math.floor(budget / avg + 0.5)
                if not got:
                    n_want = max(1, n_want)
                if n_want <= 0:
                    break
                epoch, r = self._take(n_want)
                got.append((epoch, r))
                budget -= len(r) * avg
            drawn[rank] = got
        return drawn

    def peek(self, shares: Mapping[int, int]) -> dict[int, list[DocRange]]:
        """What the next `assign` with these shares will hand out if no step is aborted before it, without
        changing the plan: a prefetch hint (workers read and tokenize it during the current step). Nothing
        is promised about it; only `assign` delivers."""
        saved = (self.epoch, self._order, self._cursor_unit, self._cursor_row, collections.deque(self._returned),
                 set(self._records))
        try:
            drawn = self._draw(shares)
        finally:
            self.epoch, self._order, self._cursor_unit, self._cursor_row, self._returned = saved[:5]
            for e in set(self._records) - saved[5]:  # a rollover while peeking made a record
                del self._records[e]
        return {rank: [r for _, r in got] for rank, got in drawn.items()}

    def resplit(self, step: int, ranges: Mapping[int, Sequence[DocRange]]) -> bool:
        """Hand pending step `step`'s rows to the ranks differently (e.g. `balanced_split` by real token
        counts). The rows must be exactly those drawn for the step, each once; which epoch each row was
        drawn in is kept. Returns False, changing nothing, for a step that holds one row twice (drawn in
        two epochs: a rollover inside a dataset smaller than a step), where rows alone are ambiguous."""
        drawn = self._pending.get(step)
        if drawn is None:
            raise PlanError(f"resplit(step={step}): step is not pending (pending: {sorted(self._pending)})")
        epoch_of: dict[tuple[int, int, int], int] = {}
        for got in drawn.values():
            for e, r in got:
                for row in range(r.start, r.stop):
                    if (r.shard, r.row_group, row) in epoch_of:
                        return False
                    epoch_of[(r.shard, r.row_group, row)] = e
        seen = set()
        new: dict[int, list[_Drawn]] = {}
        for rank in sorted(ranges):
            out: list[_Drawn] = []
            for r in ranges[rank]:
                rows = [(r.shard, r.row_group, row) for row in range(r.start, r.stop)]
                if any(x not in epoch_of or x in seen for x in rows):
                    raise PlanError(f"resplit(step={step}): {r} is not a row set drawn for this step, or repeats one")
                seen.update(rows)
                # keep ranges whole unless the epoch changes inside (a range never spans epochs when drawn)
                for e in sorted({epoch_of[x] for x in rows}):
                    part = [x[2] for x in rows if epoch_of[x] == e]
                    out.append((e, DocRange(r.shard, r.row_group, part[0], part[-1] + 1)))
            new[rank] = out
        if len(seen) != len(epoch_of):
            raise PlanError(f"resplit(step={step}): {len(epoch_of) - len(seen)} drawn rows are given to nobody")
        self._pending[step] = new
        return True

    def commit(self, step: int, dropped: Iterable = (), carry: Sequence[int] | None = None) -> None:
        """Step `step` trained and synced everywhere: its documents are delivered.

        `dropped`: the readers' report of rows of this step that were consumed but not trained on, as
        (DocRange, reason) pairs (or [shard, row_group, start, stop, reason] lists from JSON), reason
        "filtered" (data filters) or "unusable" (null/empty/corrupt). They are never served again and are
        counted as filtered/unusable, not delivered, in the epoch they were drawn in.
        `carry` ([shard, row_group, row, skip, slots], `datasets.Carry.to_list()`): the tail of this step's last
        document, which the next step trains first; it replaces the previous one (this step trained that)."""
        drawn = self._pending.get(step)
        if drawn is None:
            self._pop(step, "commit")
        drops = [_as_drop(d) for d in dropped]
        spans = [(e, r) for got in drawn.values() for e, r in got]
        if carry is not None:
            if not (isinstance(carry, (list, tuple)) and len(carry) in (4, 5)
                    and all(isinstance(x, int) for x in carry) and carry[3] > 0
                    and (len(carry) == 4 or carry[4] == 0 or carry[3] < carry[4])
                    and any(d.shard == carry[0] and d.row_group == carry[1] and d.start <= carry[2] < d.stop
                            for _, d in spans)):
                raise PlanError(f"commit(step={step}): carry {carry!r} is not [shard, row_group, row, skip > 0, "
                                "slots > skip] of a row of this step")
        attributed = []
        for r, reason in drops:
            home = next((e for e, d in spans if d.shard == r.shard and d.row_group == r.row_group
                         and d.start <= r.start and r.stop <= d.stop), None)
            if home is None:
                raise PlanError(f"commit(step={step}): dropped rows {r} are not part of this step")
            attributed.append((home, r, reason))
        self._pending.pop(step)
        for epoch, r in spans:
            self._records[epoch].mark(r)
        for epoch, r, reason in attributed:
            rec = self._records[epoch]
            setattr(rec, reason, getattr(rec, reason) + len(r))
        self.carry = [int(x) for x in carry] if carry is not None else None
        self._finish_epochs()

    def abort(self, step: int) -> list[DocRange]:
        """Step `step` did not commit (a worker died, a sync failed): its ranges are served first next."""
        drawn = self._pop(step, "abort")
        back = [d for rank in sorted(drawn) for d in drawn[rank]]
        self._returned.extend(back)
        return [r for _, r in back]

    def _pop(self, step: int, what: str) -> dict[int, list[_Drawn]]:
        if step not in self._pending:
            raise PlanError(f"{what}(step={step}): step is not pending (pending: {sorted(self._pending)})")
        return self._pending.pop(step)

    # ---------------------------------------------------------------- accounting
    def _rows_in_flight(self, epoch: int) -> tuple[int, int]:
        in_flight = sum(len(r) for drawn in self._pending.values() for got in drawn.values()
                        for e, r in got if e == epoch)
        returned = sum(len(r) for e, r in self._returned if e == epoch)
        return in_flight, returned

    def _remaining(self, epoch: int) -> int:
        if epoch != self.epoch:
            return 0
        left = sum(self._rows_of(u) for u in self._order[self._cursor_unit:])
        return left - self._cursor_row

    def accounting(self, epoch: Optional[int] = None) -> dict:
        """Counts for `epoch` (default: the cursor's), measured from the delivery record.

        documents = delivered_once + filtered + unusable + in_flight + returned + remaining + skipped;
        delivered_once and duplicated come from the committed intervals, so a plan bug shows up as
        duplicated > 0 or skipped > 0 instead of being assumed away."""
        e = self.epoch if epoch is None else int(epoch)
        if e in self._finished:
            return dict(self._finished[e])
        rec = self._records.get(e)
        if rec is None:
            raise PlanError(f"accounting(epoch={e}): no record of that epoch")
        committed = rec.committed_rows()
        in_flight, returned = self._rows_in_flight(e)
        remaining = self._remaining(e)
        return {
            "epoch": e,
            "documents": self.documents,
            "delivered_once": committed - rec.filtered - rec.unusable,
            "duplicated": rec.duplicated,
            "skipped": self.documents - committed - in_flight - returned - remaining,
            "filtered": rec.filtered,
            "unusable": rec.unusable,
            "in_flight": in_flight,
            "returned": returned,
            "remaining": remaining,
        }

    def _finish_epochs(self) -> None:
        """Freeze the record of past epochs with nothing left in flight (keeps state small)."""
        for e in sorted(self._records):
            if e >= self.epoch:
                continue
            in_flight, returned = self._rows_in_flight(e)
            if in_flight == 0 and returned == 0:
                self._finished[e] = self.accounting(e)
                del self._records[e]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """JSON-serializable state. Uncommitted (pending) steps are saved as aborted: on resume their ranges
        are served first, in step order, after the already-returned ones. The live plan is not changed."""
        returned = list(self._returned)
        for step in sorted(self._pending):
            drawn = self._pending[step]
            returned.extend(d for rank in sorted(drawn) for d in drawn[rank])
        return {
            "version": PLAN_STATE_VERSION,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": [self._cursor_unit, self._cursor_row],
            "returned": [[e] + r.to_list() for e, r in returned],
            "records": {str(e): rec.to_json() for e, rec in sorted(self._records.items())},
            "finished_epochs": {str(e): acc for e, acc in sorted(self._finished.items())},
            "carry": self.carry,
        }

    def load_state_dict(self, sd: Mapping) -> None:
        if sd.get("version") not in (1, PLAN_STATE_VERSION):
            raise PlanStateMismatch(f"data plan state version {sd.get('version')!r}, expected {PLAN_STATE_VERSION}")
        if sd["fingerprint"] != self.fingerprint:
            raise PlanStateMismatch(
                f"data plan checkpoint was made for a different dataset (shard-list fingerprint "
                f"{sd['fingerprint']}, data.source now gives {self.fingerprint}: files, sizes or row groups "
                "changed); point data.source at the original files or start a fresh run")
        if int(sd["seed"]) != self.seed:
            raise PlanStateMismatch(f"data plan checkpoint used data.seed={sd['seed']}, this run has {self.seed}")
        self._start_epoch(int(sd["epoch"]))
        self._cursor_unit, self._cursor_row = (int(x) for x in sd["cursor"])
        self._returned = collections.deque(
            (int(v[0]), DocRange.from_list(v[1:])) for v in sd["returned"])
        self._pending = {}
        self._records = {int(e): _EpochRecord.from_json(d, self._layout) for e, d in sd["records"].items()}
        self._records.setdefault(self.epoch, _EpochRecord(self._layout))
        self._finished = {int(e): dict(acc) for e, acc in sd["finished_epochs"].items()}
        self.carry = [int(x) for x in sd["carry"]] if sd.get("carry") else None  # states before carries: none


def _as_drop(d) -> tuple[DocRange, str]:
    if isinstance(d, (list, tuple)) and len(d) == 2 and isinstance(d[0], DocRange):
        r, reason = d
    elif isinstance(d, (list, tuple)) and len(d) == 5:
        r, reason = DocRange.from_list(d[:4]), d[4]
    else:
        raise PlanError(f"commit: dropped entries are (DocRange, reason) or [shard, rg, start, stop, reason], got {d!r}")
    if reason not in ("filtered", "unusable"):
        raise PlanError(f"commit: drop reason must be 'filtered' or 'unusable', got {reason!r}")
    return r, reason
