import math

import pytest
import torch

from compression import PayloadError, SyncConfig, build_sync, run_threads
from compression.bench import param_shapes, wire_bytes
from compression.dct import dct2

from compression_testkit import (TamperingCommunicator, commit_undo_commit, digest, roundtrip_continues_identically,
                                set_random_grads, small_model, state_digest)

BASE = small_model(0)


def _train(comm, steps, cfg, weights=(3.0, 1.0, 2.0), lr=1e-3, wd=0.1):
    model = __import__("copy").deepcopy(BASE)
    params = list(model.parameters())
    sync = build_sync(cfg, params, comm)
    gen = torch.Generator().manual_seed(100 + comm.rank)  # different grads on every rank
    for _ in range(steps):
        set_random_grads(params, gen)
        sync.exchange(lr=lr, weight=weights[comm.rank], weight_decay=wd)
        sync.commit()
    return model, sync


@pytest.mark.parametrize("world,value_bits,delayed,topk", [
    (2, 1, False, 4), (3, 1, False, 4), (3, 16, False, 4), (2, 1, True, 4),
    (3, 1, False, 32),  # W*k = 96: the dense-grid decode path
])
def test_replicas_stay_bit_identical(world, value_bits, delayed, topk):
    cfg = SyncConfig(name="demo", value_bits=value_bits, delayed_apply=delayed, topk=topk)
    out = run_threads(world, lambda c: digest(_train(c, 6, cfg)[0].parameters()))
    assert len(set(out)) == 1
    assert out[0] != digest(BASE.parameters())  # and they did move


def test_exchange_then_abort_leaves_params_and_state_bitwise_unchanged():
    cfg = SyncConfig(name="demo", delayed_apply=True)

    def body(comm):
        model, sync = _train(comm, 3, cfg)
        before = (digest(model.parameters()), state_digest(sync.state_dict()), sync.step_count)
        set_random_grads(list(model.parameters()), torch.Generator().manual_seed(7))
        sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
        sync.abort()
        return before == (digest(model.parameters()), state_digest(sync.state_dict()), sync.step_count)

    assert run_threads(2, body) == [True, True]


@pytest.mark.parametrize("delayed", [False, True])
def test_undo_of_a_commit_restores_everything_and_the_step_can_be_committed_again(delayed):
    """commit(keep_undo=True) then undo(): parameters, state and the pending update as before the commit, bit
    for bit; committing again then gives what one plain commit gives, and the next steps go on identically."""
    cfg = SyncConfig(name="demo", delayed_apply=delayed)

    def body(comm, undo=True):
        model, sync = _train(comm, 3, cfg)
        params = list(model.parameters())
        before, applied, undone, again = commit_undo_commit(sync, params, 7 + comm.rank, undo)
        set_random_grads(params, torch.Generator().manual_seed(8 + comm.rank))
        sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
        sync.commit()
        return before == undone, applied == again, applied != before, digest(params)

    out = run_threads(2, body)
    assert [o[:3] for o in out] == [(True, True, True)] * 2
    plain = run_threads(2, lambda c: body(c, undo=False))
    assert out[0][3] == out[1][3] == plain[0][3]  # undo and redo changed nothing downstream


def test_cached_views_follow_fresh_gradients_and_swapped_parameter_storage():
    """The sync caches its per-parameter views: gradients kept across steps or fresh ones, and parameters
    whose storage is replaced (`p.data = ...`, as some loaders do) must give the same bits."""
    cfg = SyncConfig(name="demo", delayed_apply=True)

    def body(comm):
        fresh, kept = __import__("copy").deepcopy(BASE), __import__("copy").deepcopy(BASE)
        a, b = list(fresh.parameters()), list(kept.parameters())
        sa, sb = build_sync(cfg, a, comm), build_sync(cfg, b, comm)
        gen = torch.Generator().manual_seed(100 + comm.rank)
        for p in b:
            p.grad = torch.zeros_like(p)
        for step in range(6):
            set_random_grads(a, gen)
            for p, q in zip(a, b):
                q.grad.copy_(p.grad)  # the same values in persistent gradient tensors
            if step == 3:
                for q in b:
                    q.data = q.data.clone()
            for s in (sa, sb):
                s.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
                s.commit()
        return digest(a), digest(b), state_digest(sa.state_dict()) == state_digest(sb.state_dict())

    out = run_threads(2, body)
    assert all(x[0] == x[1] and x[2] for x in out) and out[0] == out[1]


