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
    hierarchy: str = "flat"        # flat: every rank a peer | node: dense inside a Ray node, demo across nodes
                                   # (compression/hierarchy.py, docs/compression.md#hierarchy)
    kernels: str = "auto"          # auto: fused Triton kernels on CUDA (compression.kernels), torch elsewhere | torch | triton
    # diloco: AdamW steps on each worker's own copy (betas, eps above), an outer Nesterov step every inner_steps
    inner_steps: int = 50          # local steps between outer steps (H); the last step and checkpoints sync too
    outer_lr: float = 1.0          # outer SGD on the averaged delta: 1.0 with momentum 0 = the weighted average;
    outer_momentum: float = 0.0    # DiLoCo's Nesterov 0.7/0.9 wants hundreds of outer steps (docs/compression.md#diloco)
    outer_topk: int = 0            # 0: the outer delta goes dense as int8; k > 0: DCT top-k per sync.chunk chunk with
                                   # bf16 values and error feedback (SparseLoCo-style, docs/compression.md#sparse-outer)
    outer_feedback: float = 1.0    # outer_topk: decay of the error-feedback residual before the next delta is added


def sync_option_problem(cfg: SyncConfig, strategy: str | None = None) -> str | None:
    """The first out-of-range option as an error naming it and its range, or None when all are fine.

    `strategy`: only the options that strategy reads (each `Sync` checks its own when built; "hierarchy": the
    `sync.hierarchy` checks, which `build_sync` runs); None: every
    option whatever `name` says (`elastic.config` at load time, so a typo fails before the run starts)."""
    s = cfg
    checks = (  # (the strategy that reads the option or None for all, ok, message)
        (None, s.name in ("dense", "demo", "diloco"), f"sync.name: '{s.name}' must be dense, demo or diloco"),
        ("hierarchy", s.hierarchy in ("flat", "node"), f"sync.hierarchy: '{s.hierarchy}' must be flat or node"),
        ("hierarchy", s.hierarchy == "flat" or s.name == "demo",
         f"sync.hierarchy=node: only demo has a node hierarchy (sync.name is '{s.name}'); use sync.name=demo"),
        ("hierarchy", s.hierarchy == "flat" or not s.delayed_apply,
         "sync.hierarchy=node: sync.delayed_apply is not supported there; set sync.delayed_apply=false"),
        ("hierarchy", s.hierarchy == "flat" or s.kernels != "triton",
         "sync.hierarchy=node picks its kernels itself (auto: flat demo's fused kernels on CUDA, torch ops elsewhere); set sync.kernels=auto or torch"),
        ("diloco", s.inner_steps >= 1,
         f"sync.inner_steps: {s.inner_steps} must be >= 1 (diloco's local steps per outer step)"),
        ("diloco", s.outer_lr > 0, f"sync.outer_lr: {s.outer_lr} must be > 0"),
        ("diloco", 0 <= s.outer_momentum < 1, f"sync.outer_momentum: {s.outer_momentum} must be in [0, 1)"),
        ("diloco", s.outer_topk >= 0, f"sync.outer_topk: {s.outer_topk} must be >= 0 (0: dense int8 outer delta)"),
        ("diloco", s.outer_topk == 0 or s.chunk >= 2, f"sync.chunk: {s.chunk} must be >= 2"),
        ("diloco", 0 <= s.outer_feedback <= 1, f"sync.outer_feedback: {s.outer_feedback} must be in [0, 1]"),
        ("demo", s.value_bits in (1, 16), f"sync.value_bits: {s.value_bits} must be 1 or 16"),
        ("demo", s.topk >= 1, f"sync.topk: {s.topk} must be >= 1"),
        ("demo", s.chunk >= 2, f"sync.chunk: {s.chunk} must be >= 2"),
        ("demo", 0 < s.decay <= 1, f"sync.decay: {s.decay} must be in (0, 1]"),
        ("demo", s.lr_scale > 0, f"sync.lr_scale: {s.lr_scale} must be > 0 (demo steps at train.lr * lr_scale)"),
        ("demo", s.update in ("sign", "rms"), f"sync.update: '{s.update}' must be sign or rms"),
    )
    for reader, ok, message in checks:
        if not ok and (strategy is None or reader == strategy):
            return message
    return None
