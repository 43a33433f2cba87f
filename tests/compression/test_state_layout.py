"""`Sync.state_dict(on_device=True)` and `Sync.state_layout()`: what a checkpoint snapshot reads.

A CUDA worker pins host buffers for its state at set-up (before any step, so before AdamW has created its
lazy state) from `state_layout()`; its snapshots then read `state_dict(on_device=True)`, whose tensors must
fit those buffers exactly, and hold the same values as the CPU copy peers and checkpoints receive.
"""
import copy
from collections import Counter

import pytest
import torch

from compression import SyncConfig, build_sync, run_threads
from compression.sync import tensors_in

from compression_testkit import small_model, state_digest

CASES = [
    SyncConfig(name="dense"),
    SyncConfig(name="demo"),
    SyncConfig(name="demo", delayed_apply=True),
    SyncConfig(name="diloco"),
]


def _layout(tensors) -> Counter:
    return Counter((tuple(t.shape), t.dtype) for t in tensors)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name}{'-delayed' if c.delayed_apply else ''}")
def test_layout_announced_before_the_first_step_fits_the_state_after_steps(cfg):
    base = small_model(3)

    def body(comm):
        model = copy.deepcopy(base)
        sync = build_sync(cfg, list(model.parameters()), comm)
        before = Counter(sync.state_layout())  # what a worker pins at set-up
        gen = torch.Generator().manual_seed(comm.rank)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            sync.exchange(lr=1e-2, weight=1.0)
            sync.commit()
        live = sync.state_dict(on_device=True)
        cpu = sync.state_dict()
        return before, Counter(sync.state_layout()), _layout(tensors_in(live)), state_digest(live) == state_digest(cpu)

    for before, after, live, same_values in run_threads(2, body):
        assert before == after == live
        assert same_values


def test_on_device_state_is_the_live_state_and_the_default_is_a_copy():
    """Why a snapshot must queue its copies before the next step: the device view of dense's AdamW state is
    the optimizer's own tensor, while the default state_dict is a copy that later steps leave alone."""
    model = small_model(4)

    def body(comm):
        sync = build_sync(SyncConfig(name="dense"), list(model.parameters()), comm)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        sync.exchange(lr=1e-2, weight=1.0)
        sync.commit()
        live, copied = sync.state_dict(on_device=True), sync.state_dict()
        first = next(iter(live["adamw"]["state"].values()))["exp_avg"]
        kept = next(iter(copied["adamw"]["state"].values()))["exp_avg"].clone()
        sync.exchange(lr=1e-2, weight=1.0)
        sync.commit()
        return (not torch.equal(first, kept),
                torch.equal(next(iter(copied["adamw"]["state"].values()))["exp_avg"], kept))

    assert run_threads(1, body) == [(True, True)]
