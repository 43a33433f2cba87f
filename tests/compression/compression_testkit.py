"""Shared fixtures-as-functions for the compression tests: small models, grads, hashes, tampering comms."""
from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn as nn


def small_model(seed: int = 0) -> nn.Module:
    """Matrices with 64x64 and thin chunks, vectors with runs of 64 and of a non power of two (48)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(128, 192), nn.LayerNorm(192), nn.Linear(192, 48), nn.Linear(48, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def replicas(model: nn.Module, n: int) -> list[nn.Module]:
    return [copy.deepcopy(model) for _ in range(n)]


def set_random_grads(params, gen: torch.Generator, scale: float = 1.0) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_digest(sd) -> str:
    """Hash of every tensor in a (nested) state dict, in a stable order."""
    out = []

    def walk(x):
        if torch.is_tensor(x):
            out.append(x)
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(sd)
    return digest(out)


class TamperingCommunicator:
    """Wraps a communicator; `edit(row) -> row` rewrites the victim's gathered payload on every receiver."""

    def __init__(self, inner, victim: int, edit):
        self.inner, self.victim, self.edit = inner, victim, edit
        self.rank, self.world_size = inner.rank, inner.world_size
        self.armed = True

    def allgather(self, t):
        out = self.inner.allgather(t)
        if self.armed:
            out[self.victim] = self.edit(out[self.victim].clone())
        return out

    def allreduce_(self, t):
        self.inner.allreduce_(t)

    def broadcast_(self, t, src):
        self.inner.broadcast_(t, src)


def roundtrip_continues_identically(sync, params, set_grads, rebuild):
    """Take `sync.state_dict()`, run one step, then restore the parameters, load the state into `rebuild()`
    and run the same step again: (whether both steps gave the same bits, the rebuilt sync)."""
    sd, saved = sync.state_dict(), [p.detach().clone() for p in params]
    set_grads(params, torch.Generator().manual_seed(9))
    sync.exchange(lr=1e-3, weight=1.0)
    sync.commit()
    first = digest(params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    fresh = rebuild()
    fresh.load_state_dict(sd)
    set_grads(params, torch.Generator().manual_seed(9))
    fresh.exchange(lr=1e-3, weight=1.0)
    fresh.commit()
    return first == digest(params), fresh


def commit_undo_commit(sync, params, seed: int, undo: bool = True) -> tuple:
    """One exchanged step committed with `keep_undo`, undone, committed again (`undo=False`: one plain
    commit). Returns the (params digest, state digest, step count) snapshots (before the commit, after it,
    after the undo, at the end), for tests of `Sync.undo` (train.apply_ahead)."""
    snap = lambda: (digest(params), state_digest(sync.state_dict()), sync.step_count)  # noqa: E731
    set_random_grads(params, torch.Generator().manual_seed(seed))
    sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
    before = snap()
    sync.commit(keep_undo=undo)
    applied = snap()
    if undo:
        sync.undo()
    undone = snap()
    if undo:
        sync.commit(keep_undo=True)  # the same step again, now kept
        sync.forget_undo()
    return before, applied, undone, snap()
