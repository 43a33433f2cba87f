"""CPU smoke test of `python -m elastic bench-gpu`'s pieces (the GPU figures come from the device machine).

The DDP baseline runs for real (a spawned gloo process group, a one-layer GPT, 3 steps); the stack's figures are
checked on a synthetic summary (the full stack on Ray is exercised by test_run.py)."""

import pytest

from elastic.bench import gpu as bench_gpu
from elastic.cli import build_parser

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 0, "dropout": 0.0,
        "tie_embeddings": True}


def test_ddp_baseline_on_cpu_reports_the_fields():
    # one rank keeps this light on a loaded 2-core CI box; the multi-GPU path runs on the device machine
    r = bench_gpu.ddp_bench(world=1, steps=3, warmup=1, rows=3, seq_len=32, model=TINY, tokenizer_vocab=256,
                            device="cpu", micro_rows=2)  # gradient accumulation: micro-batches of 2 and 1 rows
    for key in ("tokens_per_s", "step_ms_median", "bytes_sent_per_worker_per_step", "dense_bf16_bytes",
                "ratio_vs_dense_bf16", "final_loss", "steps_measured"):
        assert key in r, key
    assert r["tokens_per_s"] > 0 and r["steps_measured"] == 2 and r["micro_batch_rows"] == 2
    assert r["bytes_sent_per_worker_per_step"] == 0 and r["workers"] == 1  # one rank: no all-reduce traffic


def test_plain_single_process_loop_on_cpu_needs_no_process_group():
    r = bench_gpu.ddp_bench(world=1, steps=3, warmup=1, rows=2, seq_len=32, model=TINY, tokenizer_vocab=256,
                            device="cpu", plain=True)
    assert r["config"] == "loop" and r["tokens_per_s"] > 0 and "no process group" in r["path"]
    with pytest.raises(ValueError, match="one process"):
        bench_gpu.ddp_bench(world=2, steps=3, warmup=1, rows=2, seq_len=32, model=TINY, tokenizer_vocab=256,
                            device="cpu", plain=True)
    assert [bench_gpu.baseline_name(c, p) for c, p in ((False, False), (True, False), (True, True))] == [
        "ddp", "ddp-compiled", "loop-compiled"]


@pytest.mark.slow  # inductor builds the CPU code in the spawned processes (~1 min from a cold cache)
def test_compiled_baselines_on_cpu_match_the_eager_loss():
    """The compiled rows train the same model on the same tokens as the eager one: the same losses (fp tolerance)."""
    kw = dict(world=1, steps=3, warmup=1, rows=3, seq_len=32, model=TINY, tokenizer_vocab=256, device="cpu",
              micro_rows=2)
    eager = bench_gpu.ddp_bench(**kw)
    for plain in (False, True):
        r = bench_gpu.ddp_bench(**kw, compiled=True, plain=plain)
        assert r["compiled"] and r["config"] == ("loop-compiled" if plain else "ddp-compiled")
        assert r["final_loss"] == pytest.approx(eager["final_loss"], abs=1e-4)


def test_steady_state_excludes_warmup_and_counts_time_between_commits():
    # step, t, wall_s, read_s, compute_s, codec_ms, comm_ms, step_s
    timing = [[s, 100.0 + s * 0.1 + (5.0 if s == 0 else 0.0), 0.09, 0.005, 0.07, 2.0, 1.0, 0.085]
              for s in range(6)]
    hist = [[s, 10.0 - s, 1000 * (s + 1)] for s in range(6)]
    out = bench_gpu.steady_state({"step_timing": timing, "loss_history": hist, "_workers": 2}, warmup=2)
    assert out["steps_measured"] == 3
    assert out["tokens_per_s"] == pytest.approx(3000 / 0.3, rel=1e-3)
    assert out["tokens_per_worker_step_mean"] == 500
    assert out["phases_ms_median"]["step_rpc_overhead"] == pytest.approx(5.0)
    assert out["phases_ms_median"]["commit_fingerprint_and_control"] == pytest.approx(10.0)
    # train.compute_ahead: 40 ms of a 105 ms worker step ran before its call; the call's RPC cost is still 5 ms
    # step, t, wall_s, read_s, compute_s, codec_ms, comm_ms, step_s, commit_s, fwd_bwd_s, ahead_s
    ahead = [[s, 100.0 + s * 0.1, 0.07, 0.005, 0.09, 2.0, 1.0, 0.105, 0.0, 0.08, 0.04] for s in range(6)]
    out = bench_gpu.steady_state({"step_timing": ahead, "loss_history": hist, "_workers": 1}, warmup=2)
    assert out["phases_ms_median"]["computed_ahead"] == pytest.approx(40.0)
    assert out["phases_ms_median"]["step_rpc_overhead"] == pytest.approx(5.0)


def test_mfu_and_param_counts():
    from elastic.config import load_config

    cfg = load_config("gpt2-small")
    c = bench_gpu.param_counts(cfg.model, 50257)
    assert c["vocab"] == 50304 and c["params"] - c["params_nonembedding"] == 50304 * 768 + 1024 * 768
    assert bench_gpu.mfu(1e5, c["params"], 2, 989e12) == pytest.approx(6 * c["params"] * 1e5 / (2 * 989e12), abs=1e-4)
    assert bench_gpu.mfu(1e5, c["params"], 0, None) is None
    assert bench_gpu.peak_flops("2x NVIDIA H100 80GB HBM3") == 989e12