def test_error_feedback_conservation_inside_the_sync():
    cfg = SyncConfig(name="demo", decay=0.9)

    def body(comm):
        model, sync = _train(comm, 2, cfg)
        params = list(model.parameters())
        set_random_grads(params, torch.Generator().manual_seed(11))
        m_old = [m.clone() for m in sync.momentum]
        g = sync.plan.gather([p.grad for p in params], "cpu")
        sync.exchange(lr=0.01, weight=1.0)
        new_m = sync._pending[0]
        for (ch, cw), k, mo, gg, mn in zip(sync.bases, sync.ks, m_old, g, new_m):
            before = 0.9 * mo + 0.01 * gg
            sent = dct2(before - mn, ch, cw).reshape(mn.shape[0], -1)
            # at most k coefficients per chunk left the momentum; the rest of it stayed local
            assert ((sent.abs() > 1e-6).sum(1) <= k).all()
            top = dct2(before, ch, cw).reshape(mn.shape[0], -1).abs().topk(k, 1).values
            assert torch.allclose(sent.abs().sort(1, descending=True).values[:, :k], top, atol=1e-5)
        return True

    assert run_threads(1, body) == [True]


EDITS = {
    "flip": lambda row: row.__setitem__(100, row[100] ^ 0xFF) or row,
    "magic": lambda row: row.__setitem__(slice(0, 4), 0) or row,
    "truncate_length": lambda row: row.__setitem__(24, row[24] ^ 2) or row,
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_corrupt_peer_payload_raises_on_every_rank_and_changes_nothing(edit):
    cfg = SyncConfig(name="demo")

    def body(comm):
        model, sync = _train(comm, 2, cfg)
        sync.rebind(TamperingCommunicator(comm, victim=1, edit=EDITS[edit]))
        before = (digest(model.parameters()), state_digest(sync.state_dict()))
        set_random_grads(list(model.parameters()), torch.Generator().manual_seed(5 + comm.rank))
        try:
            sync.exchange(lr=1e-3, weight=1.0)
            return "no error"
        except PayloadError as e:
            with pytest.raises(RuntimeError):
                sync.commit()  # nothing is pending after a rejected exchange
            sync.abort()
            same = before == (digest(model.parameters()), state_digest(sync.state_dict()))
            sync.rebind(comm)  # the group recovers: the next step works
            sync.exchange(lr=1e-3, weight=1.0)
            sync.commit()
            return (e.sender_rank, same, digest(model.parameters()))

    out = run_threads(3, body)
    assert all(o[0] == 1 and o[1] for o in out), out
    assert len({o[2] for o in out}) == 1


def test_non_finite_gradient_poisons_own_payload_instead_of_hanging_peers():
    cfg = SyncConfig(name="demo")

    def body(comm):
        model, sync = _train(comm, 1, cfg)
        if comm.rank == 0:
            next(iter(model.parameters())).grad[0, 0] = float("nan")
        try:
            sync.exchange(lr=1e-3, weight=1.0)
        except PayloadError as e:
            return e.sender_rank, e.reason
        return None

    assert [o[0] for o in run_threads(2, body)] == [0, 0]


def test_state_dict_roundtrip_continues_bit_identically():
    cfg = SyncConfig(name="demo", delayed_apply=True)

    def body(comm):
        model, sync = _train(comm, 3, cfg)
        assert all(t.device.type == "cpu" for t in sync.state_dict()["momentum"])
        params = list(model.parameters())
        same, fresh = roundtrip_continues_identically(sync, params, set_random_grads,
                                                      lambda: build_sync(cfg, params, comm))
        assert fresh.step_count == 4  # 3 loaded + the one replayed
        return same

    assert run_threads(2, body) == [True, True]


def test_bytes_ratio_at_least_1000x_for_gpt2_small_shapes():
    shapes = param_shapes("gpt2-small")
    numel = sum(math.prod(s) for s in shapes)
    assert 162e6 < numel < 164e6
    sent = wire_bytes(shapes, SyncConfig(name="demo", topk=4, value_bits=1))
    assert numel * 2 / sent >= 1000


def test_exchange_stats_count_allgather_bytes():
    cfg = SyncConfig(name="demo")

    def body(comm):
        model, sync = _train(comm, 0, cfg)
        set_random_grads(list(model.parameters()), torch.Generator().manual_seed(1))
        st = sync.exchange(lr=1e-3, weight=1.0)
        n = sum(p.numel() for p in model.parameters())
        return st.bytes_sent == sync.payload_bytes and st.bytes_received == 2 * sync.payload_bytes \
            and st.dense_equivalent_bytes == 2 * n

    assert run_threads(3, body) == [True] * 3


def test_replicas_stay_bit_identical_with_rms_update():
    cfg = SyncConfig(name="demo", update="rms", topk=4)
    out = run_threads(3, lambda c: digest(_train(c, 6, cfg)[0].parameters()))
    assert len(set(out)) == 1
    assert out[0] != digest(BASE.parameters())


@pytest.mark.parametrize("update", ["sign", "rms"])
def test_lr_scale_multiplies_the_step_and_update_modes_have_unit_rms(update):
    def body(comm):
        steps = []
        for scale in (1.0, 3.0):
            model = __import__("copy").deepcopy(BASE)
            params = list(model.parameters())
            sync = build_sync(SyncConfig(name="demo", lr_scale=scale, update=update), params, comm)
            set_random_grads(params, torch.Generator().manual_seed(5))
            before = [p.detach().clone() for p in params]
            sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.0)
            for u in sync._pending[1]:  # per chunk: +-1 (sign) or unit RMS (rms)
                rms = u.float().square().mean(dim=(1, 2)).sqrt()
                assert torch.allclose(rms[rms > 0], torch.ones_like(rms[rms > 0]), atol=1e-5)
            sync.commit()
            steps.append(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)]))
        return torch.allclose(steps[1], 3.0 * steps[0], rtol=1e-3, atol=4e-7)  # float32 rounding of p

    assert run_threads(1, body) == [True]


