"""What a received payload's header must hold: a sane weight (tokens trained on) and this step's number.

A weight of 1e300 used to pass validation and zero the update on every replica; a replayed payload of an
earlier step used to be applied. Both are refused now, on every rank, naming the sender, and nothing changes.
"""
import copy

import pytest
import torch

from compression import PayloadError, SyncConfig, build_sync, run_threads
from compression.codec import MAX_WEIGHT, GroupSpec, WireFormat

from compression_testkit import TamperingCommunicator, digest, set_random_grads, small_model, state_digest

BASE = small_model(0)


def _sync(comm, cfg):
    model = copy.deepcopy(BASE)
    params = list(model.parameters())
    return params, build_sync(cfg, params, comm)


@pytest.mark.parametrize("bad,reason", [
    (1e300, "above"), (2 * MAX_WEIGHT, "above"), (float("inf"), "infinite"), (-3.0, "not > 0"),
    (0.0, "not > 0"), (float("nan"), "abstained"),
])
@pytest.mark.parametrize("name", ["demo", "diloco"])
def test_bad_weight_is_refused_on_every_rank_naming_the_sender(name, bad, reason):
    cfg = SyncConfig(name=name, inner_steps=1)

    def body(comm):
        params, sync = _sync(comm, cfg)
        set_random_grads(params, torch.Generator().manual_seed(comm.rank))
        before = (digest(params), state_digest(sync.state_dict()))
        with pytest.raises(PayloadError) as e:
            sync.exchange(lr=1e-3, weight=bad if comm.rank == 1 else 100.0, step=0)
        sync.abort()
        return e.value.sender_rank, e.value.reason, before == (digest(params), state_digest(sync.state_dict()))

    if name == "diloco" and bad == float("inf"):
        reason = "abstained"  # diloco sends a non-finite weight of its own as NaN (it refuses the step)
    out = run_threads(3, body)
    assert all(rank == 1 and reason in why and same for rank, why, same in out), out


def test_largest_allowed_weight_still_moves_every_replica_the_same_way():
    cfg = SyncConfig(name="demo")

    def body(comm):
        params, sync = _sync(comm, cfg)
        set_random_grads(params, torch.Generator().manual_seed(comm.rank))
        before = digest(params)
        sync.exchange(lr=1e-3, weight=MAX_WEIGHT if comm.rank == 1 else 1.0, step=0)
        sync.commit()
        return before != digest(params), digest(params)

    out = run_threads(2, body)
    assert all(moved for moved, _ in out) and len({d for _, d in out}) == 1


def _replaying(comm, victim):
    """A wire that delivers the victim's first payload again in place of its later ones (a replay)."""
    first = {}

    def edit(row):
        first.setdefault("row", row.clone())
        return first["row"].clone()
    return TamperingCommunicator(comm, victim=victim, edit=edit)


@pytest.mark.parametrize("name", ["demo", "diloco"])
def test_replayed_payload_of_an_earlier_step_is_refused_naming_the_sender(name):
    cfg = SyncConfig(name=name, inner_steps=1)

    def body(comm):
        params, sync = _sync(comm, cfg)
        sync.rebind(_replaying(comm, victim=1))
        gen = torch.Generator().manual_seed(comm.rank)
        set_random_grads(params, gen)
        sync.exchange(lr=1e-3, weight=10.0, step=7)  # delivered as sent
        sync.commit()
        set_random_grads(params, gen)
        before = (digest(params), state_digest(sync.state_dict()))
        with pytest.raises(PayloadError) as e:
            sync.exchange(lr=1e-3, weight=10.0, step=8)  # rank 1's step-7 payload arrives again
        sync.abort()
        return e.value.sender_rank, e.value.reason, before == (digest(params), state_digest(sync.state_dict()))

    out = run_threads(3, body)
    assert all(rank == 1 and "replayed" in why and same for rank, why, same in out), out


def test_the_callers_step_not_each_syncs_own_count_goes_on_the_wire():
    """A demo joiner starts counting at 0 while the others are further on: the caller's step is what
    the ranks agree on."""
    cfg = SyncConfig(name="demo")

    def body(comm):
        params, sync = _sync(comm, cfg)
        sync.step_count = 0 if comm.rank == 1 else 5
        set_random_grads(params, torch.Generator().manual_seed(comm.rank))
        sync.exchange(lr=1e-3, weight=1.0, step=5)
        sync.commit()
        return digest(params)

    assert len(set(run_threads(2, body))) == 1


def test_decode_checks_the_step_given_as_an_int_or_a_device_tensor():
    wire = WireFormat([GroupSpec(n_chunks=2, numel=16, k=2, value_bits=1)])
    idx, val = [torch.tensor([[0, 1], [2, 3]])], [torch.ones(2, 2)]
    rows = torch.stack([wire.encode(idx, val, rank=r, step=4 if r == 1 else 3, weight=1.0) for r in range(3)])
    wire.decode(rows)  # no step given: not checked
    for step in (3, torch.tensor(3, dtype=torch.int64)):
        with pytest.raises(PayloadError) as e:
            wire.decode(rows, step=step)
        assert e.value.sender_rank == 1 and "step" in e.value.reason