def test_cli_has_the_subcommand():
    args = build_parser().parse_args(["bench-gpu", "--json", "--steps", "5", "--workers", "1", "train.lr=1e-3"])
    assert args.command == "bench-gpu" and args.steps == 5 and args.overrides == ["train.lr=1e-3"]


def test_worker_counts_parse_a_sweep_and_name_a_bad_one():
    assert bench_gpu.worker_counts("", 4) == [4] and bench_gpu.worker_counts("0", 0) == [2]
    assert bench_gpu.worker_counts("4,1,2,2", 4) == [1, 2, 4]
    with pytest.raises(SystemExit, match="8 GPUs but 4 are visible"):
        bench_gpu.worker_counts("1,8", 4)
    with pytest.raises(SystemExit, match="comma list"):
        bench_gpu.worker_counts("two", 4)
    with pytest.raises(SystemExit, match=">= 1"):
        bench_gpu.worker_counts("0,2", 4)


def test_scaling_efficiency_is_per_gpu_throughput_against_the_fewest_workers():
    runs = [{"config": "demo", "workers": 1, "tokens_per_s": 100.0},
            {"config": "demo", "workers": 2, "tokens_per_s": 190.0},
            {"config": "demo", "workers": 4, "tokens_per_s": 360.0},
            {"config": "ddp", "workers": 2, "tokens_per_s": 200.0, "rows_rule": "match"},
            {"config": "ddp", "workers": 4, "tokens_per_s": 400.0, "rows_rule": "match"},
            {"config": "ddp", "workers": 4, "tokens_per_s": 999.0, "rows_rule": "12"},  # not the matched one
            {"config": "dense", "workers": 4, "error": "OOM"}]
    s = bench_gpu.scaling(runs)
    assert s["demo"]["2"]["scaling_efficiency"] == 0.95 and s["demo"]["4"]["scaling_efficiency"] == 0.9
    assert s["ddp"]["4"] == {"tokens_per_s": 400.0, "scaling_efficiency": 1.0, "vs_workers": 2}
    assert "dense" not in s


def test_recorded_row_names_the_command_and_every_run():
    args = build_parser().parse_args(["bench-gpu", "--workers", "2,4", "--configs", "demo,ddp", "--per-gpu-tokens",
                                      "65536", "train.micro_batch_tokens=32768"])
    assert bench_gpu.command_line(args) == ("python -m elastic bench-gpu --workers 2,4 --steps 60 --warmup 10 "
                                            "--per-gpu-tokens 65536 --configs demo,ddp --ddp-rows match "
                                            "train.micro_batch_tokens=32768")
    res = {"torch": "2.11", "date": "2026-11-26 13:34 UTC", "runs": [
        {"config": "demo", "workers": 2, "tokens_per_s": 620018.6, "ddp_tokens_per_s_ratio": 0.97,
         "bytes_sent_per_worker_per_step": 216104, "mfu": 0.2341},
        {"config": "ddp", "workers": 2, "tokens_per_s": 638948.3, "bytes_sent_per_worker_per_step": 497903616},
        {"config": "dense", "workers": 4, "error": "OutOfMemoryError: CUDA out of memory\nmore"},
        {"config": "dense", "workers": 1, "tokens_per_s": 300000.0, "ddp_tokens_per_s_ratio": 0.95,
         "ddp_compiled_tokens_per_s_ratio": 0.7, "loop_compiled_tokens_per_s_ratio": 0.66}],
        "scaling": {"demo": {"2": {"scaling_efficiency": 1.0}, "4": {"scaling_efficiency": 0.987}}}}
    text = bench_gpu.record_text(res)
    assert text.startswith("demo w2 620,019 tokens/s = **0.970x DDP**, 216,104 B sent/worker/step, MFU 0.234; ddp w2")
    assert "dense w4: error OutOfMemoryError: CUDA out of memory;" in text and "more" not in text
    assert "dense w1 300,000 tokens/s = **0.950x DDP** = **0.700x compiled DDP** = **0.660x compiled loop**" in text
    assert "demo scaling efficiency 2 GPUs 1.0, 4 GPUs 0.987 (torch 2.11, 2026-11-26 13:34 UTC)" in text


def test_benchmarks_write_into_the_repository_docs_and_run_children_from_its_root():
    """elastic/bench/ sits two levels under the repository: rows go to its docs/BENCHMARKS.md, and the link
    emulators start children with the repository (where `elastic`, `compression`, `datasets` live) on the path."""
    from pathlib import Path

    from elastic.bench import netwire, runs, slowlink

    repo = Path(__file__).resolve().parents[2]
    assert runs.BENCHMARKS_MD == repo / "docs" / "BENCHMARKS.md" and runs.BENCHMARKS_MD.exists()
    assert netwire.REPO == slowlink.REPO == repo and (repo / "elastic" / "__init__.py").exists()
    assert slowlink.DOCS == repo / "docs"