def test_bad_update_mode_and_lr_scale_are_rejected():
    params = list(__import__("copy").deepcopy(BASE).parameters())
    with pytest.raises(ValueError, match="update"):
        run_threads(1, lambda c: build_sync(SyncConfig(name="demo", update="adam"), params, c))
    with pytest.raises(ValueError, match="lr_scale"):
        run_threads(1, lambda c: build_sync(SyncConfig(name="demo", lr_scale=0.0), params, c))


def test_demo_reduces_loss_on_a_regression_problem_over_two_ranks():
    torch.manual_seed(0)
    target = torch.randn(64, 128) / 8
    x_all = torch.randn(2, 256, 128)
    y_all = x_all @ target.T
    init = torch.nn.Linear(128, 64, bias=False)

    def body(comm):
        model = __import__("copy").deepcopy(init)
        sync = build_sync(SyncConfig(name="demo", topk=32, decay=0.9, lr_scale=1.0), list(model.parameters()), comm)
        x, y = x_all[comm.rank], y_all[comm.rank]  # each rank sees its own data
        losses = []
        for step in range(60):
            model.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            losses.append(loss.item())
            sync.exchange(lr=3e-2 * (1 - step / 60), weight=256.0)
            sync.commit()
        return losses

    losses = run_threads(2, body)
    assert losses[0][-1] < 0.3 * losses[0][0], (losses[0][0], losses[0][-1])


def test_pairwise_and_grid_decode_agree_and_count_shared_picks_once():
    from compression.demo import grid_mean, pairwise_mean
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(50)]) for _ in range(3)])
    vals = torch.randn(3, 50, 4, generator=g)
    w = torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1)
    a = pairwise_mean(idx, vals * w, torch.ones_like(vals) * w)
    b = grid_mean(idx, vals * w, torch.ones_like(vals) * w, 16)
    assert torch.allclose(a, b, atol=1e-6)
    # dense reference: per chunk, weighted mean over the ranks that picked each coefficient
    dense = torch.zeros(50, 16)
    num, den = torch.zeros(50, 16), torch.zeros(50, 16)
    for r in range(3):
        num.scatter_add_(1, idx[r], vals[r] * w[r]); den.scatter_add_(1, idx[r], w[r].expand(50, 4))
    dense = torch.where(den > 0, num / den.clamp_min(1e-30), dense)
    flat_idx = idx.permute(1, 0, 2).reshape(50, 12)
    back = torch.zeros(50, 16).scatter_add_(1, flat_idx, a)
    assert torch.allclose(back, dense, atol=1e-6)
