"""How one step's rows are split between ranks: by whole documents (`balanced_split`, `rebalance`) or at token
level (`split_windows`, `windows_for`), and which neighbouring rows a rank reads ahead for a re-split
(`read_margin`).

Pure functions of (rows in order, each row's token count, per-rank shares, seq_len): no I/O, no state. The epoch
cursor that draws the rows is `datasets.plan.DataPlan`; it records a split with `DataPlan.resplit`.

Promises: a split hands every row of the step to exactly one rank, in order (contiguous runs per rank); a set of
`Window`s covers every target slot of the step's packed stream exactly once.
"""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterable, Mapping, Optional, Sequence

from datasets.plan import DocRange


def ranges_rows(ranges: Iterable[DocRange]) -> int:
    """Number of documents in `ranges`."""
    return sum(len(r) for r in ranges)


def packed_rows(slots: int, seq_len: int) -> int:
    """Training rows `datasets.pack` makes of documents needing `slots` target slots (t + 1 per document)."""
    return -(-slots // seq_len)


def _slots(docs: Sequence[tuple[DocRange, int]]) -> list[int]:
    """Target slots per row: t + 1 for a document of t tokens, 0 for a row that yields none."""
    return [t + 1 if t > 0 else 0 for _, t in docs]


def balanced_split(docs: Sequence[tuple[DocRange, int]], shares: Sequence[float], seq_len: int) -> list[int]:
    """Cut points for a step's rows (in order, one row each with its token count; 0 for a row that yields
    no document): rank r gets rows [cuts[r-1], cuts[r]). Contiguous runs whose packed training rows are as
    nearly in proportion to `shares` as whole documents allow (the largest rows / share is minimal; a
    document of t tokens takes t + 1 target slots). Every rank gets at least one row while rows remain."""
    n, W = len(docs), len(shares)
    if W == 0:
        return []
    if n <= W:
        return [min(n, r + 1) for r in range(W)]
    mean = sum(shares) / W
    weight = [s / mean for s in shares]
    prefix = list(accumulate(_slots(docs), initial=0))

    def rows(i: int, j: int) -> int:  # packed rows of rows [i, j)
        return packed_rows(prefix[j] - prefix[i], seq_len)

    def cuts_at(lam: float) -> list[int] | None:
        """Cut points keeping every rank r within lam * weight_r packed rows (at least one row each), or
        None: which end positions each prefix of ranks can reach, then a walk back from n."""
        caps = [math.floor(lam * w + 1e-9) for w in weight]
        layers = [[True] + [False] * n]
        for r in range(W):
            reach, mark, j = layers[-1], [0] * (n + 2), 0
            for i in range(n):
                j = max(j, i)
                while j < n and rows(i, j + 1) <= caps[r]:
                    j += 1
                if reach[i] and j > i:  # ends i+1..j are reachable from i
                    mark[i + 1] += 1
                    mark[j + 1] -= 1
            nxt, run = [False] * (n + 1), 0
            for k in range(n + 1):
                run += mark[k]
                nxt[k] = run > 0
            layers.append(nxt)
        if not layers[W][n]:
            return None
        cuts, pos = [n], n
        for r in range(W - 1, 0, -1):
            pos = max(i for i in range(pos) if layers[r][i] and rows(i, pos) <= caps[r])
            cuts.insert(0, pos)
        return cuts

    # feasibility only changes where some cap floor(lam * w_r) steps up, at lam = k / w_r: search those values
    # for the least feasible one. Below the first whose caps add up to the step's packed rows nothing fits;
    # whole documents usually fit within a candidate or two of it, so try those first, then bisect the rest.
    need = packed_rows(prefix[-1], seq_len)
    cands = sorted({k / w for w in weight for k in range(1, need + 2)})
    lo, hi = 0, len(cands) - 1
    while lo < hi:  # the first candidate whose caps could hold `need` rows
        mid = (lo + hi) // 2
        if sum(math.floor(cands[mid] * w + 1e-9) for w in weight) >= need:
            hi = mid
        else:
            lo = mid + 1
    for i in range(lo, min(lo + 2, len(cands))):
        c = cuts_at(cands[i])
        if c is not None:
            return c
    lo, hi = min(lo + 2, len(cands) - 1), len(cands) - 1
    best = cuts_at(cands[hi])  # every rank may take every row: feasible
    while lo < hi:
        mid = (lo + hi) // 2
        c = cuts_at(cands[mid])
        if c is None:
            lo = mid + 1
        else:
            best, hi = c, mid
    return best


def split_cost(docs: Sequence[tuple[DocRange, int]], cuts: Sequence[int], shares: Sequence[float],
               seq_len: int) -> float:
    """The largest packed rows / share of a split (what a step waits for: its slowest rank)."""
    mean = sum(shares) / len(shares)
    slots = _slots(docs)
    prev, worst = 0, 0.0
    for r, c in enumerate(cuts):
        rows = packed_rows(sum(slots[prev:c]), seq_len)
        worst = max(worst, rows * mean / shares[r])
        prev = c
    return worst


def rebalance(assignment: Mapping[int, Sequence[DocRange]], tokens: Mapping[tuple[int, int, int], int],
              shares: Mapping[int, float], seq_len: int) -> dict[int, list[DocRange]] | None:
    """A better split of one step's `assignment` (rank -> ranges, drawn in rank order) given every row's
    token count (`tokens[(shard, row_group, row)]`, 0 for a row that yields no document): the
    `balanced_split` of its rows in rank order, or None when it would not lower the slowest rank's packed
    rows / share, or some row's count is unknown."""
    order = sorted(assignment)
    docs = _counted_rows(assignment, tokens) if len(order) > 1 else None
    if docs is None:
        return None
    sh = [shares[k] for k in order]
    cuts, n = [], 0
    for k in order:
        n += ranges_rows(assignment[k])
        cuts.append(n)
    new_cuts = balanced_split(docs, sh, seq_len)
    if split_cost(docs, new_cuts, sh, seq_len) >= split_cost(docs, cuts, sh, seq_len):
        return None
    return {k: row_runs([d for d, _ in docs[a:b]]) for k, a, b in zip(order, [0] + new_cuts[:-1], new_cuts)}


def _counted_rows(assignment: Mapping[int, Sequence[DocRange]], tokens: Mapping[tuple[int, int, int], int]
                  ) -> list[tuple[DocRange, int]] | None:
    """A step's rows in rank order, one row each with its token count; None if some row's count is unknown."""
    docs = [(DocRange(r.shard, r.row_group, x, x + 1), tokens.get((r.shard, r.row_group, x)))
            for k in sorted(assignment) for r in assignment[k] for x in range(r.start, r.stop)]
    return None if any(t is None for _, t in docs) else docs


def read_margin(hint: Mapping[int, Sequence[DocRange]], rows: int) -> dict[int, list[DocRange]]:
    """For each rank of a read-ahead `hint` (rank -> ranges, in rank order), the rows next to its own that a
    re-split may hand it: up to `rows` rows at the near end of each neighbour's ranges (`rebalance` only
    moves documents across the cuts between neighbouring ranks). Read ahead with the rank's own rows, they
    make such a step a hit instead of a read on the critical path."""
    order = sorted(hint)
    flat = {k: [DocRange(r.shard, r.row_group, x, x + 1) for r in hint[k] for x in range(r.start, r.stop)]
            for k in order}
    out: dict[int, list[DocRange]] = {}
    for i, k in enumerate(order):
        extra = flat[order[i - 1]][-rows:] if i > 0 and rows > 0 else []
        if i + 1 < len(order) and rows > 0:
            extra = extra + flat[order[i + 1]][:rows]
        out[k] = row_runs(extra)
    return out


def row_runs(rows: Sequence[DocRange]) -> list[DocRange]:
    """Consecutive one-row ranges merged into runs."""
    out: list[DocRange] = []
    for d in rows:
        if out and out[-1].shard == d.shard and out[-1].row_group == d.row_group and out[-1].stop == d.start:
            out[-1] = DocRange(d.shard, d.row_group, out[-1].start, d.stop)
        else:
            out.append(d)
    return out


@dataclass(frozen=True)
class Window:
    """One rank's part of a step cut at token level (`split_windows`).

    The rank reads `borrow` (if any) and then `owned`, packs their stream (`EOT d EOT d ... EOT`) and trains
    on the `rows` rows that start `skip` target slots into it. `owned` are the rows it answers for (the plan's
    split, drop reports); `borrow` is the document before them whose tail falls into this window (its head
    is trained by an earlier rank). `slots` is the stream's length the cut was made for (a check)."""
    owned: tuple[DocRange, ...]
    borrow: Optional[DocRange]
    skip: int
    rows: int
    slots: int

    def reads(self) -> list[DocRange]:
        """Rows to read, in stream order."""
        return ([self.borrow] if self.borrow is not None else []) + list(self.owned)

    def to_json(self) -> dict:
        return {"owned": [r.to_list() for r in self.owned], "borrow": self.borrow.to_list() if self.borrow else None,
                "skip": self.skip, "rows": self.rows, "slots": self.slots}

    @classmethod
    def from_json(cls, d: Mapping) -> "Window":
        return cls(owned=tuple(DocRange.from_list(r) for r in d["owned"]),
                   borrow=DocRange.from_list(d["borrow"]) if d.get("borrow") else None,
                   skip=int(d["skip"]), rows=int(d["rows"]), slots=int(d["slots"]))


@dataclass(frozen=True)
class Carry:
    """The tail of a step's last document, trained at the start of the next step (`StepLoader.load(cut=True)`):
    a step that would end in a padded row stops after its last full row instead, where that cut falls inside
    its last document. The document is the earlier step's (counted, committed and delivered with it); the
    next step reads it again and trains its target slots from `skip` on (`skip` of them were trained) to
    `slots` (its tokens + 1; 0 where unknown: a carry recorded before the count was kept). A group's steps are
    cut the same way by `cut_step`, which starts rank 0's window with the carried tail.
    `DataPlan.commit(step, carry=...)` keeps it as part of the plan's state (journal, checkpoints)."""
    doc: DocRange  # one row: the document
    skip: int
    slots: int = 0

    def to_list(self) -> list[int]:
        return [self.doc.shard, self.doc.row_group, self.doc.start, self.skip, self.slots]

    @classmethod
    def from_list(cls, v: Sequence[int]) -> "Carry":
        shard, row_group, row, skip, *slots = (int(x) for x in v)
        return cls(DocRange(shard, row_group, row, row + 1), skip, slots[0] if slots else 0)


def tail_cut(slots: int, last_slots: int, seq_len: int, min_rows: int = 1) -> tuple[int, int] | None:
    """Where a stream of `slots` target slots, ending with a document of `last_slots`, can stop on a full row
    and leave that document's tail to the next step (`Carry`): (rows, slots of the last document trained), or
    None where the stream ends on a full row, the padded row would hold more than the last document's tail,
    or fewer than `min_rows` full rows remain."""
    full, left = divmod(slots, seq_len)
    if full >= min_rows and 0 < left < last_slots:
        return full, last_slots - left
    return None


def row_shares(n_rows: int, shares: Sequence[float]) -> list[int] | None:
    """`n_rows` training rows over ranks in proportion to `shares`: at least one each, the largest rows / share
    as small as whole rows allow (ties to the lower rank). None if there are fewer rows than ranks."""
    W = len(shares)
    if W == 0 or n_rows < W or any(s <= 0 for s in shares):
        return None
    counts = [1] * W
    heap = [(2 / s, r) for r, s in enumerate(shares)]  # (rows / share if it took one more, rank)
    heapq.heapify(heap)
    for _ in range(n_rows - W):
        _, r = heapq.heappop(heap)
        counts[r] += 1
        heapq.heappush(heap, ((counts[r] + 1) / shares[r], r))
    return counts


def split_windows(docs: Sequence[tuple[DocRange, int]], shares: Sequence[float], seq_len: int) -> list[Window] | None:
    """Cut one step's stream of documents between ranks at token level (a document at a cut is split).

    `docs`: the step's rows in order (one row each) with their token counts, 0 for a row that yields no
    document. Rank r gets `row_shares` rows of the step's packed stream (ceil(slots / seq_len) rows in all,
    only the very last one padded), so ranks carry rows in proportion to `shares` instead of in whole
    documents. Every target slot of the stream falls in exactly one window; every row is owned by exactly one
    rank (the one whose window holds the slot predicting its first token; a row with no document: where its
    position falls). None when the step has fewer rows than ranks (whole documents then)."""
    got = cut_step(docs, shares, seq_len)
    return got[0] if got is not None else None


def cut_step(docs: Sequence[tuple[DocRange, int]], shares: Sequence[float], seq_len: int,
             carry: Optional[Carry] = None, cut: bool = False) -> tuple[list[Window], Optional[Carry]] | None:
    """`split_windows`, with the stream starting with the carried tail of the previous step's last document
    (`carry`, whose `slots` must be known: rank 0's window borrows it) and, with `cut`, ending after the last
    full row where the padded row would hold only the tail of the step's last document: that tail is
    returned as the carry for the next step. Returns (windows, carry or None); None as `split_windows`."""
    W = len(shares)
    if carry is not None and not 0 < carry.skip < carry.slots:
        raise ValueError(f"cut_step: carry {carry} needs 0 < skip < slots")
    entries = ([(carry.doc, carry.slots - 1)] if carry is not None else []) + list(docs)
    base = 1 if carry is not None else 0  # entries[0] is the carried document: nobody here owns it
    slots = _slots(entries)
    starts = list(accumulate(slots, initial=0))
    begin = carry.skip if carry is not None else 0
    total = starts[-1] - begin
    n_rows, carry_out = packed_rows(total, seq_len), None
    last = max((i for i in range(base, len(entries)) if slots[i]), default=None)
    at = tail_cut(total, slots[last], seq_len, min_rows=W) if cut and last is not None else None
    if at is not None:
        n_rows, carry_out = at[0], Carry(entries[last][0], at[1], slots[last])
    counts = row_shares(n_rows, shares) if total > 0 else None
    if counts is None:
        return None
    end = begin + n_rows * seq_len if carry_out is not None else starts[-1]
    bounds = [begin]
    for c in counts:
        bounds.append(min(end, bounds[-1] + c * seq_len))
    # rank r owns the rows starting in [bounds[r], bounds[r+1]) (the last rank also those at the very end):
    # contiguous runs, since starts never decrease
    first = [bisect.bisect_left(starts, bounds[r], base, len(entries)) for r in range(W)] + [len(entries)]
    # last_doc: the latest row so far that yields a document (the carried one first: rank 0 borrows it)
    out, last_doc, docs = [], 0 if carry is not None else None, entries
    for r in range(W):
        lo, hi = first[r], first[r + 1]
        # the document whose span holds this window's first slot, if it started in an earlier window
        borrow = last_doc if last_doc is not None and starts[last_doc] + slots[last_doc] > bounds[r] else None
        own = [i for i in range(lo, hi) if slots[i]]
        out.append(Window(owned=tuple(row_runs([docs[i][0] for i in range(lo, hi)])),
                          borrow=docs[borrow][0] if borrow is not None else None,
                          skip=bounds[r] - starts[borrow] if borrow is not None else 0, rows=counts[r],
                          slots=sum(slots[i] for i in own) + (slots[borrow] if borrow is not None else 0)))
        last_doc = own[-1] if own else last_doc
    return out, carry_out


def windows_for(assignment: Mapping[int, Sequence[DocRange]], tokens: Mapping[tuple[int, int, int], int],
                shares: Mapping[int, float], seq_len: int, carry: Optional[Carry] = None, cut: bool = False
                ) -> tuple[dict[int, Window], Optional[Carry]] | None:
    """`cut_step` of one step's `assignment` (rank -> ranges, drawn in rank order) given every row's token count:
    (rank -> window, the carry it leaves); None for a single rank, a row whose count is unknown, or fewer
    packed rows than ranks."""
    order = sorted(assignment)
    docs = _counted_rows(assignment, tokens) if len(order) > 1 else None
    got = cut_step(docs, [shares[k] for k in order], seq_len, carry, cut) if docs is not None else None
    return (dict(zip(order, got[0])), got[1]) if got is not None else None
