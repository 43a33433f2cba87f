"""Options of the synchronization strategies (the `sync` section of a run config).

Owned here so `compression` is configurable without `elastic`; `elastic.config` composes it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SyncConfig:
    name: str = "dense"            # dense | demo | diloco
    # dense baseline: AdamW on all-reduced gradients
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # demo: decoupled momentum, chunked DCT, top-k per chunk, error feedback, sign update
    topk: int = 4                  # coefficients sent per chunk
    chunk: int = 64                # chunk side (64 -> 64x64 tiles for matrices, runs of 64 for vectors)
    decay: float = 0.9             # momentum decay (reference 0.999; 0.9 tuned on `tiny`, docs/compression.md#convergence)
    value_bits: int = 1            # 1 (sign) or 16 (bf16)
    delayed_apply: bool = False    # apply the consensus one step late (overlap comm with compute)
    lr_scale: float = 2.5          # demo step = the schedule's lr (train.lr) * lr_scale, weight decay too (tuned on `tiny`)
    update: str = "sign"           # sign: sign(decoded) (reference) | rms: decoded / its RMS per chunk
    validate_payloads: bool = True
    kernels: str = "auto"          # auto: fused Triton kernels on CUDA (compression.kernels), torch elsewhere | torch | triton
    # diloco: AdamW steps on each worker's own copy (betas, eps above), an outer Nesterov step every inner_steps
    inner_steps: int = 50          # local steps between outer steps (H); the last step and checkpoints sync too
    outer_lr: float = 1.0          # outer SGD on the averaged delta: 1.0 with momentum 0 = the weighted average;
    outer_momentum: float = 0.0    # DiLoCo's Nesterov 0.7/0.9 wants hundreds of outer steps (docs/compression.md#diloco)
