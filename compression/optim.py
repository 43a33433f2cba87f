"""`DeMo`: the demo sync as a torch.optim.Optimizer, for training loops outside our actors (Ray Train, torchrun).

Promises: `step()` = `exchange` + `commit` of `compression.demo.DemoSync` on all parameters, with the lr and
weight decay of the (single) param group, so lr schedulers work unchanged. Every rank must call `step()`
(it runs a collective). `last_stats` holds the `ExchangeStats` of the latest step.
"""
from __future__ import annotations

import torch

from compression.communicator import Communicator
from compression.config import SyncConfig
from compression.demo import DemoSync


class DeMo(torch.optim.Optimizer):
    def __init__(self, params, comm: Communicator, lr: float = 1e-3, topk: int = 4, chunk: int = 64,
                 decay: float = 0.999, value_bits: int = 1, weight_decay: float = 0.0,
                 delayed_apply: bool = False, validate_payloads: bool = True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("DeMo: one param group only (the exchange applies one lr to all parameters)")
        # lr_scale=1: the param group's lr is the step size (SyncConfig's lr_scale is tuned for elastic's train.lr)
        cfg = SyncConfig(name="demo", topk=topk, chunk=chunk, decay=decay, value_bits=value_bits,
                         delayed_apply=delayed_apply, validate_payloads=validate_payloads, lr_scale=1.0)
        self.sync = DemoSync(cfg, self.param_groups[0]["params"], comm)
        self.last_stats = None

    @torch.no_grad()
    def step(self, closure=None, weight: float = 1.0):
        """One synchronized update; `weight` is this rank's share (e.g. its token count) in the consensus."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        self.last_stats = self.sync.exchange(group["lr"], weight, group["weight_decay"])
        self.sync.commit()
        return loss

    def state_dict(self) -> dict:
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "sync": self.sync.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)
        self.sync.load_state_dict(state_dict["sync"])
