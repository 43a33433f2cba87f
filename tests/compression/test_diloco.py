import copy

import pytest
import torch

from compression import PayloadError, SyncConfig, build_sync, run_threads
from compression.diloco import DeltaWire

from compression_testkit import TamperingCommunicator, digest, set_random_grads, small_model, state_digest

BASE = small_model(0)
H = 3


def _cfg(**kw):
    return SyncConfig(name="diloco", inner_steps=kw.pop("inner_steps", H), **kw)


# the two outer codecs: dense int8 blocks, and DCT top-k picks with error feedback (SparseLoCo-style)
OUTER = [pytest.param({}, id="int8"), pytest.param({"outer_topk": 3, "chunk": 8}, id="topk")]


def _train(comm, steps, cfg, lr=1e-3, wd=0.1, boundary_at=()):
    model = copy.deepcopy(BASE)
    params = list(model.parameters())
    sync = build_sync(cfg, params, comm)
    gen = torch.Generator().manual_seed(100 + comm.rank)  # different data on every rank
    prints = []
    for s in range(steps):
        set_random_grads(params, gen, 0.1)
        sync.exchange(lr=lr, weight=1.0 + comm.rank, weight_decay=wd, boundary=s in boundary_at)
        sync.commit()
        prints.append((digest(params), digest(sync.replica_tensors())))
    return model, sync, prints


@pytest.mark.parametrize("outer", OUTER)
def test_global_state_agrees_after_every_step_and_parameters_after_each_outer_step(outer):
    out = run_threads(3, lambda c: _train(c, 2 * H + 1, _cfg(**outer))[2])
    for s in range(2 * H + 1):
        params, replica = {o[s][0] for o in out}, {o[s][1] for o in out}
        assert len(replica) == 1
        outer = (s + 1) % H == 0
        assert (len(params) == 1) == outer, (s, len(params))  # local copies drift between outer steps
    assert out[0][H - 1][1] != out[0][H - 2][1]  # the global parameters moved at the outer step


@pytest.mark.parametrize("outer", OUTER)
def test_boundary_forces_an_outer_step(outer):
    out = run_threads(2, lambda c: _train(c, 2, _cfg(inner_steps=100, **outer), boundary_at=(1,))[2])
    assert out[0][0][0] != out[1][0][0] and out[0][1][0] == out[1][1][0]


def test_one_rank_without_quantization_loss_matches_adamw_then_outer_sgd():
    """W=1, outer_lr=1, momentum 0: theta_g <- theta_g - (theta_g - theta_local) = the local AdamW result,
    up to the int8 rounding of the delta (half a scale step per element)."""
    cfg = _cfg(outer_lr=1.0, outer_momentum=0.0)
    model, sync, _ = run_threads(1, lambda c: _train(c, H, cfg))[0]
    ref = copy.deepcopy(BASE)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=cfg.betas, eps=cfg.eps, weight_decay=0.1)
    gen = torch.Generator().manual_seed(100)
    for _ in range(H):
        set_random_grads(list(ref.parameters()), gen, 0.1)
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        delta = (q - p).abs().max()
        bound = (BASE.state_dict()[[n for n, x in ref.named_parameters() if x is q][0]] - q).abs().max() / 127
        assert delta <= bound + 1e-7


@pytest.mark.parametrize("outer", OUTER)
def test_exchange_then_abort_leaves_params_and_state_bitwise_unchanged_on_inner_and_outer_steps(outer):
    def body(comm):
        model, sync, _ = _train(comm, H + 1, _cfg(**outer))  # next step is an inner step; H - 1 later an outer one
        same = []
        for _ in range(2):
            before = (digest(model.parameters()), state_digest(sync.state_dict()), sync.step_count)
            set_random_grads(list(model.parameters()), torch.Generator().manual_seed(7))
            sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1, boundary=bool(same))
            sync.abort()
            same.append(before == (digest(model.parameters()), state_digest(sync.state_dict()), sync.step_count))
        return same

    assert run_threads(2, body) == [[True, True], [True, True]]


@pytest.mark.parametrize("edit,reason", [
    (lambda row: _flip(row, 40), "checksum"),
    (lambda row: _scale(row, float("nan")), "scale"),
])
def test_corrupt_outer_payload_is_rejected_on_every_rank_and_changes_nothing(edit, reason):
    cfg = _cfg(inner_steps=1)
    wire_rows = {}

    def body(comm):
        model = copy.deepcopy(BASE)
        params = list(model.parameters())
        sync = build_sync(cfg, params, TamperingCommunicator(comm, victim=1, edit=lambda r: _resealed(r, edit, reason, wire_rows)))
        set_random_grads(params, torch.Generator().manual_seed(comm.rank))
        before = digest(params)
        with pytest.raises(PayloadError) as e:
            sync.exchange(lr=1e-3, weight=1.0)
        return e.value.sender_rank, reason in e.value.reason, before == digest(params), sync.step_count

    assert run_threads(2, body) == [(1, True, True, 0)] * 2


