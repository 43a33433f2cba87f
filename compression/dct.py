"""Orthonormal DCT-II bases and the chunk plan: how every parameter is cut into same-shaped chunks.

Owns: the basis cache and `ChunkPlan`. Promises:
- `dct_basis(n)` is orthonormal (C @ C.T = I), so the transform is energy preserving and its inverse is C.T.
- `ChunkPlan` maps every parameter to a contiguous range of one `[N, h, w]` batch per distinct chunk shape,
  in parameter order. A whole model is then transformed with one batched matmul per chunk shape
  (`C_h @ X @ C_w^T`), never with a Python loop over tensors.

Chunk shapes (same rule as the DeMo reference): a matrix (anything with >= 2 dims is viewed as
`[shape[0], prod(shape[1:])]`) is tiled into `h x w` with `h`/`w` the largest divisor of each side that is
<= `chunk`; a vector (biases, norms) into runs of `w` (a `1 x w` tile). A prime side degrades to thin tiles
(still correct, just fewer parameters per sent coefficient): pad such dimensions (vocab 50257 -> 50304).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

_BASES: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def dct_basis(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n x n orthonormal DCT-II matrix C (rows = frequencies): X_dct = C @ x, x = C.T @ X_dct."""
    key = (n, str(torch.device(device)), dtype)
    if key not in _BASES:
        # built in float64 on CPU once, then cast: every replica gets the same bits for the same dtype
        k = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(n, dtype=torch.float64)[None, :]
        c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        c[0] /= math.sqrt(2.0)
        _BASES[key] = c.to(device=device, dtype=dtype).contiguous()
    return _BASES[key]


