"""Bit-exact fingerprints of parameter sets, computed on the device that holds them.

The raw bits of all parameters of one element size, read as integers in parameter order (one stream),
are multiplied by a position-dependent odd weight and summed in int64. Integer addition wraps mod 2^64
and is associative, so the sum is the same whatever order a CPU or GPU reduces in: two replicas get the
same fingerprint exactly when their bits agree (one differing element always changes the sum: its
difference times an odd weight is never 0 mod 2^64). Shapes are hashed too.

Cost: this runs on every worker after every `train.fingerprint_every`-th committed step (auto: every step on CPU,
every 10th on CUDA, where a compiled step of 8k tokens is ~20 ms) and at every commit the coordinator waits on
(before a checkpoint, a membership change, the end). On CUDA with Triton, one kernel reads every
parameter once (through a per-block table of tensor offsets) and writes one partial sum per block, where
the torch ops' int64 temporaries move ~100 bytes per element (both timed in docs/BENCHMARKS.md). The
torch path (CPU, or no Triton) works on the parameters concatenated in chunks of up to `CHUNK` elements (a
handful of kernels per chunk) rather than ~10 kernels per tensor. Both give the same sums (wrapping int64
addition in any order). Only one int64 per element size leaves the device.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

import torch

try:  # Triton ships with CUDA builds of torch; without it the torch ops below run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_INT_VIEW = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}
_MULT = 0x9E3779B97F4A7C15 - (1 << 64)  # golden-ratio constant as a signed int64
_SALT = 0x5BD1E995
CHUNK = 1 << 25  # elements per concatenated piece (~0.5 GB of int64 temporaries at most)


def _weighted_sum(bits: torch.Tensor, start: int) -> torch.Tensor:
    """sum_i (bits_i + salt) * ((2 (start + i) + 1) * MULT), wrapping int64."""
    b = bits.to(torch.int64)
    w = torch.arange(start, start + b.numel(), device=b.device, dtype=torch.int64)
    w.mul_(2).add_(1).mul_(_MULT)
    return b.add_(_SALT).mul_(w).sum()


def _ints(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(_INT_VIEW[t.element_size()])


def tensor_fingerprint(t: torch.Tensor) -> int:
    return int(_weighted_sum(_ints(t), 0).item())


def _stream_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Weighted sum over the concatenation of `tensors` (same element size), CHUNK elements at a time."""
    device = tensors[0].device
    total = torch.zeros((), dtype=torch.int64, device=device)
    pos, batch, batch_n = 0, [], 0

    def flush():
        nonlocal pos, batch, batch_n, total
        if batch:
            flat = batch[0] if len(batch) == 1 else torch.cat(batch)
            total = total + _weighted_sum(flat, pos)
            pos += batch_n
            batch, batch_n = [], 0

    for t in tensors:
        v = _ints(t).to(device)
        off = 0
        while off < v.numel():  # split tensors larger than a chunk
            take = min(v.numel() - off, CHUNK - batch_n)
            batch.append(v[off:off + take])
            batch_n += take
            off += take
            if batch_n >= CHUNK:
                flush()
    flush()
    return total


BLOCK = 4096  # elements per program of the Triton kernel

if triton is not None:

    @triton.jit
    def _fingerprint_kernel(base_ptr, blk_tensor, blk_off, t_delta, t_numel, t_start, partial_ptr, mult, salt,
                            BLOCK: tl.constexpr):
        """partial[pid] = sum over this block's elements of (bits + salt) * ((2 * position + 1) * mult),
        wrapping int64; `base_ptr` is the first tensor's integer view, the others sit `t_delta` elements
        from it."""
        pid = tl.program_id(0)
        t = tl.load(blk_tensor + pid)
        off = tl.load(blk_off + pid) + tl.arange(0, BLOCK)
        ok = off < tl.load(t_numel + t)
        bits = tl.load(base_ptr + tl.load(t_delta + t) + off, mask=ok, other=0).to(tl.int64)
        w = ((tl.load(t_start + t) + off) * 2 + 1) * mult
        tl.store(partial_ptr + pid, tl.sum(tl.where(ok, (bits + salt) * w, 0), 0))


