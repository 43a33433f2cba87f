"""The fused Triton codec kernels against the torch reference path (on CUDA when present, else Triton's
interpreter on CPU: tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is visible)."""
import copy

import pytest
import torch

from compression import SyncConfig, build_sync, kernels, run_threads
from compression.communicator import ThreadCommunicator
from compression.dct import ChunkPlan, dct_basis, sparse_idct2
from compression.demo import encode_chunks

from compression_testkit import digest, small_model

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install triton)")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not kernels.available(DEV):
    pytest.skip("Triton imported before TRITON_INTERPRET=1 was set and no GPU", allow_module_level=True)


def _group_setup(shapes, chunk, seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = ChunkPlan(shapes, chunk)
    grads = [torch.randn(s, generator=g).to(DEV) for s in shapes]
    grp = plan.groups[0]
    m = torch.randn(grp.n_chunks, grp.h, grp.w, generator=g).to(DEV)
    return plan, grads, grp, m


@pytest.mark.parametrize("shapes,chunk,k", [
    ([(128, 192), (64, 64, 2), (64,)], 64, 4),   # two matrices (one 3-D) share the 64x64 group
    ([(32, 48), (16, 80)], 16, 7),
    ([(192,), (320,), (64,)], 64, 3),            # vectors: 1 x 64 chunks, 16 per program (one partial)
])
def test_fused_encode_matches_the_torch_path(shapes, chunk, k):
    plan, grads, grp, m = _group_setup(shapes, chunk)
    ch, cw = dct_basis(grp.h, DEV), dct_basis(grp.w, DEV)
    ref = 0.9 * m + 0.25 * plan.gather(grads, DEV)[0]
    ref_idx, ref_val = encode_chunks(ref, ch, cw, k)  # ref becomes the residual
    before = m.clone()
    out = torch.empty_like(m)
    idx, val, bad = kernels.fused_encode(m, out, grads, kernels.Addresses(DEV).deltas(grads),
                                         kernels.TileTable(grp.slots, DEV), ch, cw, k, 0.9, 0.25)
    assert torch.equal(m, before), "the committed momentum must not change"
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(val, ref_val, rtol=1e-4, atol=1e-5)
    assert (val.abs()[:, :-1] >= val.abs()[:, 1:]).all(), "picks sorted by |value| descending"
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert int(bad.sum()) == 0


def test_fused_encode_flags_non_finite_chunks_and_keeps_picks_unique():
    plan, grads, grp, m = _group_setup([(64, 64), (64, 128)], 64)
    m.zero_()
    grads[0].zero_()                 # chunk 0 all zero: zero picks, still distinct indices
    grads[1][3, 70] = float("nan")  # second parameter, its second tile -> chunk 2
    ch, cw = dct_basis(64, DEV), dct_basis(64, DEV)
    out = torch.empty_like(m)
    idx, val, bad = kernels.fused_encode(m, out, grads, kernels.Addresses(DEV).deltas(grads),
                                         kernels.TileTable(grp.slots, DEV), ch, cw, 4, 0.9, 1.0)
    assert bad.tolist()[:2] == [0, 0] and bad[2] > 0
    assert (val[0] == 0).all() and len(set(idx[0].tolist())) == 4


@pytest.mark.parametrize("h", [64, 1])
def test_fused_decode_matches_sparse_idct_sign_and_rms(h):
    g = torch.Generator().manual_seed(3)
    N, E = 19, 8
    idx = torch.stack([torch.randperm(h * 64, generator=g)[:E] for _ in range(N)]).to(DEV)
    coef = torch.randn(N, E, generator=g).to(DEV)
    coef[4] = 0.0                     # a chunk nobody picked: a zero update, not +-1
    coef[5, 3:] = 0.0                 # repeats of a pick carry 0
    ch, cw = dct_basis(h, DEV), dct_basis(64, DEV)
    x = sparse_idct2(idx, coef, ch, cw)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(N, h, 64, device=DEV, dtype=dtype)
        kernels.fused_decode(idx, coef, ch, cw, out)
        assert torch.equal(out, x.sign().to(dtype))
    out = torch.empty(N, h, 64, device=DEV)
    kernels.fused_decode(idx, coef, ch, cw, out, rms=True)
    rms = x.square().mean(dim=(1, 2), keepdim=True).sqrt()
    want = torch.where(rms > 0, x / rms.clamp_min(1e-30), torch.zeros_like(x))
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-5)


