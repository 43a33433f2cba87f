"""One rank's data for one step: its document ranges (or its token-level window) in, packed training rows out.

`StepLoader(shards, cfg, seq_len, ...).load(ranges, window=None, prefetch=None, margin=None) -> StepBatch` is the
one call a trainer makes per step. It reads the step's documents (from what the previous call read ahead,
where it has them), packs them into `seq_len` rows (the window's rows of the step's stream when the step is cut
between ranks at token level), counts the target tokens, and starts reading `prefetch` (the documents the next
step will likely bring, `DataPlan.peek`) plus `margin` (neighbours' rows a re-split may move here,
`datasets.split.read_margin`) in the background while the trainer computes. `ahead_tokens()` then gives the
token count of every row read ahead: what the coordinator re-splits the next step with.

Promises:
- The batch is the same whether its documents come from the read-ahead (a hit, a partial hit after a re-split,
  a wider read) or are read by the call itself (a miss, a failed or lost background read): the read-ahead
  changes when documents are read, never which documents a step trains on.
- A read-ahead failure is dropped: the step that needs the documents reads them again and raises the error
  itself. A read that does not finish within `data.read_timeout_s` raises `ReadTimedOut` (a data error that
  stops the run checkpointed, never a worker that looks hung).
- A window that does not fit the documents' token counts raises `WindowMismatch`: nothing is trained twice or
  skipped; the coordinator retries the step in whole documents.

Where the read-ahead runs (`read_ahead_in`): "process" reads and packs in a child process (off the trainer's
GIL, see `datasets.readahead`); a child that dies costs its read, and after 3 lost in a row the loader reads
ahead in a thread from then on. "thread" reads in a thread of this process. Either way the loader's own reads
run on that same thread, one at a time on the reader.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import logging
import time
from typing import Optional, Sequence

import torch

from datasets.config import DataConfig
from datasets.packing import WindowMismatch, pack, stream_slots
from datasets.plan import DocRange, ShardInfo
from datasets.readahead import ReadAheadProcess, read_and_pack, read_timed_out, wait_read
from datasets.reader import DocBatch, ShardReader, assemble
from datasets.split import Carry, Window, ranges_rows, row_runs, tail_cut
from datasets.tokenizer import Tokenizer

log = logging.getLogger(__name__)

AHEAD_WAIT_S = 10.0  # how long `ahead_tokens` waits for the read-ahead: a step report must not look hung


@dataclasses.dataclass
class StepBatch:
    """One rank's training rows for one step, and what it answers for to the data plan."""
    inputs: torch.Tensor   # LongTensor[rows, seq_len], on the host (not pinned: the trainer moves it)
    targets: torch.Tensor  # LongTensor[rows, seq_len]; -1 where padded or trained by another rank
    tokens: int            # target tokens in `targets` (the step's weight in the sync)
    docs: int              # documents this rank answers for (a window's borrowed document is its owner's)
    dropped: list[list]    # rows consumed but not trained on: [shard, row_group, start, stop, reason] (DataPlan.commit)
    read_s: float          # seconds the call took to have the rows (waiting for the read-ahead included)
    doc_slots: int = 0     # target slots of the documents it answers for (tokens + 1 each): over a run, the
                           # tokens trained by all ranks, carried tails included, add up to this
    carry_out: Optional[Carry] = None  # load(cut=True): the tail of its last document, for the next step


class _ReadAhead:
    """The next step's likely documents (`key`: their ranges) being read in the background."""

    def __init__(self, key: tuple, future: concurrent.futures.Future):
        self.key, self.future = key, future
        self.got = None  # (batch read, batch of `key` alone, its packed inputs, targets) once taken