def dct2(x: torch.Tensor, ch: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """Separable 2-D DCT-II of a batch of chunks `[N, h, w]`: C_h @ X @ C_w^T (one batched matmul each side)."""
    n, h, w = x.shape
    y = (x.reshape(n * h, w) @ cw.T).reshape(n, h, w)
    return torch.matmul(ch, y)


def idct2(y: torch.Tensor, ch: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2`: C_h^T @ Y @ C_w."""
    n, h, w = y.shape
    x = (y.reshape(n * h, w) @ cw).reshape(n, h, w)
    return torch.matmul(ch.T, x)


def sparse_idct2(idx: torch.Tensor, val: torch.Tensor, ch: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """idct2 of chunks that are zero except `val` at flat positions `idx` (both `[N, E]`) -> `[N, h, w]`.

    X = sum_e val_e * outer(C_h[row_e], C_w[col_e]): one bmm with an inner dimension of E (e.g. k = 4)
    instead of two 64-wide matmuls, ~30x fewer flops for the error feedback and the decode.
    """
    w = cw.shape[0]
    rows = ch[idx // w] * val.unsqueeze(-1)   # [N, E, h]
    cols = cw[idx % w]                        # [N, E, w]
    return torch.bmm(rows.transpose(1, 2), cols)


def largest_divisor_at_most(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


@dataclass
class ParamSlot:
    """Where one parameter lives in its chunk group: chunks [offset, offset + n_chunks) of group `group`."""
    index: int
    shape: tuple[int, ...]
    rows: int
    cols: int
    h: int
    w: int
    group: int
    offset: int

    @property
    def n_chunks(self) -> int:
        return (self.rows // self.h) * (self.cols // self.w)

    def tiles(self, t: torch.Tensor) -> torch.Tensor:
        """A view of `t` (param-shaped, contiguous) as `[rows/h, cols/w, h, w]` tiles (no copy).

        One `as_strided` instead of view + permute: these views are rebuilt for every parameter's fresh
        gradient at every step, where each dispatcher call is host time on a GPU's critical path.
        """
        if t.shape != self.shape or not t.is_contiguous():
            raise ValueError(f"parameter {self.index}: tiles need a contiguous tensor of shape {self.shape}, "
                             f"got {tuple(t.shape)} (contiguous: {t.is_contiguous()})")
        c = self.cols
        return t.as_strided((self.rows // self.h, c // self.w, self.h, self.w), (self.h * c, self.w, c, 1),
                            t.storage_offset())


@dataclass
class ChunkGroup:
    """All chunks of one shape `h x w` across the model, as one `[n_chunks, h, w]` batch."""
    h: int
    w: int
    n_chunks: int = 0
    slots: list[ParamSlot] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.h * self.w


class ChunkPlan:
    """Cuts a list of parameter shapes into chunk groups; gathers and scatters tensors to/from them."""

    def __init__(self, shapes: list[tuple[int, ...]], chunk: int = 64):
        self.chunk = chunk
        self.shapes = [tuple(s) for s in shapes]
        self.groups: list[ChunkGroup] = []
        self.slots: list[ParamSlot] = []
        by_shape: dict[tuple[int, int], int] = {}
        for i, shape in enumerate(self.shapes):
            numel = math.prod(shape)
            rows, cols = (shape[0], numel // shape[0]) if len(shape) >= 2 and numel > 0 else (1, numel)
            if numel == 0:
                raise ValueError(f"parameter {i}: empty tensor of shape {shape} cannot be chunked")
            h = largest_divisor_at_most(rows, chunk) if rows > 1 else 1
            w = largest_divisor_at_most(cols, chunk)
            g = by_shape.setdefault((h, w), len(self.groups))
            if g == len(self.groups):
                self.groups.append(ChunkGroup(h, w))
            group = self.groups[g]
            slot = ParamSlot(i, shape, rows, cols, h, w, g, group.n_chunks)
            group.slots.append(slot)
            group.n_chunks += slot.n_chunks
            self.slots.append(slot)
        self.numel = sum(math.prod(s) for s in self.shapes)

    def group_views(self, buffers: list[torch.Tensor], gi: int) -> list[torch.Tensor]:
        """Views of group buffer `buffers[gi]` ([N, h, w]) split per parameter as `[rows/h, cols/w, h, w]`."""
        g, buf = self.groups[gi], buffers[gi]
        return [buf[s.offset:s.offset + s.n_chunks].view(s.rows // s.h, s.cols // s.w, s.h, s.w) for s in g.slots]

    def gather(self, tensors: list[torch.Tensor], device, dtype=torch.float32) -> list[torch.Tensor]:
        """Param-shaped tensors -> one `[N, h, w]` buffer per group (one foreach copy for the whole model)."""
        out = [torch.empty(g.n_chunks, g.h, g.w, device=device, dtype=dtype) for g in self.groups]
        dst, src = [], []
        for gi, g in enumerate(self.groups):
            dst += self.group_views(out, gi)
            src += [s.tiles(tensors[s.index].contiguous()) for s in g.slots]
        torch._foreach_copy_(dst, src)
        return out

    def scatter(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Group buffers -> param-shaped tensors (new, contiguous), in parameter order."""
        out: list[torch.Tensor | None] = [None] * len(self.shapes)
        for gi, g in enumerate(self.groups):
            for s, v in zip(g.slots, self.group_views(buffers, gi)):
                out[s.index] = v.permute(0, 2, 1, 3).reshape(s.shape)
        return out  # type: ignore[return-value]

    def param_tiles(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tile views of param-shaped tensors, in group order (matches `all_group_views`)."""
        return [s.tiles(tensors[s.index]) for g in self.groups for s in g.slots]

    def all_group_views(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        return [v for gi in range(len(self.groups)) for v in self.group_views(buffers, gi)]


class ViewCache:
    """Views built from a list of tensors, reused while the same tensors come back.

    The tile views of a whole model cost a few dispatcher calls per parameter (~600 a step on GPT-2-small);
    on a GPU that host time is longer than the kernels it feeds. A hit needs the same tensor objects over
    the same storage (`p.data = ...` keeps the object but swaps the storage: a miss).
    `retain=False` is for tensors the caller may free every step (gradients under
    `zero_grad(set_to_none=True)`): views are kept only after the same tensors came back twice, so the
    cache never keeps a freed gradient's memory alive.
    """

    def __init__(self, build: Callable[[list[torch.Tensor]], list[torch.Tensor]], retain: bool = True):
        self.build, self.retain = build, retain
        self._key: list[tuple[int, int]] | None = None
        self._held: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (tensors, their views)

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        key = [(id(t), t.data_ptr()) for t in tensors]
        if self._held is not None and key == self._key:
            return self._held[1]  # the held tensors are alive, so equal ids are the same objects
        views = self.build(tensors)
        repeat = key == self._key
        self._key = key
        self._held = (list(tensors), views) if self.retain or repeat else None
        return views
