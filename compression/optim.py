"""The sync strategies as torch.optim.Optimizers, for training loops outside our actors (Ray Train, torchrun).

`DeMo` and `DiLoCo`: `step()` = `exchange` + `commit` of the strategy on all parameters, with the lr and
weight decay of the (single) param group, so lr schedulers work unchanged. Every rank must call `step()`
(it may run a collective) with the same `boundary`. `last_stats` holds the `ExchangeStats` of the latest step.
"""
from __future__ import annotations

import torch

from compression.communicator import Communicator
from compression.config import SyncConfig
from compression.registry import build_sync


class _SyncOptimizer(torch.optim.Optimizer):
    def __init__(self, params, comm: Communicator, cfg: SyncConfig, lr: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__}: one param group only (one lr for all parameters)")
        self.sync = build_sync(cfg, self.param_groups[0]["params"], comm)
        self.last_stats = None

    @torch.no_grad()
    def step(self, closure=None, weight: float = 1.0, boundary: bool = False):
        """One update; `weight` is this rank's share (e.g. its token count), `boundary=True` asks for
        replicas that agree after it (DiLoCo syncs now; DeMo agrees after every step anyway)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        self.last_stats = self.sync.exchange(group["lr"], weight, group["weight_decay"], boundary=boundary)
        self.sync.commit()
        return loss

    def state_dict(self) -> dict:
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "sync": self.sync.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)
        self.sync.load_state_dict(state_dict["sync"])


class DeMo(_SyncOptimizer):
    def __init__(self, params, comm: Communicator, lr: float = 1e-3, topk: int = 4, chunk: int = 64,
                 decay: float = 0.999, value_bits: int = 1, weight_decay: float = 0.0,
                 delayed_apply: bool = False, validate_payloads: bool = True):
        # lr_scale=1: the param group's lr is the step size (SyncConfig's lr_scale is tuned for elastic's train.lr)
        cfg = SyncConfig(name="demo", topk=topk, chunk=chunk, decay=decay, value_bits=value_bits,
                         delayed_apply=delayed_apply, validate_payloads=validate_payloads, lr_scale=1.0)
        super().__init__(params, comm, cfg, lr, weight_decay)


class DiLoCo(_SyncOptimizer):
    """AdamW on this rank's copy (the param group's lr and weight decay), an outer step over all ranks every
    `inner_steps` steps (or at `step(boundary=True)`): the weighted average by default, Nesterov SGD with
    `outer_lr=0.7, outer_momentum=0.9` as in the paper."""

    def __init__(self, params, comm: Communicator, lr: float = 1e-3, inner_steps: int = 50,
                 outer_lr: float = 1.0, outer_momentum: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, validate_payloads: bool = True):
        cfg = SyncConfig(name="diloco", inner_steps=inner_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                         betas=tuple(betas), eps=eps, validate_payloads=validate_payloads)
        super().__init__(params, comm, cfg, lr, weight_decay)
