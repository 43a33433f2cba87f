"""sync.hierarchy=node over threads: ranks as threads of one process, grouped into simulated nodes."""
import copy
import math

import pytest
import torch

from compression import PayloadError, SyncConfig, build_sync, run_threads
from compression.dct import ChunkPlan
from compression.hierarchy import node_topology, run_node_threads, shard_ranges

from compression_testkit import commit_undo_commit, digest, set_random_grads, small_model, state_digest

BASE = small_model(0)
DEMO = SyncConfig(name="demo")
NODE = SyncConfig(name="demo", hierarchy="node")


# ---- topology --------------------------------------------------------------------------------------------
def test_two_nodes_of_two_shard_the_chunks_in_two_and_pair_equal_local_ranks():
    t = node_topology(["a", "b", "a", "b"])
    assert t.local_groups == ((0, 2), (1, 3)) and t.cross_groups == ((0, 1), (2, 3)) and t.shards == 2
    assert [(p.node, p.local_rank, p.shard) for p in t.placements] == [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1)]


def test_nodes_of_different_sizes_shard_by_the_smallest_and_the_rest_are_dense_only():
    t = node_topology(["a", "a", "a", "b", "b", "c", "c", "c", "c"])
    assert t.shards == 2 and t.nodes == 3
    assert t.cross_groups == ((0, 3, 5), (1, 4, 6))
    assert [p.shard for p in t.placements] == [0, 1, -1, 0, 1, 0, 1, -1, -1]


def test_cross_groups_are_sorted_global_ranks_whatever_the_node_order():
    t = node_topology(["a", "b", "b", "a"])  # torch.distributed numbers a group's ranks in sorted order
    assert t.local_groups == ((0, 3), (1, 2)) and t.cross_groups == ((0, 1), (2, 3))


def test_a_rank_without_a_node_id_is_refused_by_name():
    with pytest.raises(ValueError, match="no node id"):
        node_topology(["a", ""])


def test_shards_cover_every_chunk_exactly_once():
    plan = ChunkPlan([tuple(p.shape) for p in BASE.parameters()], 64)
    for S in (1, 2, 3, 5):
        for gi, g in enumerate(plan.groups):
            spans = [shard_ranges(plan, s, S)[gi] for s in range(S)]
            assert spans[0][0] == 0 and spans[-1][1] == g.n_chunks
            assert all(spans[i][1] == spans[i + 1][0] for i in range(S - 1))


# ---- the sync over threads ---------------------------------------------------------------------------------
def _train(comm, rank, steps, cfg, lr=1e-3, wd=0.1, weights=(3.0, 1.0, 2.0, 1.0, 2.0), base=BASE):
    model = copy.deepcopy(base)
    params = list(model.parameters())
    sync = build_sync(cfg, params, comm)
    gen = torch.Generator().manual_seed(100 + rank)
    sent = []
    for _ in range(steps):
        set_random_grads(params, gen)
        st = sync.exchange(lr=lr, weight=weights[rank], weight_decay=wd)
        sync.commit()
        sent.append(st)
    return model, sync, sent


@pytest.mark.parametrize("nodes", [["a", "b", "a", "b"], ["a", "a", "a", "b", "b"], ["a", "b", "c"]])
def test_replicas_stay_bit_identical_and_move(nodes):
    out = run_node_threads(nodes, lambda r, g: digest(_train(g, r, 5, NODE)[0].parameters()))
    assert len(set(out)) == 1 and out[0] != digest(BASE.parameters())


