"""Bit-exact fingerprints of parameter sets, computed on the device that holds them.

Each tensor's raw bits are read as integers, multiplied by a position-dependent odd weight and summed
in int64. Integer addition wraps mod 2^64 and is associative, so the sum is the same whatever order
a CPU or GPU reduces in: two replicas get the same fingerprint exactly when their bits agree (up to
a negligible collision chance). Only one int64 per tensor leaves the device.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

_INT_VIEW = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}
_MULT = 0x9E3779B97F4A7C15 - (1 << 64)  # golden-ratio constant as a signed int64


def _tensor_sum(t: torch.Tensor) -> torch.Tensor:
    bits = t.detach().contiguous().view(-1).view(_INT_VIEW[t.element_size()]).to(torch.int64)
    pos = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) * 2 + 1
    return ((bits + 0x5BD1E995) * (pos * _MULT)).sum()


def tensor_fingerprint(t: torch.Tensor) -> int:
    return int(_tensor_sum(t).item())


def params_fingerprint(params: Iterable[torch.Tensor]) -> str:
    params = list(params)
    if not params:
        return "empty"
    # one int64 per tensor, one device->host copy for all of them
    sums = torch.stack([_tensor_sum(p).to(params[0].device) for p in params]).cpu().tolist()
    h = hashlib.sha256()
    for p, s in zip(params, sums):
        h.update(int(s).to_bytes(8, "little", signed=True))
        h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()[:16]