class _BlockTable:
    """Where each kernel block reads: its tensor and offset, the tensors' addresses relative to the first
    and their positions in the stream. Built once per set of tensors (parameters do not move)."""

    def __init__(self, views: list[torch.Tensor]):
        elsize = views[0].element_size()
        base = views[0].data_ptr()
        numels = [v.numel() for v in views]
        starts = [0]
        for n in numels[:-1]:
            starts.append(starts[-1] + n)
        blk_t, blk_o = [], []
        for i, n in enumerate(numels):
            nb = -(-n // BLOCK)
            blk_t.append(torch.full((nb,), i, dtype=torch.int32))
            blk_o.append(torch.arange(nb, dtype=torch.int64) * BLOCK)
        dev = views[0].device
        self.blk_tensor = torch.cat(blk_t).to(dev)
        self.blk_off = torch.cat(blk_o).to(dev)
        if any((v.data_ptr() - base) % elsize for v in views):
            raise ValueError("fingerprint: tensors not aligned to their element size relative to each other")
        self.t_delta = torch.tensor([(v.data_ptr() - base) // elsize for v in views], dtype=torch.int64).to(dev)
        self.t_numel = torch.tensor(numels, dtype=torch.int64).to(dev)
        self.t_start = torch.tensor(starts, dtype=torch.int64).to(dev)
        self.partial = torch.empty(self.blk_tensor.numel(), dtype=torch.int64, device=dev)


_TABLES: dict[tuple, _BlockTable] = {}


def triton_usable(device: torch.device) -> bool:
    """Whether the one-kernel path runs for tensors on `device` (CUDA with Triton, or Triton's interpreter)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def triton_stream_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`_stream_sum` in one kernel launch (same value). The tensors share a device and an element size."""
    views = [_ints(t) for t in tensors]
    key = (views[0].dtype,) + tuple((v.data_ptr(), v.numel()) for v in views)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 16:  # a few live parameter sets per process; forget the rest
            _TABLES.clear()
        table = _TABLES[key] = _BlockTable(views)
    _fingerprint_kernel[(table.blk_tensor.numel(),)](
        views[0], table.blk_tensor, table.blk_off, table.t_delta, table.t_numel, table.t_start, table.partial,
        _MULT, _SALT, BLOCK=BLOCK, num_warps=4)
    return table.partial.sum()


def _one_device(tensors: list[torch.Tensor]) -> bool:
    return len({t.device for t in tensors}) == 1


class PendingFingerprint:
    """A fingerprint whose sums are still on their way from the device: `params_fingerprint_async` queues
    the kernels and a copy to pinned host memory and returns at once; `result()` waits for that copy only.
    A worker starts one right after it commits and reads it once the next forward/backward has synced, so
    the host never stalls on it."""

    def __init__(self, sizes: list[int], sums: torch.Tensor, shapes: list[tuple], event=None):
        self.sizes, self._sums, self.shapes, self._event = sizes, sums, shapes, event
        self._value: str | None = None

    def result(self) -> str:
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            h = hashlib.sha256()
            for s, total in zip(self.sizes, self._sums.tolist()):
                h.update(s.to_bytes(1, "little"))
                h.update(int(total).to_bytes(8, "little", signed=True))
            for shape in self.shapes:
                h.update(str(shape).encode())
            self._value = h.hexdigest()[:16]
            self._sums = None
        return self._value

    @classmethod
    def ready(cls, value: str) -> PendingFingerprint:
        """One whose result is known already (e.g. "empty" for no parameters)."""
        done = cls([], torch.zeros(0), [])
        done._value = value
        return done


def params_fingerprint_async(params: Iterable[torch.Tensor]) -> PendingFingerprint:
    params = list(params)
    if not params:
        return PendingFingerprint.ready("empty")
    by_size: dict[int, list[torch.Tensor]] = {}
    for p in params:
        by_size.setdefault(p.element_size(), []).append(p)
    sizes = list(by_size)
    dev = params[0].device
    fast = dev.type == "cuda" and triton is not None
    sums = torch.stack([(triton_stream_sum if fast and _one_device(by_size[s]) else _stream_sum)(by_size[s])
                        .to(dev) for s in sizes])
    shapes = [tuple(p.shape) for p in params]
    if dev.type != "cuda":
        return PendingFingerprint(sizes, sums, shapes)
    host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
    host.copy_(sums, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingFingerprint(sizes, host, shapes, event)


def params_fingerprint(params: Iterable[torch.Tensor]) -> str:
    return params_fingerprint_async(params).result()