def test_fused_apply_decays_and_steps_every_tile_in_place():
    g = torch.Generator().manual_seed(5)
    shapes = [(128, 64), (64,), (64, 192)]
    params = [torch.randn(s, generator=g).to(DEV) for s in shapes]
    plan = ChunkPlan(shapes, 64)
    for gi, grp in enumerate(plan.groups):
        u = torch.randint(-1, 2, (grp.n_chunks, grp.h, grp.w), generator=g).float().to(DEV)
        want = [p.clone() for p in params]
        for s, tile in zip(grp.slots, plan.group_views([u if i == gi else None for i in range(len(plan.groups))], gi)):
            s.tiles(want[s.index]).mul_(0.99).add_(tile, alpha=-0.5)
        kernels.fused_apply(u, params, kernels.Addresses(DEV).deltas(params), kernels.TileTable(grp.slots, DEV),
                            0.5, 0.99)
        for p, w in zip(params, want):
            assert torch.allclose(p, w, rtol=1e-6, atol=1e-6)


def _set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEV)


def _train(comm, steps, cfg, base):
    model = copy.deepcopy(base).to(DEV)
    params = list(model.parameters())
    sync = build_sync(cfg, params, comm)
    gen = torch.Generator().manual_seed(100 + comm.rank)
    for _ in range(steps):
        _set_grads(params, gen)
        sync.exchange(lr=1e-3, weight=1.0 + comm.rank, weight_decay=0.1)
        sync.commit()
    return [p.detach().cpu() for p in params], sync


@pytest.mark.parametrize("delayed", [False, True])
def test_demo_sync_with_fused_kernels_tracks_the_torch_path_and_replicas_agree(delayed):
    base = small_model(0)  # a 64x64 group (fused) and thin/vector groups (torch) in one model
    fused_cfg = SyncConfig(name="demo", kernels="triton", delayed_apply=delayed)
    fused = run_threads(2, lambda c: _train(c, 4, fused_cfg, base))
    torch_ = run_threads(2, lambda c: _train(c, 4, SyncConfig(name="demo", kernels="torch", delayed_apply=delayed), base))
    assert any(fused[0][1].fused) and not all(fused[0][1].fused)
    assert digest(fused[0][0]) == digest(fused[1][0]), "replicas must stay bitwise equal"
    # the same steps up to rounding (the apply kernel may fuse p * (1 - lr * wd) - lr * u into one FMA);
    # a sign flipped by a near-zero decoded coefficient would move a parameter by 2 * lr * lr_scale = 5e-3
    close = sum(int(((a - b).abs() < 1e-6).sum()) for a, b in zip(fused[0][0], torch_[0][0]))
    total = sum(a.numel() for a in fused[0][0])
    assert close / total > 0.999, f"only {close}/{total} parameters match the torch path's"


def test_kernels_option_is_checked():
    params = list(small_model(0).parameters())
    with pytest.raises(ValueError, match="sync.kernels"):
        build_sync(SyncConfig(name="demo", kernels="cuda"), params, ThreadCommunicator.group(1)[0])
    bf16 = [p.detach().to(DEV, torch.bfloat16).requires_grad_() for p in params]
    with pytest.raises(ValueError, match="float32"):
        build_sync(SyncConfig(name="demo", kernels="triton"), bf16, ThreadCommunicator.group(1)[0])


