"""Reading the next step's documents in a child process, off the trainer's GIL.

A trainer that reads ahead in a thread of its own process shares the GIL with the thread that launches
its GPU kernels: at small steps (GPT-2-small at 8k tokens per GPU) the launch is about as long as the GPU's
work, so every slice the reader takes (parquet decode, tokenizer output into Python lists, packing) delays
the step, by more than the read it hides (docs/BENCHMARKS.md, session 7). In a child process the read costs
the trainer only the unpickling of the result.

`wait_read(future, timeout_s, ...)` bounds how long a step waits for its documents (`data.read_timeout_s`): a
store that stalls (answers nothing, keeps connections open) ends in `ReadTimedOut` naming the source and the
option, which stops the run checkpointed, instead of a worker that looks hung and is killed.

`ReadAheadProcess(shards, storage_options, tokenizer, cfg, seq_len).submit(read, core)` returns a Future of
`(batch, core_batch, inputs, targets)`: `ShardReader.read_batch(read)`, the part of it that is `core` (what
`read_batch(core)` gives) and `pack(core_batch.docs, seq_len, eot)`, the packed rows as numpy arrays
(documents too: int32 arrays, which unpickle without building an int object per token). The child is
spawned (never forked: the parent may hold threads and a CUDA context) on the first submit, builds its own
`ShardReader`, and exits with its parent. A failed read raises from the Future like the reader would; a dead
child gives `BrokenProcessPool` there.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import multiprocessing
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from datasets.config import DataConfig
from datasets.packing import pack
from datasets.plan import DocRange, ShardInfo
from datasets.sources import DataSourceUnavailable, endpoint_of, redact


class ReadTimedOut(DataSourceUnavailable):
    """A step's documents did not arrive within `data.read_timeout_s` (the store is stalled or too slow)."""


def wait_read(future: concurrent.futures.Future, timeout_s: float, *, source: str,
              storage_options: Optional[Mapping[str, Any]], limit_s: float, what: str = "reading a step's documents"):
    """`future.result()` within `timeout_s` seconds (what is left of the step's `limit_s` =
    `data.read_timeout_s`), else `ReadTimedOut` naming the source, its endpoint and the option."""
    try:
        return future.result(timeout=max(0.0, timeout_s))
    except concurrent.futures.TimeoutError:
        raise read_timed_out(what, source, storage_options, limit_s) from None


def read_timed_out(what: str, source: str, storage_options: Optional[Mapping[str, Any]],
                   limit_s: float) -> ReadTimedOut:
    ep = endpoint_of(source, storage_options)
    return ReadTimedOut(redact(f"{source}: {what} took longer than data.read_timeout_s={limit_s:g}s (endpoint "
                               f"{ep} stalled or too slow); check the store, or raise data.read_timeout_s",
                               storage_options))

_READER = None  # the child's ShardReader
_SEQ_LEN = 0


def _start_child(shards, storage_options, tokenizer: str, cfg: DataConfig, seq_len: int) -> None:
    global _READER, _SEQ_LEN
    from datasets.reader import ShardReader

    _READER = ShardReader(shards, storage_options, tokenizer, cfg)
    _SEQ_LEN = seq_len


def read_and_pack(reader, read: Sequence[DocRange], core: Sequence[DocRange], seq_len: int):
    """What a read-ahead produces, in a thread or in the child: `reader.read_batch(read)`, the part of it that
    is `core` (what `read_batch(core)` gives) and `pack(core_batch.docs, seq_len, eot)`."""
    from datasets.reader import assemble

    batch = reader.read_batch(read)
    core_batch = batch if len(read) == len(core) else assemble([batch], core)[0]
    return (batch, core_batch, *pack(core_batch.docs, seq_len, reader.eot))


def _read_and_pack(read: list[DocRange], core: list[DocRange]):
    batch, core_batch, inputs, targets = read_and_pack(_READER, read, core, _SEQ_LEN)
    # numpy, not lists of Python ints: the parent unpickles a memcpy per document instead of building one int
    # object per token in its result thread, which holds the GIL while the trainer launches kernels
    # (core's documents are batch's own objects: convert each once, and pickling sends each once)
    arrays = {id(d): np.asarray(d, dtype=np.int32) for d in batch.docs}
    batch = dataclasses.replace(batch, docs=[arrays[id(d)] for d in batch.docs])
    core_batch = dataclasses.replace(core_batch, docs=[arrays[id(d)] for d in core_batch.docs])
    return batch, core_batch, inputs.numpy(), targets.numpy()


class ReadAheadProcess:
    """One child process that reads and packs `DocRange`s on request (see the module docstring)."""

    def __init__(self, shards: Sequence[ShardInfo], storage_options: Optional[Mapping[str, Any]], tokenizer: str,
                 cfg: DataConfig, seq_len: int):
        self._args = (list(shards), dict(storage_options or {}), tokenizer, cfg, seq_len)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def submit(self, read: Sequence[DocRange], core: Sequence[DocRange] | None = None) -> concurrent.futures.Future:
        """Read `read`; pack the part of it that is `core` (default: all of it)."""
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child, initargs=self._args)
        try:
            return self._pool.submit(_read_and_pack, list(read), list(core if core is not None else read))
        except concurrent.futures.process.BrokenProcessPool:
            self.close()  # the child died: the next submit starts a new one
            raise

    def pid(self) -> int | None:
        """The child's process id, None while no child runs."""
        procs = list(getattr(self._pool, "_processes", None) or {})  # the executor's {pid: process}
        return procs[0] if procs else None

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
