"""`train.compile`: the workers' forward+loss through torch.compile (inductor, on CPU here).

Every compiled test uses the one tiny GPT shape of `solo_replica` (1 layer, 2 heads, 32 wide, bytes vocabulary,
64-token rows), so inductor builds its code once per machine (its FX graph cache) and the rest of the file reuses
it. Fingerprint cadence (`train.fingerprint_every`) is tested here too: it runs with eager workers."""
import logging

import pytest
import torch

from datasets import DataPlan, get_tokenizer
from elastic.config import ConfigError, load_config
from elastic.messages import StepCall
from elastic.model import CompiledLoss, build_model, compile_enabled, pad_rows

from .conftest import SOLO, solo_replica


def _tiny_gpt():
    cfg = load_config("tiny", SOLO)
    return build_model(cfg.model, get_tokenizer("bytes").vocab_size, seed=0), cfg


def _batch(rows: int, seq: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows, seq), generator=g)
    y = torch.randint(0, vocab, (rows, seq), generator=g)
    y[-1, seq // 2:] = -1  # padding in the last row, as packed documents leave
    return x, y


def _loss_and_grads(fn, model, x, y):
    for p in model.parameters():
        p.grad = None
    loss = fn(x, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compile_setting_auto_is_cuda_only_and_a_bad_value_is_named():
    assert compile_enabled("auto", torch.device("cpu")) is False
    assert compile_enabled("auto", torch.device("cuda", 0)) is True
    assert compile_enabled("True", torch.device("cpu")) is True and compile_enabled("false", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="train.compile: 'yes' must be auto"):
        compile_enabled("yes", torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.compile: 'maybe' must be auto"):
        load_config("tiny", ["train.compile=maybe"])
    with pytest.raises(ConfigError, match="train.fingerprint_every: -1 must be >= 0"):
        load_config("tiny", ["train.fingerprint_every=-1"])


def test_padding_rows_changes_neither_the_loss_nor_the_gradients():
    model, _ = _tiny_gpt()
    x, y = _batch(1, 64, model.shape.vocab_size, seed=1)
    eager = lambda a, b: model(a, b)[1]  # noqa: E731
    loss, grads = _loss_and_grads(eager, model, x, y)
    loss_p, grads_p = _loss_and_grads(eager, model, *pad_rows(x, y, 2))
    torch.testing.assert_close(loss_p, loss, rtol=1e-6, atol=1e-6)
    for g, gp in zip(grads, grads_p):
        torch.testing.assert_close(gp, g, rtol=1e-5, atol=1e-7)


def test_compiled_loss_and_gradients_equal_eager_for_every_row_count_with_one_graph():
    """Warm-up compiles once; micro-batches of 1, 3 and 5 rows then run that graph (no recompile), with eager's
    loss and gradients; the warm-up itself left the parameters, their gradients and the RNG as they were."""
    from torch._dynamo.utils import counters

    model, cfg = _tiny_gpt()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # a half-accumulated step must survive the warm-up
    rng = torch.random.get_rng_state()
    compiled = CompiledLoss(model, name="tiny GPT")
    compiled.warm_up(4, cfg.train.seq_len, model.shape.vocab_size, torch.device("cpu"), bf16=False)
    assert compiled.warmed and not compiled.fallback
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)
    graphs = counters["stats"]["unique_graphs"]
    eager = lambda a, b: model(a, b)[1]  # noqa: E731
    for rows in (1, 3, 5):
        x, y = _batch(rows, cfg.train.seq_len, model.shape.vocab_size, seed=rows)
        loss_c, grads_c = _loss_and_grads(compiled, model, x, y)
        loss_e, grads_e = _loss_and_grads(eager, model, x, y)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs, "a row count recompiled after the warm-up"
    assert not compiled.fallback


class _SpecializesBatch(torch.nn.Module):
    """A model whose code branches on the batch size: dynamo cannot keep that dimension dynamic."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x, y):
        scale = 2.0 if x.size(0) == 3 else 1.0
        return None, (x.float() @ self.w).mean() * scale


def test_a_model_compile_cannot_take_trains_eagerly_after_one_warning(caplog):
    model = _SpecializesBatch()
    compiled = CompiledLoss(model, name="hf:/models/odd")
    x = torch.ones(3, 4)
    with caplog.at_level(logging.WARNING, logger="raydistro.model"):
        first = compiled(x, x)
        second = compiled(torch.ones(5, 4), None)
    assert compiled.fallback, "the constraint violation should have switched it to eager"
    assert first.item() == 8.0 and second.item() == 4.0  # eager's values
    warnings = [r for r in caplog.records if "torch.compile failed for hf:/models/odd" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_an_error_the_model_raises_eagerly_too_is_raised_and_keeps_compile_on():
    model, cfg = _tiny_gpt()
    compiled = CompiledLoss(model)
    x = torch.zeros(2, cfg.train.seq_len, dtype=torch.long)
    y = torch.zeros(2, cfg.train.seq_len // 2, dtype=torch.long)  # targets that do not fit the inputs
    with pytest.raises((RuntimeError, ValueError)):
        compiled(x, y)
    assert not compiled.fallback


def _steps(rep, shards, n: int):
    plan = DataPlan(shards, seed=0)
    commit, reports = None, []
    for step in range(n):
        report = rep.step(StepCall(step, plan.assign(step, {0: 600})[0], 1e-3, commit_first=commit))
        assert report.ok, report
        reports.append(report)
        plan.commit(step)
        commit = step
    return reports, rep.commit(commit)


def test_two_compiled_replicas_stay_bit_identical_and_track_eager():
    """Replicas that compile (each warms up in `prepare`, as a Ray worker does before it counts as ready) and
    train the same documents hold the same bits after every step; their losses are eager's."""
    runs = []
    for compile_ in ("true", "true", "false"):
        # micro-batches of <= 64 rows: the graph the test above built serves them (inductor's cache)
        rep, shards = solo_replica(f"train.compile={compile_}", "train.apply_ahead=true", "train.micro_batch_tokens=4096")
        assert (rep.compiled is not None) == (compile_ == "true")
        rep.prepare()
        compiles = rep.compiled.watch.compiles if rep.compiled is not None else 0
        runs.append(_steps(rep, shards, 4))
        if rep.compiled is not None:  # the warm-up compiled every row count the steps used
            assert rep.compiled.watch.compiles == compiles and rep.compiled.warmed and not rep.compiled.fallback
    (rep_a, print_a), (rep_b, print_b), (rep_e, _) = runs
    assert [r.fingerprint for r in rep_a] == [r.fingerprint for r in rep_b] and print_a == print_b
    assert all(r.fingerprint for r in rep_a[1:])  # CPU default: one every step
    for a, e in zip(rep_a, rep_e):
        assert a.loss == pytest.approx(e.loss, rel=1e-4)


def test_fingerprints_every_n_steps_and_at_every_waited_commit():
    rep, shards = solo_replica("train.fingerprint_every=3")
    reports, last = _steps(rep, shards, 7)
    # step s's report carries the print of s committed steps (after commit s-1): due at 3 and 6
    carried = {r.step: r.fingerprint for r in reports[1:]}
    assert {s for s, f in carried.items() if f} == {3, 6}, carried
    assert last and last == rep.fingerprint()  # a commit the coordinator waits on always has one
    assert carried[6] != last


def test_compiling_keeps_beating_and_is_counted():
    """A compilation (here dynamo's own tracing, backend eager) runs the heartbeat: a worker that recompiles
    mid-step keeps showing progress to the liveness watch."""
    from elastic.model import CompileHeartbeat

    beats = []
    watch = CompileHeartbeat(lambda: beats.append(1), every_s=0.001)

    def slow_to_trace(x):
        for _ in range(200):  # enough bytecode for a few milliseconds of tracing
            x = x * 1.0001 + 0.5
        return x

    torch.compile(slow_to_trace, backend="eager")(torch.ones(3))
    assert watch.compiles >= 1 and beats, (watch.compiles, len(beats))
    n = len(beats)
    import time
    time.sleep(0.05)
    assert len(beats) == n  # stopped with the compilation


def test_no_beat_lands_after_a_compilation_ends():
    """`_end` waits for the ticker: a tick whose wait ran out just before the stop, and is inside a slow `beat`,
    finishes before `_end` returns. (Without the join about 1 in 20 of these cycles saw a late beat.)"""
    import time

    from elastic.model import CompileHeartbeat

    beats = []
    watch = CompileHeartbeat(lambda: (time.sleep(0.0002), beats.append(1)), every_s=0.0005)
    late = 0
    for _ in range(200):
        watch._start(None)
        time.sleep(0.002)
        watch._end(None)
        n = len(beats)
        time.sleep(0.002)
        late += len(beats) != n
    assert beats and late == 0, late


@pytest.mark.slow  # ~30 s on 2 busy cores (two workers compile at once); the unit tests above run in CI
def test_a_short_run_with_compiled_workers(tmp_path, ray_cluster):
    """Two Ray workers with train.compile=true (each compiles in `prepare`, before it counts as ready) train to
    the end with agreeing replicas. The model is `solo_replica`'s shape, so inductor's cache from the tests above
    serves the workers too."""
    from elastic.cli import train

    from .conftest import small_config

    cfg = small_config(tmp_path, ray_cluster.address, "run.name=compiled", "train.steps=6", "train.compile=true",
                       "model.n_head=4", "model.n_embd=128", "model.block_size=128",
                       "train.micro_batch_tokens=4096", "sync.name=demo")
    summary = train(cfg)
    assert summary["state"] == "FINISHED" and summary["steps"] == 6, summary.get("error")
    assert summary["replica_hashes_agree"] is True and not summary["membership_changes"]
    assert summary["final_loss"] < summary["initial_loss"]


@pytest.mark.slow  # inductor builds a Llama's CPU code: ~30 s from a cold cache
def test_a_hugging_face_llama_compiles_to_eagers_loss(tmp_path):
    """model.hf: the tiny Llama of hf_testkit (rotary positions, grouped-query attention) compiles, and any row
    count then gives eager's loss without recompiling (else it would fall back to eager with one warning)."""
    pytest.importorskip("transformers")
    from .hf_testkit import VOCAB, build_llama_dir

    d = build_llama_dir(tmp_path / "llama")
    cfg = load_config("tiny", [f"model.hf={d}", f"data.tokenizer=hf:{d}", "train.seq_len=64"])
    model = build_model(cfg.model, VOCAB, seed=0)
    compiled = CompiledLoss(model, name=f"hf:{d}")
    compiled.warm_up(8, 64, model.shape.vocab_size, torch.device("cpu"), bf16=False)
    assert compiled.warmed and not compiled.fallback, compiled.fallback
    compiles = compiled.watch.compiles
    for rows in (1, 3, 8):
        x, y = _batch(rows, 64, model.shape.vocab_size, seed=rows)
        torch.testing.assert_close(compiled(x, y).detach(), model(x, y)[1].detach(), rtol=1e-5, atol=1e-5)
    assert compiled.watch.compiles == compiles


@pytest.mark.slow  # a 3-worker Ray run, ~40 s on 2 cores
def test_a_drifted_replica_is_found_within_fingerprint_every_steps_and_resynced(tmp_path, ray_cluster):
    """train.fingerprint_every=4: a replica drifts after 9 committed steps; the next due print (12 committed)
    finds it, and it is re-synced from the majority."""
    from elastic.cli import train

    from .conftest import small_config

    cfg = small_config(tmp_path, ray_cluster.address, "run.name=divn", "train.steps=20", "train.workers=3",
                       "sync.name=dense", "chaos.diverge_at=[9]", "train.fingerprint_every=4")
    summary = train(cfg)
    assert summary["state"] == "FINISHED" and summary["steps"] == 20
    assert [d["when"] for d in summary["replica_disagreements"]] == ["after step 11"], summary["replica_disagreements"]
    assert any(e["what"].startswith("resync ") for e in summary["events"]), summary["events"]
