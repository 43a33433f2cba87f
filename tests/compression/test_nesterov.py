"""`sync.nesterov`: a Nesterov momentum on the decoded consensus (replicated state) keeps the Sync contract
(bit-identical replicas, abort/undo/state round trips), and the fused path computes what the torch path does."""
import pytest
import torch

from compression import SyncConfig, build_sync, kernels, run_threads
from compression.dct import dct_basis, sparse_idct2

from compression_testkit import digest, roundtrip_continues_identically, small_model, state_digest

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_KERNELS = kernels.available(DEV)


def _set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEV)


def _train(comm, steps, cfg, base_seed=0):
    params = [p.detach().clone().to(DEV).requires_grad_(True) for p in small_model(base_seed).parameters()]
    sync = build_sync(cfg, params, comm)
    gen = torch.Generator().manual_seed(100 + comm.rank)
    for _ in range(steps):
        _set_grads(params, gen)
        sync.exchange(lr=1e-3, weight=1.0 + comm.rank, weight_decay=0.1)
        sync.commit()
    return params, sync


@pytest.mark.parametrize("update", ["sign", "rms"])
def test_replicas_agree_and_the_momentum_changes_the_steps(update):
    cfg = SyncConfig(name="demo", kernels="torch", nesterov=0.9, update=update)
    out = run_threads(2, lambda c: digest(_train(c, 4, cfg)[0]))
    assert out[0] == out[1], "replicas must stay bitwise equal"
    plain = run_threads(2, lambda c: digest(_train(c, 4, SyncConfig(name="demo", kernels="torch", update=update))[0]))
    assert plain[0] != out[0]


def test_first_step_equals_the_plain_update_scaled_by_one_plus_beta():
    """With v = 0 the first step follows x + b * x = (1 + b) x: the same sign as without momentum."""
    a = run_threads(2, lambda c: digest(_train(c, 1, SyncConfig(name="demo", kernels="torch", nesterov=0.5))[0]))
    b = run_threads(2, lambda c: digest(_train(c, 1, SyncConfig(name="demo", kernels="torch"))[0]))
    assert a == b


def test_abort_undo_and_state_roundtrip_keep_the_momentum_exact():
    cfg = SyncConfig(name="demo", kernels="torch", nesterov=0.9)

    def body(comm):
        params, sync = _train(comm, 3, cfg)
        snap = lambda: (digest(params), state_digest(sync.state_dict()))  # noqa: E731
        before = snap()
        assert "consensus_momentum" in sync.state_dict()
        _set_grads(params, torch.Generator().manual_seed(7))
        sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
        sync.abort()
        aborted = snap() == before
        sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
        sync.commit(keep_undo=True)
        moved = snap() != before
        sync.undo()
        undone = snap() == before
        sync.abort()
        same, _ = roundtrip_continues_identically(sync, params, _set_grads, lambda: build_sync(cfg, params, comm))
        return aborted, moved, undone, same

    assert run_threads(2, body) == [(True, True, True, True)] * 2


def test_bad_nesterov_is_rejected():
    params = list(small_model(0).parameters())
    from compression.communicator import ThreadCommunicator

    with pytest.raises(ValueError, match="sync.nesterov"):
        build_sync(SyncConfig(name="demo", nesterov=1.0), params, ThreadCommunicator.group(1)[0])


@pytest.mark.skipif(not HAS_KERNELS, reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py)")
@pytest.mark.parametrize("h", [64, 1])
def test_fused_decode_raw_mode_is_the_decoded_field(h):
    g = torch.Generator().manual_seed(3)
    N, E = 9, 8
    idx = torch.stack([torch.randperm(h * 64, generator=g)[:E] for _ in range(N)]).to(DEV)
    coef = torch.randn(N, E, generator=g).to(DEV)
    ch, cw = dct_basis(h, DEV), dct_basis(64, DEV)
    out = torch.empty(N, h, 64, device=DEV)
    kernels.fused_decode(idx, coef, ch, cw, out, mode="raw")
    assert torch.allclose(out, sparse_idct2(idx, coef, ch, cw), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_KERNELS, reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py)")
def test_fused_path_tracks_the_torch_path_with_nesterov():
    fused = run_threads(2, lambda c: _train(c, 3, SyncConfig(name="demo", kernels="triton", nesterov=0.9)))
    torch_ = run_threads(2, lambda c: _train(c, 3, SyncConfig(name="demo", kernels="torch", nesterov=0.9)))
    assert any(fused[0][1].fused)
    assert digest(fused[0][0]) == digest(fused[1][0]), "replicas must stay bitwise equal"
    close = sum(int(((a - b).abs() < 1e-6).sum()) for a, b in zip(fused[0][0], torch_[0][0]))
    total = sum(a.numel() for a in fused[0][0])
    assert close / total > 0.999, f"only {close}/{total} parameters match the torch path's"
