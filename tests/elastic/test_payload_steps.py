"""Every payload carries the step it is for, and every rank checks it (compression.codec): in a real run the
worker passes the coordinator's step, so a joiner (whose demo state counts its own steps from 0) agrees with
its peers, while a stale or replayed payload would be refused naming its sender."""
from elastic.cli import train

from .conftest import small_config


def test_demo_joiner_sends_the_runs_step_and_no_step_is_rejected(tmp_path, ray_cluster):
    # min_workers=2: the kill pauses the run until a replacement is ready; it joins with a fresh demo state
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=joinstep", "sync.name=demo", "train.steps=6",
                       "train.min_workers=2", "chaos.kill_at=[2]")
    summary = train(cfg)
    assert summary["state"] == "FINISHED" and summary["steps"] == 6
    assert len({w["generation"] for w in summary["world_size_history"]}) >= 2  # a new generation with the joiner
    assert summary["world_size_history"][-1]["world_size"] == 2
    assert summary["rejected_steps"] == [], summary["rejected_steps"]
    assert summary["replica_hashes_agree"] is True
