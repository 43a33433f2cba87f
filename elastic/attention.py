"""Attention shapes a worker prepares before it trains, so a step never stalls on a new batch size.

cuDNN's attention (what torch's `scaled_dot_product_attention` picks on an H100) builds an execution graph
for every input shape it meets and caches it per thread: forward graphs in the thread that calls the
model, backward graphs in autograd's device thread. Building one costs ~120 ms of CPU on an H100 for
GPT-2-small (measured: a step on a new row count took 162 ms against 42 ms once built). A worker's row
count changes from step to step (whole documents), so an unprepared worker stalls the whole group for
that long on each row count it has not seen yet: 7 times in 40 steps of the 2-GPU benchmark, which cost
15% of its tokens/s.

`AttentionShapes` builds the graphs for every micro-batch row count from 1 to `train.attention_warm_rows`
(and the full micro-batch) up front, by running one attention layer forward and backward on random
input. It must run in the thread that later runs the steps: the worker's compute thread, where every forward and
backward runs (`WorkerReplica.on_compute_thread`: the steps, those computed ahead of their call, evaluation). A micro-batch of a row count outside that set runs with cuDNN excluded, on the flash
or memory-efficient kernels, which need no graph: ~4% slower per row for that step, never a stall.
`train.attention_warm_rows=0` turns this off (cuDNN builds each shape on first sight). CPU workers do
nothing here.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

log = logging.getLogger("raydistro.attention")


def warm_row_counts(micro_rows: int, limit: int) -> list[int]:
    """The micro-batch row counts to prepare: 1..min(micro_rows, limit), plus micro_rows itself (every
    micro-batch but a step's last one is full)."""
    if limit <= 0 or micro_rows <= 0:
        return []
    rows = list(range(1, min(micro_rows, limit) + 1))
    if micro_rows not in rows:
        rows.append(micro_rows)
    return rows


class AttentionShapes:
    """Which attention kernels a micro-batch of `rows` rows may use, and the up-front graph builds."""

    def __init__(self, device: torch.device, micro_rows: int, limit: int):
        self.device = device
        self.rows = warm_row_counts(micro_rows, limit) if device.type == "cuda" else []
        self.prepared: set[int] = set()
        self.prepare_s = 0.0

    def prepare(self, attn: torch.nn.Module, seq_len: int, n_embd: int, bf16: bool) -> float:
        """Run `attn` (one of the model's attention layers) forward and backward once per row count, in the
        calling thread; parameter gradients are left as they were. Returns the seconds it took."""
        if not self.rows or self.prepared:
            return 0.0
        t0 = time.perf_counter()
        params = list(attn.parameters())
        saved = [p.grad for p in params]
        gen = torch.Generator(device=self.device).manual_seed(0)
        try:
            for rows in self.rows:
                x = torch.randn(rows, seq_len, n_embd, device=self.device, generator=gen, requires_grad=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    y = attn(x)
                y.backward(torch.randn(y.shape, device=self.device, dtype=y.dtype, generator=gen))
                self.prepared.add(rows)
            torch.cuda.synchronize(self.device)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        self.prepare_s = time.perf_counter() - t0
        log.info("attention prepared for micro-batches of %s rows in %.2f s", _span(self.rows), self.prepare_s)
        return self.prepare_s

    def restricted(self, rows: int) -> bool:
        """Whether a forward over `rows` rows must keep off cuDNN (a CUDA row count not prepared): such a
        micro-batch also runs eagerly under `train.compile`, since a compiled graph picks its kernel once."""
        return bool(self.rows) and rows not in self.prepared

    def kernels(self, rows: int):
        """Context for a forward over `rows` rows: the default choice where prepared; without cuDNN (flash
        or memory-efficient attention, no graph to build) where not."""
        if not self.restricted(rows):  # CPU, attention_warm_rows=0, or prepared
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _span(rows: list[int]) -> str:
    if not rows:
        return "none"
    return f"{rows[0]}..{rows[-1]}" if rows == list(range(rows[0], rows[-1] + 1)) else str(rows)
