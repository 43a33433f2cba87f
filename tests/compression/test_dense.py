import copy

import torch

from compression import SyncConfig, build_sync, run_threads

from compression_testkit import digest, small_model, state_digest


def test_dense_equals_single_process_adamw_on_token_weighted_mean_gradient():
    base = small_model(1)
    weights = [100.0, 300.0]
    grads = {r: [[torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * r + s)) for p in base.parameters()]
                 for s in range(3)] for r in range(2)}
    cfg = SyncConfig(name="dense", betas=(0.9, 0.95), eps=1e-8)

    def body(comm):
        model = copy.deepcopy(base)
        sync = build_sync(cfg, list(model.parameters()), comm)
        for s in range(3):
            for p, g in zip(model.parameters(), grads[comm.rank][s]):
                p.grad = g.clone()
            st = sync.exchange(lr=1e-2, weight=weights[comm.rank], weight_decay=0.1)
            sync.commit()
        return [p.detach().clone() for p in model.parameters()], st

    (a, st), (b, _) = run_threads(2, body)
    assert digest(a) == digest(b)
    ref = copy.deepcopy(base)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for s in range(3):
        for i, p in enumerate(ref.parameters()):
            p.grad = (weights[0] * grads[0][s][i] + weights[1] * grads[1][s][i]) / sum(weights)
        opt.step()
    for p, q in zip(ref.parameters(), a):
        assert torch.allclose(p, q, atol=1e-6)
    n = sum(p.numel() for p in base.parameters())
    assert st.dense_equivalent_bytes == 2 * n and st.collective_input_bytes == 4 * (n + 1)


def test_dense_abort_and_state_roundtrip():
    base = small_model(2)

    def body(comm):
        model = copy.deepcopy(base)
        sync = build_sync(SyncConfig(name="dense"), list(model.parameters()), comm)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        sync.exchange(lr=1e-2, weight=1.0); sync.commit()
        before = digest(model.parameters()), state_digest(sync.state_dict())
        sync.exchange(lr=1e-2, weight=1.0); sync.abort()
        same = before == (digest(model.parameters()), state_digest(sync.state_dict()))
        fresh = build_sync(SyncConfig(name="dense"), list(model.parameters()), comm)
        fresh.load_state_dict(sync.state_dict())
        return same and state_digest(fresh.state_dict()) == before[1] and fresh.step_count == 1

    assert run_threads(2, body) == [True, True]