def _flip(row, at):
    row = row.clone()
    row[at] ^= 0xFF
    return row


def _scale(row, value):
    row = row.clone()
    row[32:36] = torch.tensor([value], dtype=torch.float32).view(torch.uint8)
    return row


def _resealed(row, edit, reason, _):
    """Edit a payload; for a content check (not the checksum), re-seal it so the content check must catch it."""
    out = edit(row)
    if reason != "checksum":
        out = DeltaWire(sum(p.numel() for p in BASE.parameters())).seal(out)
    return out


def test_non_finite_gradient_is_refused_before_it_reaches_the_parameters():
    def body(comm):
        model = copy.deepcopy(BASE)
        params = list(model.parameters())
        sync = build_sync(_cfg(), params, comm)
        set_random_grads(params, torch.Generator().manual_seed(1))
        if comm.rank == 0:
            params[0].grad[0, 0] = float("nan")
            with pytest.raises(PayloadError) as e:
                sync.exchange(lr=1e-3, weight=1.0)  # an inner step: nothing is sent, the rank refuses it
            return e.value.sender_rank
        sync.exchange(lr=1e-3, weight=1.0)
        return None

    assert run_threads(2, body) == [0, None]


@pytest.mark.parametrize("outer", OUTER)
def test_a_rank_with_non_finite_gradients_at_an_outer_step_poisons_its_payload_and_every_rank_rejects_it(outer):
    def body(comm):
        model = copy.deepcopy(BASE)
        params = list(model.parameters())
        sync = build_sync(_cfg(inner_steps=1, **outer), params, comm)
        set_random_grads(params, torch.Generator().manual_seed(1))
        if comm.rank == 1:
            params[0].grad[0, 0] = float("inf")
        with pytest.raises(PayloadError) as e:
            sync.exchange(lr=1e-3, weight=1.0)
        return e.value.sender_rank

    assert run_threads(2, body) == [1, 1]


@pytest.mark.parametrize("outer", OUTER)
def test_state_dict_roundtrip_continues_bit_identically(outer):
    cfg = _cfg(**outer)

    def body(comm):
        model, sync, _ = _train(comm, H + 1, cfg)  # mid-phase: AdamW state, phase weight and outer momentum
        twin = copy.deepcopy(model)
        twin_sync = build_sync(cfg, list(twin.parameters()), comm)
        twin_sync.load_state_dict(sync.state_dict())
        gen = torch.Generator().manual_seed(5 + comm.rank)
        for _ in range(H):
            grads_gen_state = gen.get_state()
            for m, s in ((model, sync), (twin, twin_sync)):
                gen.set_state(grads_gen_state)
                set_random_grads(list(m.parameters()), gen, 0.1)
                s.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
                s.commit()
        return digest(model.parameters()) == digest(twin.parameters()), \
            state_digest(sync.state_dict()) == state_digest(twin_sync.state_dict())

    assert run_threads(2, body) == [(True, True)] * 2


def test_bytes_only_at_outer_steps_and_about_half_of_dense_bf16_there():
    def body(comm):
        model = copy.deepcopy(BASE)
        params = list(model.parameters())
        sync = build_sync(_cfg(), params, comm)
        gen = torch.Generator().manual_seed(comm.rank)
        sent = []
        for _ in range(H):
            set_random_grads(params, gen)
            st = sync.exchange(lr=1e-3, weight=1.0)
            sync.commit()
            sent.append((st.bytes_sent, st.bytes_received, st.dense_equivalent_bytes))
        return sent

    sent = run_threads(2, body)[0]
    numel = sum(p.numel() for p in BASE.parameters())
    assert [s[0] for s in sent[:-1]] == [0] * (H - 1)
    nb, received, dense = sent[-1]
    assert nb == DeltaWire(numel).nbytes == received and numel <= nb <= numel * 1.1 and dense == 2 * numel


@pytest.mark.parametrize("outer", OUTER)
def test_diloco_reduces_loss_on_a_regression_problem_over_two_ranks(outer):
    torch.manual_seed(0)
    w_true = torch.randn(64, 32)

    def body(comm):
        lin = torch.nn.Linear(64, 32, bias=False)
        torch.nn.init.zeros_(lin.weight)
        # the sparse outer step keeps DiLoCo's momentum out: its error feedback already carries the unsent past
        outer_opt = dict(outer_lr=1.0, outer_momentum=0.0, outer_topk=16) if outer else \
            dict(outer_lr=0.7, outer_momentum=0.9)
        sync = build_sync(_cfg(inner_steps=5, **outer_opt, **{k: v for k, v in outer.items() if k != "outer_topk"}),
                          list(lin.parameters()), comm)
        gen = torch.Generator().manual_seed(comm.rank)
        losses = []
        for _ in range(200):  # 40 outer steps at DiLoCo's outer lr 0.7, Nesterov 0.9
            x = torch.randn(32, 64, generator=gen)
            lin.weight.grad = None
            loss = torch.nn.functional.mse_loss(lin(x), x @ w_true)
            loss.backward()
            sync.exchange(lr=1e-2, weight=1.0)
            sync.commit()
            losses.append(loss.item())
        return losses[0], losses[-1], digest(lin.parameters())

    out = run_threads(2, body)
    # 16 of 64 coefficients per 8x8 chunk: slower than int8 on this quadratic (3.7 against 1.2 after 200 steps)
    assert all(last < (0.1 if outer else 0.05) * first for first, last, _ in out)
    assert out[0][2] == out[1][2]  # step 200 is an outer step: both ranks hold the same weights


