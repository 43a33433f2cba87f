"""A real elastic run on a local Ray cluster: completes, records, resumes exactly."""
import json

import pytest
import torch

from elastic.checkpoint import CheckpointStore
from elastic.cli import train
from elastic.config import checkpoint_uri, run_dir

from .conftest import small_config, small_overrides


def test_short_run_completes_and_writes_summary(tmp_path, ray_cluster):
    # several documents per worker and step, so the coordinator can re-split steps by token counts
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=short", "train.steps=12", "train.batch_tokens=8192",
                       "data.max_doc_tokens=8192", "train.profile_at=3", "train.profile_steps=1")
    summary = train(cfg)
    on_disk = json.loads((run_dir(cfg) / "summary.json").read_text())
    assert on_disk["state"] == "FINISHED" and on_disk["steps"] == 12
    for key in ("run_name", "steps", "tokens", "initial_loss", "final_loss", "val_loss", "sync",
                "world_size_history", "bytes_sent_per_worker_total", "dense_equivalent_bytes",
                "membership_changes", "checkpoints", "replica_hashes_agree"):
        assert key in on_disk, key
    assert summary["replica_hashes_agree"] is True
    assert summary["final_loss"] < summary["initial_loss"]
    assert summary["val_loss"] is not None and summary["val_tokens"] > 0
    assert summary["tokens"] > 12 * 256
    assert len(summary["bytes_sent_per_worker_total"]) == 2
    assert all(v > 0 for v in summary["bytes_sent_per_worker_total"].values())
    data = summary["data"]
    assert data["duplicated"] == 0 and data["skipped"] == 0 and data["delivered_once"] > 0
    # the workers read each next step ahead and report its token counts: some steps get re-split by them
    assert 0 < summary["rebalanced_steps"] < 12, summary.get("rebalanced_steps")
    # ... and cut between the two ranks at token level (train.split_docs): exactly-once holds (above)
    assert 0 < summary["split_steps"] <= summary["rebalanced_steps"], summary.get("split_steps")
    # train.profile_at: every worker's profile of step 3 lands in the summary
    assert len(summary["profiles"]) == 2
    assert all(p["last_step"] == 3 and p["steps"] == 1 for p in summary["profiles"].values())
    assert summary["checkpoints"] and summary["checkpoints"][-1].endswith("step-00000012")


def _final_params(cfg):
    ck = CheckpointStore(checkpoint_uri(cfg)).load_latest()
    return ck.step, ck.tensor_file("model.pt"), ck.tensor_file("sync-rank0.pt")


def test_stop_and_resume_equals_uninterrupted(tmp_path, ray_cluster):
    many = "train.batch_tokens=8192"  # several documents per worker: steps get re-split by token counts
    long = "data.max_doc_tokens=8192"
    whole = small_config(tmp_path, ray_cluster.address, "run.name=whole", "train.steps=8", many, long)
    train(whole)
    part = small_config(tmp_path, ray_cluster.address, "run.name=part", "train.steps=8", "train.stop_at=4", many, long)
    stopped = train(part)
    assert stopped["state"] == "STOPPED" and stopped["steps"] == 4
    resumed = small_config(tmp_path, ray_cluster.address, "run.name=part", "train.steps=8", many, long)
    summary = train(resumed)
    assert summary["resumed_from"] and summary["resumed_from"][-1]["step"] == 4
    # steps re-split by token counts (`Coordinator._balance`) after the resume point too: the counts of the
    # first resumed step come from the checkpoint
    assert summary["rebalanced_steps"] > stopped.get("rebalanced_steps", 0), (stopped, summary)
    step_a, model_a, _ = _final_params(whole)
    step_b, model_b, _ = _final_params(resumed)
    assert step_a == step_b == 8
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k


@pytest.mark.slow  # a benchmark's harness: three runs; `python -m pytest -m slow tests/elastic/test_run.py`
def test_bench_converge_compares_every_strategy_with_dense_at_equal_tokens(tmp_path, ray_cluster):
    from elastic.bench.runs import bench_converge

    overrides = small_overrides(tmp_path, ray_cluster.address) + ["train.steps=6", "sync.inner_steps=3"]
    out = bench_converge("tiny", overrides, ["dense", "demo", "diloco"])
    assert set(out["runs"]) == {"dense", "demo", "diloco"}
    for sync in ("demo", "diloco"):
        cmp = out[f"{sync}_vs_dense"]
        assert cmp["same_tokens"] and 0.5 < cmp["val_loss_ratio"] < 2.0
    assert out["demo_vs_dense"]["bytes_ratio_vs_dense_bf16"] > 100  # compressed every step
    assert 1.0 < out["diloco_vs_dense"]["bytes_ratio_vs_dense_bf16"] < 100  # int8, 2 outer steps in 6
