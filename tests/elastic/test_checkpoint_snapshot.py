"""A worker's own part of a checkpoint: snapshot of the committed state, written while it trains on, loaded
back bit for bit by another replica (WorkerReplica in one process; the Ray path is in test_checkpoint_s3)."""
import torch

from elastic.checkpoint import CheckpointStore, files_by_rank
from elastic.fingerprint import params_fingerprint

from .conftest import solo_replica


def _train(rep, plan, step):
    from elastic.messages import StepCall

    ranges = plan.assign(step, {0: 256})[0]
    report = rep.step(StepCall(step=step, ranges=ranges, lr=3e-3))
    assert report.ok, report.error
    rep.commit(step)
    plan.commit(step)


def test_snapshot_then_training_goes_on_and_the_files_hold_the_snapshot(tmp_path):
    from datasets import DataPlan

    rep, shards = solo_replica(f"checkpoint.dir={tmp_path / 'ck'}")
    plan = DataPlan(shards, seed=0, epoch=0)
    for step in range(2):
        _train(rep, plan, step)
    at_snapshot = rep.fingerprint()
    momentum = [t.clone() for t in rep.sync.state_dict()["momentum"]]
    store = CheckpointStore(str(tmp_path / "ck"), keep=2)
    version, uri = store.begin(2)
    files = files_by_rank(1, replicated_sync=False)[0]
    assert rep.snapshot(2, uri, files) >= 0
    _train(rep, plan, 2)  # the next step changes parameters and momentum in place while the write may run
    assert rep.fingerprint() != at_snapshot
    records = rep.snapshot_written(uri)
    assert set(records) == {"model.pt", "sync-rank0.pt"}
    store.commit(2, version, {"step": 2}, records)

    ck = store.load_latest()
    fresh, _ = solo_replica(f"checkpoint.dir={tmp_path / 'ck'}")
    assert fresh.load_checkpoint(ck.uri, ck.records, "sync-rank0.pt", 2) == at_snapshot
    assert fresh.step_count == 2
    got = fresh.sync.state_dict()["momentum"]
    assert all(torch.equal(a, b) for a, b in zip(got, momentum))
    assert params_fingerprint(fresh.params) == at_snapshot


def test_snapshot_of_the_wrong_step_fails_clearly(tmp_path):
    rep, _ = solo_replica(f"checkpoint.dir={tmp_path / 'ck'}")
    uri = str(tmp_path / "ck" / "step-00000005")
    try:
        rep.snapshot(5, uri, {"model.pt": "model"})
    except RuntimeError as e:
        assert "checkpoint of step 5 asked, but 0 steps are committed" in str(e)
    else:
        raise AssertionError("a snapshot of an uncommitted step was taken")
    try:  # the coordinator's wait for the files gets the same error, not a hang
        rep.snapshot_written(uri)
    except RuntimeError as e:
        assert "step 5" in str(e)
    else:
        raise AssertionError("snapshot_written returned for a snapshot that failed")


def test_membership_change_right_after_a_periodic_checkpoint_rewrites_it_as_a_new_version(tmp_path, ray_cluster):
    """A worker killed in the step after a periodic checkpoint: the membership change checkpoints the same
    step again, into step-00000004.1; the run finishes, and with keep=1 the older version went only once the
    newer had committed."""
    from elastic.cli import train
    from elastic.config import checkpoint_uri

    from .conftest import small_config

    cfg = small_config(tmp_path, ray_cluster.address, "run.name=rewrite", "train.steps=8", "checkpoint.every=4",
                       "checkpoint.keep=1", "chaos.kill_at=[4]", "train.workers=2", "train.min_workers=1")
    summary = train(cfg)
    assert summary["state"] == "FINISHED" and summary["steps"] == 8, summary.get("error")
    uri = checkpoint_uri(cfg)
    assert f"{uri}/step-00000004" in summary["checkpoints"], summary["checkpoints"]
    assert f"{uri}/step-00000004.1" in summary["checkpoints"], summary["checkpoints"]
    assert summary["data"]["duplicated"] == 0 and summary["data"]["skipped"] == 0
    store = CheckpointStore(uri, keep=1)
    assert store.entries() == [(8, 0)]  # keep=1: only the end's, everything older pruned after it committed
    assert store.load_latest().meta["reason"] == "end"