class StepLoader:
    """Reads, packs and reads ahead one rank's steps (see the module docstring). Not thread-safe: one trainer
    thread calls it."""

    def __init__(self, shards: Sequence[ShardInfo], cfg: DataConfig, seq_len: int, *,
                 tokenizer: Tokenizer | str | None = None, read_ahead_in: str = "thread", name: str = "data"):
        if read_ahead_in not in ("thread", "process"):
            raise ValueError(f"StepLoader: read_ahead_in must be 'thread' or 'process', got {read_ahead_in!r}")
        self.cfg, self.seq_len, self.name = cfg, seq_len, name
        # the reader this process reads with; the child builds its own from the tokenizer's name
        self.reader = ShardReader(shards, cfg.storage_options, tokenizer if tokenizer is not None else cfg.tokenizer,
                                  cfg)
        self.read_ahead_in = read_ahead_in
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-read-ahead")
        self._process = ReadAheadProcess(shards, cfg.storage_options, cfg.tokenizer, cfg, seq_len)
        self._broken = 0  # child processes lost in a row (3: read ahead in a thread from then on)
        self._ahead: _ReadAhead | None = None
        self._last_doc: tuple[DocRange, list[int]] | None = None  # the last load's last document (a carry's)

    def load(self, ranges: Sequence[DocRange], window: Optional[Window] = None,
             prefetch: Optional[Sequence[DocRange]] = None, margin: Optional[Sequence[DocRange]] = None,
             carry: Optional[Carry] = None, cut: bool = False) -> StepBatch:
        """This step's batch: the documents of `ranges` packed into rows, or with `window` that window of the
        step's stream (`window.reads()` are read; `ranges` are then its owned rows). `carry`: the stream starts
        with the tail of the previous step's last document (`Carry`). `cut`: where the stream would end in a
        padded row and that row holds only the tail of the last document, stop after the last full row and
        return that tail as `carry_out` (the next step's `carry`). Then starts reading `prefetch` and `margin`
        ahead for the next call. Raises the reader's error (`DataSourceError`, `ReadTimedOut`) or
        `WindowMismatch`."""
        if window is not None and (carry is not None or cut):
            raise ValueError("StepLoader.load: a token-level window does not take a carried tail or a cut "
                             "(the coordinator sends one or the other)")
        t0 = time.time()
        carry_out = None
        if carry is not None or cut:
            batch, inputs, targets, carry_out = self._carried(list(ranges), carry, cut)
        else:
            batch, packed = self._read(window.reads() if window is not None else list(ranges))
            if window is not None:
                batch, inputs, targets = self._window(batch, packed, window)
            elif packed is not None:
                inputs, targets = packed
            else:
                inputs, targets = pack(batch.docs, self.seq_len, self.reader.eot)
        self._last_doc = (batch.origins[-1], batch.docs[-1]) if batch.docs else None
        read_s = time.time() - t0
        self._read_ahead(prefetch, margin)  # overlaps the step's compute
        return StepBatch(inputs, targets, int((targets >= 0).sum()), len(batch.docs), batch.dropped_json(), read_s,
                         stream_slots(batch.docs), carry_out)

    def read_ahead(self, prefetch: Sequence[DocRange], margin: Optional[Sequence[DocRange]] = None) -> None:
        """Start reading `prefetch` (and `margin`) for the next `load`, as `load(..., prefetch, margin)` would
        have: for a trainer that loaded this step's rows before it knew the next step's (it computes a step
        ahead of its call). Replaces any read-ahead not yet taken."""
        self._read_ahead(prefetch, margin)

    def ahead_tokens(self, timeout: float = AHEAD_WAIT_S) -> list[list[int]] | None:
        """Token counts of the documents the last `load` reads ahead, per row ([shard, row_group, row, tokens];
        0 for a row that yields no document), margin rows included: what the coordinator balances the next
        step's split with. None without a read-ahead, if it failed, or if it is not done within `timeout`."""
        if self._ahead is None:
            return None
        # usually done long before the step's exchange is; waiting keeps the split deterministic, but a slow
        # source must not make the step's report late enough to look like a hang
        got = self._ahead_result(self._ahead, timeout=timeout)
        if got is None:
            return None
        batch = got[0]
        return ([[o.shard, o.row_group, o.start, len(d)] for o, d in zip(batch.origins, batch.docs)]
                + [[r.shard, r.row_group, x, 0] for r, _ in batch.dropped for x in range(r.start, r.stop)])

    def child_pid(self) -> int | None:
        """The read-ahead child's process id, None while no child runs (for logs and fault tests)."""
        return self._process.pid()

    def close(self) -> None:
        """Stop the read-ahead child and thread, and the reader's I/O threads; the loader is done."""
        self._ahead = None
        self._process.close()
        self._thread.shutdown(wait=False, cancel_futures=True)
        self.reader.close()

    # ---- reading ---------------------------------------------------------------------------
    def _read(self, ranges: list[DocRange]) -> tuple[DocBatch, tuple[torch.Tensor, torch.Tensor] | None]:
        """The batch of `ranges`, and its packed rows when the read-ahead packed exactly these ranges: from the
        background read where it fetched them (all, or a part when the coordinator moved a few documents
        between ranks to balance rows: only the rest is read now)."""
        limit = self.cfg.read_timeout_s  # a stalled store stops the run (data error), never looks hung
        deadline = time.monotonic() + limit
        ahead, self._ahead = self._ahead, None
        batch = None
        if ahead is not None:
            # waits: never two reads at once on the reader
            got = self._ahead_result(ahead, timeout=max(0.0, deadline - time.monotonic()))
            if got is None and not ahead.future.done():
                raise read_timed_out("reading a step's documents", self.cfg.source, self.cfg.storage_options, limit)
            if got is not None:
                batch, core, inputs, targets = got  # batch: all it read; core: the hinted ranges alone, packed
                if ahead.key == tuple(ranges):
                    return core, (torch.as_tensor(inputs), torch.as_tensor(targets))
        if batch is not None:
            rows = {(r.shard, r.row_group, x) for r in ranges for x in range(r.start, r.stop)}
            n_rows = ranges_rows(ranges)
            if len(rows) == n_rows:  # rows name documents (see DataPlan.resplit)
                got, missing = assemble([batch], ranges)
                if missing and len(missing) < n_rows:
                    got, missing = assemble([batch, self._read_now(row_runs(missing), deadline)], ranges)
                if not missing:
                    return got, None
        return self._read_now(ranges, deadline), None

    def _read_now(self, ranges: list[DocRange], deadline: float) -> DocBatch:
        """`reader.read_batch(ranges)` by `deadline` (time.monotonic; `data.read_timeout_s`), else
        `ReadTimedOut`. On the read-ahead thread: one read at a time on the reader."""
        return wait_read(self._thread.submit(self.reader.read_batch, ranges), deadline - time.monotonic(),
                         source=self.cfg.source, storage_options=self.cfg.storage_options,
                         limit_s=self.cfg.read_timeout_s)

    def _carried(self, ranges: list[DocRange], carry: Optional[Carry], cut: bool
                 ) -> tuple[DocBatch, torch.Tensor, torch.Tensor, Optional[Carry]]:
        """(batch of `ranges`, inputs, targets, carry_out) for `load` with a carried tail and/or a cut. The
        carried document comes from the last load where it was its last document, else it is read again."""
        batch, _ = self._read(ranges)
        docs, skip = list(batch.docs), 0
        if carry is not None:
            tail = self._carried_doc(carry)
            if not 0 < carry.skip < len(tail) + 1 or carry.slots not in (0, len(tail) + 1):
                raise WindowMismatch(f"the carried tail of {carry.doc} starts {carry.skip} slots in"
                                     f"{f' of {carry.slots}' if carry.slots else ''}, but that document has "
                                     f"{len(tail) + 1}")
            docs, skip = [tail] + docs, carry.skip
        slots = stream_slots(docs) - skip
        rows = -(-slots // self.seq_len)
        carry_out = None
        last = len(batch.docs[-1]) + 1 if batch.docs else 0
        at = tail_cut(slots, last, self.seq_len) if cut and last else None
        if at is not None:
            rows, carry_out = at[0], Carry(batch.origins[-1], at[1], last)
        inputs, targets = pack(docs, self.seq_len, self.reader.eot, skip=skip, rows=rows) if slots > 0 else \
            pack([], self.seq_len, self.reader.eot)
        return batch, inputs, targets, carry_out

    def _carried_doc(self, carry: Carry) -> list[int]:
        if self._last_doc is not None and self._last_doc[0] == carry.doc:
            return self._last_doc[1]
        got = self._read_now([carry.doc], time.monotonic() + self.cfg.read_timeout_s)
        if not got.docs:
            raise WindowMismatch(f"the carried document {carry.doc} yields no document here")
        return got.docs[0]

    def _window(self, batch: DocBatch, packed, window: Window) -> tuple[DocBatch, torch.Tensor, torch.Tensor]:
        """This rank's rows of a step cut at token level: the window of the stream of the borrowed document
        and its own ones. Returns (the batch of its own rows, inputs, targets); WindowMismatch if the
        documents do not have the token counts the window was cut for."""
        if (packed is not None and window.skip == 0 and packed[0].size(0) == window.rows
                and stream_slots(batch.docs) == window.slots):
            inputs, targets = packed  # the read-ahead packed exactly this
        else:
            inputs, targets = pack(batch.docs, self.seq_len, self.reader.eot, skip=window.skip, rows=window.rows,
                                   expect_slots=window.slots)
        if window.borrow is not None:  # trained here in part, answered for (counted, committed) by its owner
            b = window.borrow
            if not batch.origins or batch.origins[0] != DocRange(b.shard, b.row_group, b.start, b.start + 1):
                raise WindowMismatch(f"the window borrows {b}, which yielded no document here")
            batch = dataclasses.replace(batch, docs=batch.docs[1:], origins=batch.origins[1:])
        return batch, inputs, targets

    # ---- reading ahead ---------------------------------------------------------------------
    def _read_ahead(self, ranges: Optional[Sequence[DocRange]], margin: Optional[Sequence[DocRange]]) -> None:
        """Start reading `ranges` and `margin` and packing `ranges` in the background. A failure is dropped
        here: the step that needs these documents reads them again and reports it."""
        if not ranges:
            return
        core = list(ranges)
        read = core + list(margin or [])
        future = None
        if self.read_ahead_in == "process":
            try:
                future = self._process.submit(read, core)
            except Exception:
                self._child_lost()
        if future is None:
            future = self._thread.submit(read_and_pack, self.reader, read, core, self.seq_len)
        self._ahead = _ReadAhead(tuple(core), future)

    def _ahead_result(self, ahead: _ReadAhead, timeout: float | None = None):
        """(batch, core batch, inputs, targets) of a read-ahead (the packed rows as numpy arrays when they
        come from the child), or None if it failed or is not done in `timeout`."""
        if ahead.got is not None:
            return ahead.got
        try:
            got = ahead.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return None
        except concurrent.futures.process.BrokenProcessPool:
            self._child_lost()
            return None
        except Exception:
            log.debug("%s: background read of the next step's documents failed", self.name, exc_info=True)
            return None
        ahead.got = got
        self._broken = 0
        return got

    def _child_lost(self) -> None:
        self._process.close()
        self._broken += 1
        if self._broken >= 3:
            log.warning("%s: the read-ahead process died 3 times in a row; reading ahead in a thread from now on",
                        self.name)
            self.read_ahead_in = "thread"