def test_fused_abort_state_roundtrip_and_poisoned_payload():
    """The `Sync` contract with the fused groups: abort changes nothing, a state round trip continues with
    the same bits, and a NaN gradient in a fused group is refused on every rank (nobody hangs)."""
    from compression import PayloadError
    from compression_testkit import roundtrip_continues_identically, state_digest

    base = small_model(0)
    cfg = SyncConfig(name="demo", kernels="triton", delayed_apply=True)

    def body(comm):
        params_cpu, sync = _train(comm, 3, cfg, base)
        params = sync.params
        before = (digest(params), state_digest(sync.state_dict()))
        _set_grads(params, torch.Generator().manual_seed(7))
        sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
        sync.abort()
        unchanged = before == (digest(params), state_digest(sync.state_dict()))
        roundtrip, fresh = roundtrip_continues_identically(sync, params, _set_grads, lambda: build_sync(cfg, params, comm))
        assert fresh.fused[0], "the first weight is 64x64-chunked: a fused group"
        _set_grads(params, torch.Generator().manual_seed(11))
        if comm.rank == 0:
            params[0].grad[5, 5] = float("nan")
        try:
            fresh.exchange(lr=1e-3, weight=1.0)
            rejected = None
        except PayloadError as e:
            rejected = e.sender_rank
        return unchanged, roundtrip, rejected

    assert run_threads(2, body) == [(True, True, 0), (True, True, 0)]


def test_corrupt_payload_is_refused_after_the_decode_is_graph_captured():
    """On CUDA the decode runs eagerly once, is captured at its second use and replayed from the third:
    a corrupt payload arriving at a replay must be refused like any other, leaving nothing applied."""
    from compression import PayloadError
    from compression_testkit import TamperingCommunicator, state_digest

    base = small_model(0)
    cfg = SyncConfig(name="demo", kernels="triton")

    def flip(row):
        row[40] ^= 0x10
        return row

    def body(comm):
        params_cpu, sync = _train(comm, 3, cfg, base)  # eager, capture, replay
        sync.rebind(TamperingCommunicator(comm, victim=1, edit=flip))
        before = (digest(sync.params), state_digest(sync.state_dict()))
        _set_grads(sync.params, torch.Generator().manual_seed(5 + comm.rank))
        try:
            sync.exchange(lr=1e-3, weight=1.0)
            return "no error"
        except PayloadError as e:
            sync.abort()
            same = before == (digest(sync.params), state_digest(sync.state_dict()))
            sync.rebind(comm)
            sync.exchange(lr=1e-3, weight=1.0)
            sync.commit()
            return e.sender_rank, e.reason, same, digest(sync.params)

    out = run_threads(2, body)
    assert [o[:3] for o in out] == [(1, "checksum mismatch", True)] * 2, out
    assert out[0][3] == out[1][3]


@pytest.mark.parametrize("rms", [False, True])
def test_decode_apply_in_one_pass_gives_the_bits_of_decode_then_apply(rms):
    g = torch.Generator().manual_seed(8)
    shapes = [(128, 64), (192,), (64, 128)]
    plan = ChunkPlan(shapes, 64)
    for grp in plan.groups:
        a = [torch.randn(s, generator=g).to(DEV) for s in shapes]
        b = [t.clone() for t in a]
        E = 8
        idx = torch.stack([torch.randperm(grp.numel, generator=g)[:E] for _ in range(grp.n_chunks)]).to(DEV)
        coef = torch.randn(grp.n_chunks, E, generator=g).to(DEV)
        ch, cw = dct_basis(grp.h, DEV), dct_basis(grp.w, DEV)
        table = kernels.TileTable(grp.slots, DEV)
        u = torch.empty(grp.n_chunks, grp.h, grp.w, device=DEV, dtype=torch.float32 if rms else torch.bfloat16)
        kernels.fused_decode(idx, coef, ch, cw, u, rms=rms)
        kernels.fused_apply(u, a, kernels.Addresses(DEV).deltas(a), table, 0.01, 0.999)
        kernels.fused_decode_apply(idx, coef, ch, cw, b, kernels.Addresses(DEV).deltas(b), table, 0.01, 0.999, rms=rms)
        assert digest(a) == digest(b)