def test_cross_node_bytes_are_about_half_of_flat_demo_at_two_ranks_per_node():
    nodes, wide = ["a", "b", "a", "b"], torch.nn.Linear(1024, 1024)  # 256 chunks: headers are not the payload
    hier = run_node_threads(nodes, lambda r, g: _train(g, r, 1, NODE, base=wide)[2][0])
    flat = run_threads(4, lambda c: _train(c, c.rank, 1, DEMO, base=wide)[2][0])
    per_node = lambda stats: {n: sum(s.bytes_sent for r, s in enumerate(stats) if nodes[r] == n) for n in "ab"}
    h, f = per_node(hier), per_node(flat)
    assert f["a"] == 2 * flat[0].bytes_sent  # flat: every GPU sends its own payload off the node
    # node: one payload's worth (two shards of half the chunks; one extra 32-byte header)
    assert 0.49 < h["a"] / f["a"] < 0.51, (h, f)
    assert h == {"a": h["b"], "b": h["b"]}
    assert all(s.local_bytes_sent > 0 for s in hier) and all(s.local_bytes_sent == 0 for s in flat)


def test_loss_on_a_toy_regression_is_comparable_to_flat_demo():
    """4 ranks with their own data of one linear teacher: node (2 x 2) gets near flat demo's loss while sending
    half the picks across nodes (measured: start 1.93, flat 0.69, node 0.83)."""
    teacher = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.1
    xs = [torch.randn(64, 128, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    mse = lambda model, x: torch.nn.functional.mse_loss(model(x), x @ teacher.T)  # noqa: E731
    cfg_kw, steps = dict(name="demo", topk=16, decay=0.9, lr_scale=1.0), 60

    def fit(comm, rank, cfg):
        model = torch.nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        sync = build_sync(cfg, list(model.parameters()), comm)
        for step in range(steps):
            model.weight.grad = None
            mse(model, xs[rank]).backward()
            sync.exchange(lr=1e-2 * 0.5 * (1 + math.cos(math.pi * step / steps)), weight=64.0)
            sync.commit()
        with torch.no_grad():
            return sum(float(mse(model, x)) for x in xs) / 4

    start = sum(float((x @ teacher.T).square().mean()) for x in xs) / 4
    flat = run_threads(4, lambda c: fit(c, c.rank, SyncConfig(**cfg_kw)))[0]
    node = run_node_threads(["a", "b", "a", "b"], lambda r, g: fit(g, r, SyncConfig(hierarchy="node", **cfg_kw)))
    assert len(set(node)) == 1
    assert node[0] < 0.5 * start and flat < 0.5 * start
    assert node[0] < 1.3 * flat, (node[0], flat, start)


def test_an_abstaining_rank_fails_the_step_on_every_node_naming_nobody_and_nothing_moves():
    def body(r, g):
        model, sync, _ = _train(g, r, 2, NODE)
        before = (digest(model.parameters()), state_digest(sync.state_dict()), sync.step_count)
        set_random_grads(list(model.parameters()), torch.Generator().manual_seed(5))
        try:
            sync.exchange(lr=1e-3, weight=float("nan") if r == 3 else 1.0)
            raised = None
        except PayloadError as e:
            raised = e.sender_rank
        sync.abort()
        return raised, before == (digest(model.parameters()), state_digest(sync.state_dict()), sync.step_count)

    out = run_node_threads(["a", "b", "a", "b"], body)
    assert out == [(-1, True)] * 4


def test_a_corrupt_cross_payload_is_refused_on_every_rank_naming_its_global_sender():
    from compression.hierarchy import NodeGroups
    from compression_testkit import TamperingCommunicator

    def flip(row):
        row[40] ^= 0xFF
        return row

    def body(r, g):
        if g.cross is not None and g.shard == 1:  # shard 1's cross group: global ranks (2, 3); node b's is 3
            g = NodeGroups(g.local, TamperingCommunicator(g.cross, victim=1, edit=flip), g.shard, g.shards,
                           g.cross_ranks)
        model = copy.deepcopy(BASE)
        sync = build_sync(NODE, list(model.parameters()), g)
        set_random_grads(list(model.parameters()), torch.Generator().manual_seed(r))
        try:
            sync.exchange(lr=1e-3, weight=1.0)
        except PayloadError as e:
            return e.sender_rank, "checksum" in e.reason
        return None

    assert run_node_threads(["a", "b", "a", "b"], body) == [(3, True)] * 4


def test_state_roundtrip_and_rebind_to_another_topology_keep_training_identically():
    """A checkpoint of 2 x 2 loads into the same layout bit for bit; rebinding to 1 x 2 + 1 x 1 (a GPU left
    node b) keeps the replicas equal and hands node a's momentum to its new single owner."""
    def body(r, g):
        model, sync, _ = _train(g, r, 2, NODE)
        sd = sync.state_dict()
        again = build_sync(NODE, list(copy.deepcopy(model).parameters()), g)
        again.load_state_dict(sd)
        return state_digest(sd) == state_digest(again.state_dict()), model, sync

    out = run_node_threads(["a", "b", "a", "b"], body)
    assert all(ok for ok, _, _ in out)
    models, syncs = [m for _, m, _ in out[:3]], [s for _, _, s in out[:3]]  # rank 3 (node b) left
    node_a_before = [f0 + f2 for f0, f2 in zip(syncs[0]._full_momentum(), syncs[2]._full_momentum())]
    assert all(float(f.abs().sum()) > 0 for f in syncs[2]._full_momentum())  # rank 2 owned shard 1 of node a

    def after(r, g):
        syncs[r].rebind(g)
        handed = [t.clone() for t in syncs[r]._full_momentum()]
        params = list(models[r].parameters())
        gen = torch.Generator().manual_seed(7 + r)
        for _ in range(2):
            set_random_grads(params, gen)
            syncs[r].exchange(lr=1e-3, weight=1.0)
            syncs[r].commit()
        return digest(params), handed

    res = run_node_threads(["a", "b", "a"], after)
    assert len({d for d, _ in res}) == 1
    assert syncs[2].codec is None  # node a has 2 ranks, node b 1: one shard; a's second rank is dense-only
    assert all(torch.equal(h, b) for h, b in zip(res[0][1], node_a_before))  # rank 0 now holds all of node a's


def test_bench_times_one_shard_against_the_whole_chunk_set(capsys):
    import json

    from compression.bench import main

    assert main(["--model", "micro", "--shards", "2", "--steps", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["shards"] == 2 and res["shard_codec_ms"] > 0 and res["whole_codec_ms"] > 0
    assert 0.5 < res["shard_payload_bytes"] / res["whole_payload_bytes"] < 0.55  # half the picks, one more header
    # the per-path profile: the host's dispatched ops do not shrink with the shard (the same code per group; a
    # group with no chunk in the shard skips a few) - what CUDA graphs take off the host
    whole, shard = res["whole_profile"]["dispatched_ops_per_step"], res["shard_profile"]["dispatched_ops_per_step"]
    assert 0 < shard <= whole and shard > 0.9 * whole, (shard, whole)


def test_tokens_weigh_ranks_inside_a_node_as_one_rank_of_their_mean_gradient_would():
    """Throughput-weighted shares: a node of two ranks (3 and 1 tokens) moves the model as one rank holding their
    token-weighted mean gradient with 4 tokens would (equal up to float rounding of the mean)."""
    gens = [torch.Generator().manual_seed(40 + r) for r in range(3)]
    grads = [[torch.randn(p.shape, generator=g) for p in BASE.parameters()] for g in gens]
    merged = [(3 * a + b) / 4 for a, b in zip(grads[0], grads[1])]

    def run(r, g, plan):
        model = copy.deepcopy(BASE)
        params = list(model.parameters())
        sync = build_sync(NODE, params, g)
        mine, weight = plan[r]
        for _ in range(3):
            for p, gr in zip(params, mine):
                p.grad = gr.clone()
            sync.exchange(lr=1e-3, weight=weight)
            sync.commit()
        return torch.cat([p.detach().reshape(-1) for p in params])

    two = run_node_threads(["a", "a", "b"], lambda r, g: run(r, g, [(grads[0], 3.0), (grads[1], 1.0), (grads[2], 2.0)]))
    one = run_node_threads(["a", "b"], lambda r, g: run(r, g, [(merged, 4.0), (grads[2], 2.0)]))
    assert torch.equal(two[0], two[2])
    assert (two[0] == one[0]).float().mean() > 0.999, (two[0] != one[0]).sum()


def test_undo_of_a_commit_restores_everything_and_the_step_can_be_committed_again():
    """train.apply_ahead: commit(keep_undo=True) then undo() puts parameters, momentum and the pending update
    back bit for bit; committing again gives what one plain commit gives."""
    def body(r, g, undo=True):
        model, sync, _ = _train(g, r, 2, NODE)
        params = list(model.parameters())
        before, applied, undone, again = commit_undo_commit(sync, params, 7 + r, undo)
        return before == undone, applied == again, applied != before, digest(params)

    out = run_node_threads(["a", "b", "a", "b"], body)
    assert [o[:3] for o in out] == [(True, True, True)] * 4
    plain = run_node_threads(["a", "b", "a", "b"], lambda r, g: body(r, g, undo=False))
    assert {o[3] for o in out} == {plain[0][3]}


def test_shard_codec_through_the_fused_kernels_matches_the_torch_ops():
    """On CUDA the shard's encode and decode run flat demo's fused kernels on the shard's chunks of the gathered
    gradient (here: Triton's interpreter): the same picks and payload, the same decoded update, the same new
    momentum (to float rounding: the kernel's DCT sums in another order) as the torch ops; the committed
    momentum is untouched and a non-finite gradient poisons the payload's weight."""
    import compression.kernels as kernels
    from compression.hierarchy import ShardCodec

    if not kernels.available(torch.device("cpu")):
        pytest.skip("Triton's interpreter is not on (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)")
    shapes = [(128, 64), (64,), (96, 32), (50,)]   # 32x32 tiles, 1x32 runs, and a ragged vector group
    plan = ChunkPlan(shapes, 32)
    weight = torch.ones((), dtype=torch.float64)
    out = {}
    for fused in (False, True):
        codec = ShardCodec(NODE, plan, 1, 2, "cpu", fused=fused)
        assert bool(codec.tables) == fused
        for step in range(3):   # momentum carries over: later steps encode decay * m + lr * grad
            chunks = plan.gather([torch.randn(s, generator=torch.Generator().manual_seed(10 + step)) for s in shapes], "cpu")
            before = [m.clone() for m in codec.momentum]
            payload, new_m, ok = codec.encode(chunks, 1e-2, weight, rank=0, step=step)
            assert all(torch.equal(a, b) for a, b in zip(before, codec.momentum)), "the committed momentum changed"
            codec.momentum = new_m
        update = [u.clone() for u in codec.decode(payload.unsqueeze(0), 2)]
        out[fused] = (payload, new_m, update, bool(ok))
        bad = [c.clone() for c in chunks]
        bad[0][-1, 0, 0] = float("nan")   # a chunk of shard 1 of the first group
        _, _, ok_bad = codec.encode(bad, 1e-2, weight, rank=0, step=3)
        assert not bool(ok_bad)
    (p1, m1, u1, ok1), (p2, m2, u2, ok2) = out[False], out[True]
    assert ok1 and ok2 and torch.equal(p1, p2)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(m1, m2))
    assert all(torch.equal(a, b) for a, b in zip(u1, u2)) and any(bool(u.abs().sum() > 0) for u in u1)


def test_shard_codec_through_the_triton_sections_sends_and_decodes_the_same_bytes():
    """On CUDA the shard's payload sections go through `kernels.TritonSections` (here: Triton's interpreter):
    the same payload, the same decoded update, the same new momentum as the torch ops."""
    import compression.kernels as kernels
    from compression.codec import TORCH_SECTIONS
    from compression.hierarchy import ShardCodec

    if not kernels.available(torch.device("cpu")):
        pytest.skip("Triton's interpreter is not on (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)")
    shapes = [(128, 64), (64,), (96, 32)]
    plan = ChunkPlan(shapes, 32)
    g = torch.Generator().manual_seed(0)
    chunks = plan.gather([torch.randn(s, generator=g) for s in shapes], "cpu")
    weight = torch.ones((), dtype=torch.float64)
    out = {}
    for name, sections in (("torch", TORCH_SECTIONS), ("triton", kernels.TritonSections())):
        codec = ShardCodec(NODE, plan, 1, 2, "cpu", sections=sections)
        payload, new_m, ok = codec.encode(chunks, 1e-2, weight, rank=0, step=4)
        update = codec.decode(payload.unsqueeze(0), 4)
        out[name] = (payload, new_m, update, bool(ok))
    (p1, m1, u1, ok1), (p2, m2, u2, ok2) = out["torch"], out["triton"]
    assert ok1 and ok2 and torch.equal(p1, p2)
    assert all(torch.equal(a, b) for a, b in zip(m1, m2)) and all(torch.equal(a, b) for a, b in zip(u1, u2))
    assert any(bool(u.abs().sum() > 0) for u in u1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs are captured only on a GPU (run on the device machine)"))])
def test_shard_codec_in_graph_mode_sends_the_same_bytes_and_refuses_the_same_payloads(device):
    """With CUDA graphs on, the encode reads fixed buffers (lr * the shard's gradient, the weight, the step as a
    device tensor in the header) and alternates two momentum sets; the decode reads a copy of the payloads and
    checks after the consensus. On a GPU each key runs eagerly once, is captured the second time and replayed
    from then on; off CUDA the same code runs eagerly. Either way: the same payloads, updates and momentum as
    the plain path step after step (lr 1: the pre-scaled gradient is exact), a momentum set from outside is
    adopted, and a bad payload is refused with the same error."""
    from compression.codec import PayloadError
    from compression.hierarchy import ShardCodec

    shapes = [(128, 64), (64,), (96, 32), (50,)]
    plan = ChunkPlan(shapes, 32)
    weight = torch.full((), 3.0, dtype=torch.float64, device=device)
    codecs = {g: ShardCodec(NODE, plan, 1, 2, device, graphs=g) for g in (False, True)}
    assert codecs[True].graphed and not codecs[False].graphed
    for step in range(4):
        chunks = plan.gather([torch.randn(s, generator=torch.Generator().manual_seed(step)).to(device)
                              for s in shapes], device)
        got = {}
        for g, codec in codecs.items():
            payload, new_m, ok = codec.encode(chunks, 1.0, weight, rank=0, step=step)
            got[g] = (payload.clone(), [m.clone() for m in new_m], bool(ok),
                      [u.clone() for u in codec.decode(payload.unsqueeze(0), step)])
            codec.momentum = new_m
        (p0, m0, ok0, u0), (p1, m1, ok1, u1) = got[False], got[True]
        assert ok0 and ok1 and torch.equal(p0, p1), f"step {step}: the payloads differ"
        assert all(torch.equal(a, b) for a, b in zip(m0, m1)) and all(torch.equal(a, b) for a, b in zip(u0, u1))
    assert codecs[True].momentum is codecs[True]._m_sets[0]   # four steps: back on the first set
    # a momentum given from outside (a checkpoint, an undo of another codec) is copied in and used
    outside = [torch.full_like(m, 0.5) for m in codecs[True].momentum]
    for codec in codecs.values():
        codec.momentum = [m.clone() for m in outside]
    got = [codec.encode(chunks, 1.0, weight, rank=1, step=9)[0] for codec in codecs.values()]
    assert torch.equal(got[0], got[1])
    assert codecs[True].momentum is codecs[True]._m_sets[0]
    # the header with the step as a device tensor is the header with the step as an int
    wire = codecs[True].wire
    assert torch.equal(wire.header(1, torch.tensor(7, device=device), weight, device), wire.header(1, 7, weight, device))
    # a payload of the wrong step is refused the same way
    payload = codecs[True].encode(chunks, 1.0, weight, rank=0, step=5)[0].clone()
    errors = []
    for codec in codecs.values():
        with pytest.raises(PayloadError) as e:
            codec.decode(payload.unsqueeze(0), 6)
        errors.append((e.value.sender_rank, e.value.reason))
    assert errors[0] == errors[1] and "step" in errors[0][1]