def test_diloco_optimizer_drops_into_a_plain_training_loop():
    from compression import DiLoCo

    def body(comm):
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        init = torch.Generator().manual_seed(0)  # the same initial weights on every rank (the threads share
        with torch.no_grad():                    # torch's global generator, so it is not used here)
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=init) * 0.2)
        opt = DiLoCo(net.parameters(), comm, lr=1e-2, inner_steps=4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        gen = torch.Generator().manual_seed(comm.rank)
        losses = []
        for s in range(40):
            x = torch.randn(64, 16, generator=gen)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), x.sum(1, keepdim=True))
            loss.backward()
            opt.step(boundary=s == 38)  # an extra outer step on request
            sched.step()
            losses.append(loss.item())
        sent = opt.last_stats.bytes_sent
        return losses[0], losses[-1], digest(net.parameters()), sent, opt.state_dict()["sync"]["step_count"]

    out = run_threads(2, body)
    assert all(last < 0.5 * first for first, last, *_ in out)
    assert out[0][2] == out[1][2] and out[0][3] > 0 and out[0][4] == 40  # step 40 is an outer step


def test_sparse_outer_sends_topk_picks_and_keeps_the_rest_as_error_feedback():
    """W=1, outer lr 1, no momentum, feedback 1: what the outer step applied plus the residual the rank kept
    is the whole delta, so nothing of the local progress is lost, only delayed; the payload is the picks."""
    cfg = _cfg(outer_topk=2, chunk=8, outer_lr=1.0, outer_momentum=0.0, outer_feedback=1.0)

    def body(comm):
        model = copy.deepcopy(BASE)
        params = list(model.parameters())
        sync = build_sync(cfg, params, comm)
        theta0 = sync.theta_g.clone()
        gen = torch.Generator().manual_seed(3)
        sent = []
        for s in range(H):
            set_random_grads(params, gen, 0.1)
            if s == H - 1:  # the local result of the phase, before the outer step replaces it
                local = sync._inner_step_aside({"grads": [p.grad for p in params], "lr": 1e-3, "wd": 0.1})[0]
            sent.append(sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1).bytes_sent)
            sync.commit()
        residual = torch.cat([t.reshape(-1) for t in sync.state_dict()["outer_feedback"]])
        return theta0, local, sync.theta_g.clone(), residual, sent, sync.wire.nbytes

    theta0, local, theta1, residual, sent, nbytes = run_threads(1, body)[0]
    delta = theta0 - local
    assert torch.allclose((theta0 - theta1) + residual, delta, atol=1e-6)  # applied + kept = the delta
    assert residual.abs().sum() > 0 and (theta0 - theta1).abs().sum() > 0
    numel = theta0.numel()
    assert sent == [0] * (H - 1) + [nbytes] and nbytes < numel  # 2 picks of 64 per 8x8 chunk: ~3.5 bits/param


def test_sparse_outer_option_checks():
    from compression.config import sync_option_problem

    assert "outer_topk" in sync_option_problem(_cfg(outer_topk=-1), "diloco")
    assert "outer_feedback" in sync_option_problem(_cfg(outer_topk=4, outer_feedback=1.5), "diloco")
    assert sync_option_problem(_cfg(outer_topk=4), "diloco") is None


def test_sparse_outer_residual_is_loaded_only_by_the_rank_it_belongs_to():
    """A joiner takes a live peer's state: the peer's unsent residual must not be sent a second time."""
    cfg = _cfg(outer_topk=2, chunk=8)

    def body(comm):
        model, sync, _ = _train(comm, H, cfg)
        sd = sync.state_dict()
        own = build_sync(cfg, list(copy.deepcopy(model).parameters()), comm)
        own.load_state_dict(sd)
        other = build_sync(cfg, list(copy.deepcopy(model).parameters()), comm)
        other.load_state_dict({**sd, "feedback_rank": 1 - comm.rank})
        nonzero = lambda s: any(bool(t.abs().sum() > 0) for t in s.feedback)  # noqa: E731
        return nonzero(sync), nonzero(own), nonzero(other), torch.equal(other.theta_g, sync.theta_g)

    assert run_threads(2, body) == [(True, True, False, True)] * 2