@pytest.mark.parametrize("n_chunks,numel,k", [(7, 4096, 4), (33, 64, 3), (5, 48, 7)])
def test_triton_sections_pack_and_unpack_exactly_as_the_torch_ops(n_chunks, numel, k):
    """`kernels.TritonSections` against `codec.Sections`: the same payload bytes, then from clean and
    from corrupted payloads (a count above k, an index out of range, a duplicate, random bytes) the same
    indices, values, masks and check flags."""
    from compression.codec import TORCH_SECTIONS, GroupSpec, WireFormat

    g = torch.Generator().manual_seed(n_chunks)
    spec = GroupSpec(n_chunks, numel, k, 1)
    wire = WireFormat([spec])
    fast = kernels.TritonSections()
    assert fast.takes(spec) and not fast.takes(GroupSpec(n_chunks, numel, k, 16))
    idx = torch.stack([torch.randperm(numel, generator=g)[:k] for _ in range(n_chunks)]).to(DEV)
    val = torch.randn(n_chunks, k, generator=g)
    val = val.gather(1, val.abs().argsort(1, descending=True))
    val[1, k - 2:] = 0.0        # a chunk with fewer nonzero picks than k
    val = val.to(DEV)
    ref = wire.encode([idx], [val], rank=0, step=3, weight=1.0)
    got = wire.encode([idx], [val], rank=0, step=3, weight=1.0, sections=fast)
    assert torch.equal(ref, got)

    rows = [ref.clone() for _ in range(5)]
    body = slice(32, 32 + spec.nbytes)
    rows[1][32 + spec.index_bytes] = 0xFF                 # first chunk's count field all ones: above k
    rows[2][32:32 + 2] = 0xFF                             # first index all ones: out of range unless 2**bits
    rows[3][32:32 + spec.index_bytes] = 0                 # every index 0: duplicates
    rows[4][body] = torch.randint(0, 256, (spec.nbytes,), generator=g, dtype=torch.uint8).to(DEV)
    gathered = torch.stack(rows)
    for clamp in (False, True):
        a = TORCH_SECTIONS.unpack(gathered[:, body], spec, validate=True, clamp=True)
        b = fast.unpack(gathered[:, body], spec, validate=True, clamp=clamp)
        for x, y, what in zip(a, b, ("indices", "values", "masks", "flags")):
            assert x.dtype == y.dtype and torch.equal(x, y), what
    flags = a[3]
    assert flags[0].all()
    assert bool(flags[1, 0]) == (2 ** spec.count_bits - 1 <= k)    # a count field of all ones
    assert bool(flags[2, 1]) == (numel == 2 ** spec.index_bits)     # an index of all ones
    assert not flags[3, 2]                                          # duplicates


def _signed_payloads(n_chunks=9, numel=4096, k=4, W=3, seed=0):
    from compression.codec import GroupSpec, WireFormat

    g = torch.Generator().manual_seed(seed)
    wire = WireFormat([GroupSpec(n_chunks, numel, k, 1), GroupSpec(2 * n_chunks, 64, k, 1)])
    rows = []
    for r in range(W):
        idx = [torch.stack([torch.randperm(s.numel, generator=g)[:k] for _ in range(s.n_chunks)]).to(DEV)
               for s in wire.groups]
        val = [torch.randn(s.n_chunks, k, generator=g).to(DEV) for s in wire.groups]
        val = [v.gather(1, v.abs().argsort(1, descending=True)) for v in val]
        rows.append(wire.encode(idx, val, rank=r, step=7, weight=float(r + 1)))
    return wire, torch.stack(rows)


