"""The baseline: token-weighted all-reduce of gradients (one flat bucket, one collective) then torch AdamW.

Promises: after `commit`, every replica has applied AdamW (fused where torch supports it) to the gradient
sum_r(weight_r * grad_r) / sum_r(weight_r); `exchange` leaves params, grads and AdamW state untouched.
Byte accounting: `bytes_sent` = `bytes_received` = 2 (W-1)/W x bucket bytes, what each worker moves in a
ring all-reduce; `collective_input_bytes` = the bucket itself (fp32 gradients + 1 weight slot).
"""
from __future__ import annotations

import time

import torch

from compression.codec import PayloadError
from compression.communicator import Communicator
from compression.config import SyncConfig
from compression.sync import ExchangeStats, Sync


def build_adamw(params, betas, eps) -> torch.optim.AdamW:
    """AdamW over `params` with lr and weight decay 0 (set per step by `adamw_step_on`): fused where torch
    supports it on these parameters, else foreach. Dense's optimizer and DiLoCo's inner one."""
    devices = {p.device.type for p in params}
    fusable = devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params) and len(devices) == 1
    if fusable:
        try:
            return torch.optim.AdamW(params, lr=0.0, betas=betas, eps=eps, weight_decay=0.0, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=0.0, betas=betas, eps=eps, weight_decay=0.0, foreach=True)


def adamw_step_on(opt: torch.optim.AdamW, params, grads, lr: float, wd: float) -> None:
    """One `opt` step with `grads` in place of the parameters' own (put back afterwards)."""
    saved = [p.grad for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    for group in opt.param_groups:
        group["lr"], group["weight_decay"] = lr, wd
    opt.step()
    for p, g in zip(params, saved):
        p.grad = g


def adamw_state(opt: torch.optim.AdamW, on_device: bool = False) -> dict:
    """`opt.state_dict()` with every tensor copied to CPU (what checkpoints and peers receive), or with the
    live tensors, detached, where they are (`on_device`: see `Sync.state_dict`)."""
    sd = opt.state_dict()
    state = {k: {n: ((v.detach() if on_device else v.detach().cpu().clone()) if torch.is_tensor(v) else v)
                 for n, v in s.items()}
             for k, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def adamw_layout(opt: torch.optim.AdamW) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of the tensors `adamw_state(opt, on_device=True)` holds once `opt` has stepped: per
    parameter its step counter, then exp_avg and exp_avg_sq shaped like it (AdamW creates them lazily)."""
    out: list[tuple[tuple[int, ...], torch.dtype]] = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                out += [(tuple(v.shape), v.dtype) for v in st.values() if torch.is_tensor(v)]
            else:
                out += [((), torch.float32), (tuple(p.shape), p.dtype), (tuple(p.shape), p.dtype)]
    return out


class DenseSync(Sync):
    def __init__(self, cfg: SyncConfig, params: list[torch.Tensor], comm: Communicator):
        self.cfg, self.params, self.comm = cfg, params, comm
        self.device = params[0].device
        self.numel = sum(p.numel() for p in params)
        self.opt = build_adamw(params, tuple(cfg.betas), cfg.eps)
        self.step_count = 0
        self._pending: tuple[torch.Tensor, float, float] | None = None

    def exchange(self, lr: float, weight: float, weight_decay: float = 0.0, boundary: bool = False,
                 step: int | None = None) -> ExchangeStats:
        self._pending = None
        t0 = time.perf_counter()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        # one bucket: weighted grads then the weight itself, so the total weight rides the same collective
        bucket = torch.cat([g.reshape(-1).float() for g in grads] + [torch.ones(1, device=self.device)])
        bucket.mul_(float(weight))
        _, t1, t2 = self._timed(self.comm.allreduce_, bucket)
        total = float(bucket[-1])  # host sync: needed to reject a poisoned reduction before commit
        if not (total > 0 and torch.isfinite(bucket).all()):
            # an all-reduce mixes every rank's bytes, so the culprit cannot be named
            raise PayloadError(-1, f"all-reduced gradients are not finite or total weight {total} <= 0")
        avg = bucket[:-1].div_(total)
        self._pending = (avg, float(lr), float(weight_decay))
        t3 = time.perf_counter()
        nbytes, W = bucket.numel() * bucket.element_size(), self.comm.world_size
        ring = int(2 * (W - 1) / W * nbytes)
        return ExchangeStats(bytes_sent=ring, bytes_received=ring, dense_equivalent_bytes=self.numel * 2,
                             codec_ms=((t1 - t0) + (t3 - t2)) * 1e3, comm_ms=(t2 - t1) * 1e3,
                             collective_input_bytes=nbytes)

    def commit(self) -> None:
        if self._pending is None:
            raise RuntimeError("commit() without a successful exchange()")
        avg, lr, wd = self._pending
        sizes = [p.numel() for p in self.params]
        grads = [a.view_as(p).to(p.dtype) for a, p in zip(avg.split(sizes), self.params)]
        adamw_step_on(self.opt, self.params, grads, lr, wd)
        self.step_count += 1
        self._pending = None

    def abort(self) -> None:
        self._pending = None

    def state_dict(self, on_device: bool = False) -> dict:
        return {"strategy": "dense", "step_count": self.step_count, "adamw": adamw_state(self.opt, on_device)}

    def state_layout(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return adamw_layout(self.opt)

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("strategy") != "dense":
            raise ValueError(f"load_state_dict: state of strategy '{sd.get('strategy')}' given to dense")
        self.opt.load_state_dict(sd["adamw"])
        self.step_count = int(sd["step_count"])
        self._pending = None