def test_triton_header_seal_and_checks_give_the_torch_ops_bytes_and_flags():
    """`TritonSections.seal` and `.header_flags` (two kernels each way, whatever the payload's size) against the
    torch ops: the same header and checksum bytes, a nonzero non-finite count writing the weight as NaN, and
    for every header fault (magic, rank, length, checksum, each bad weight, a stale step) the same flags."""
    import struct

    from compression.codec import TORCH_SECTIONS

    fast = kernels.TritonSections()
    wire, gathered = _signed_payloads()
    for bad in (None, torch.zeros(5, dtype=torch.int32, device=DEV),
                torch.tensor([0, 0, 3, 0], dtype=torch.int32, device=DEV)):
        for step in (7, torch.tensor(-2, device=DEV)):
            a, b = gathered[1].clone(), gathered[1].clone()
            ok_a = TORCH_SECTIONS.seal(wire, a, 1, step, 2.5, bad)
            ok_b = fast.seal(wire, b, 1, step, torch.tensor(2.5, dtype=torch.float64, device=DEV), bad)
            assert torch.equal(a, b) and bool(ok_a) == bool(ok_b) == (bad is None or not bool(bad.any()))

    def weight(v):
        return torch.frombuffer(bytearray(struct.pack("<d", v)), dtype=torch.uint8).to(DEV)

    faults = [lambda p: p.__setitem__(slice(0, 1), 0x41),                 # magic
              lambda p: p.__setitem__(slice(4, 5), 9),                    # sender rank
              lambda p: p.__setitem__(slice(24, 25), 3),                  # length
              lambda p: p.__setitem__(slice(40, 41), p[40] ^ 0x10)]       # a section byte: checksum
    faults += [lambda p, v=v: p.__setitem__(slice(16, 24), weight(v))     # each bad weight (resealed)
               for v in (float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 2.0 ** 41)]
    faults += [lambda p: p.__setitem__(slice(8, 16), torch.tensor([8, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8))]
    for i, fault in enumerate(faults):
        rows = gathered.clone()
        fault(rows[1])
        if i >= 4:  # the weight and step faults are resealed: only their own check fails
            wire.seal(rows[1])
        for step in (None, 7, torch.tensor(7, device=DEV)):
            wa, fa = TORCH_SECTIONS.header_flags(wire, rows, step)
            wb, fb = fast.header_flags(wire, rows, step)
            assert fa.dtype == fb.dtype == torch.bool and torch.equal(fa, fb), (i, step, fa, fb)
            assert torch.equal(wa.view(torch.int64), wb.view(torch.int64))
            stale_only = i == len(faults) - 1 and step is None
            assert fa[0].all() and fa[2].all() and fa[1].all() == stale_only


@pytest.mark.parametrize("W,k", [(1, 4), (3, 4), (2, 7), (8, 8)])
def test_fused_consensus_matches_the_pairwise_mean(W, k):
    """`fused_consensus` against `demo.pairwise_mean`: the same flat indices and, at each pick, the weighted
    mean at its first occurrence and 0 at repeats and masked picks (picks collide often: 40 coefficients)."""
    from compression.demo import pairwise_mean

    g = torch.Generator().manual_seed(W * 10 + k)
    N, numel = 37, 40
    idx = torch.stack([torch.stack([torch.randperm(numel, generator=g)[:k] for _ in range(N)]) for _ in range(W)])
    vals = torch.randn(W, N, k, generator=g).sign()
    mask = (torch.rand(W, N, k, generator=g) > 0.2).float()
    vals *= mask
    weights = torch.rand(W, generator=g) * 100 + 1
    ref = pairwise_mean(idx, vals * weights.view(W, 1, 1), mask * weights.view(W, 1, 1))
    flat, coef = kernels.fused_consensus(idx.to(DEV), vals.to(DEV), mask.to(DEV), weights.to(DEV))
    assert torch.equal(flat.cpu(), idx.permute(1, 0, 2).reshape(N, W * k))
    assert torch.equal(coef.cpu() == 0, ref == 0)
    torch.testing.assert_close(coef.cpu(), ref, rtol=1e-6, atol=0)
