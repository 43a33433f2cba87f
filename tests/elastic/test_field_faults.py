"""Faults applied from outside, the way users meet them (issue 15): a frozen worker (SIGSTOP, as a hung VM or
a partition looks), the coordinator's process killed, the driver killed, a commit that raises on one rank,
a replica that drifts, a joiner whose setup raises.

Real Ray clusters, real signals to real processes (by PID, only processes of this test's own cluster).
After each run: it finished every step, no survivor was killed for a peer's fault, replicas agreed, and
every document was delivered exactly once.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from elastic.cli import train
from elastic.config import run_dir

from .conftest import small_config, small_overrides

REPO = Path(__file__).resolve().parents[2]


def _assert_healthy(summary, steps, agree=True):
    assert summary["state"] == "FINISHED", summary.get("error")
    assert summary["steps"] == steps
    if agree:
        assert summary["replica_hashes_agree"] is True, summary["replica_disagreements"]
    data = summary["data"]
    assert data["duplicated"] == 0 and data["skipped"] == 0, data
    assert data["in_flight"] == 0 and data["delivered_once"] > 0, data


def _evicted(summary) -> list[str]:
    """Workers that left, from the step-aborted events (`leaving=[...]`)."""
    out = []
    for e in summary["events"]:
        if e["what"].startswith("step-aborted") and "leaving=[" in e["what"]:
            inside = e["what"].split("leaving=[", 1)[1].split("]", 1)[0]
            out += [w.strip(" '") for w in inside.split(",") if w.strip(" '")]
    return out


class Watcher(threading.Thread):
    """Waits (as the driver's own process, connected to the cluster) until the run reaches `at_step`, then
    calls `act(progress)`; records when it acted."""

    def __init__(self, run: str, at_step: int, act):
        super().__init__(daemon=True)
        self.run_name, self.at_step, self.act = run, at_step, act
        self.acted_at = None
        self.result = None
        self.error = None

    def run(self):  # noqa: D401 - threading.Thread's entry point
        try:
            deadline = time.time() + 300
            coord = None
            while time.time() < deadline:
                if not ray.is_initialized():  # the driver (train) connects; never auto-start a Ray here
                    time.sleep(0.05)
                    continue
                try:
                    coord = coord or ray.get_actor(f"raydistro/{self.run_name}/coordinator", namespace="raydistro")
                    p = ray.get(coord.progress.remote(), timeout=10)
                except Exception:
                    time.sleep(0.2)
                    continue
                if p.get("step", 0) >= self.at_step and p.get("state") == "RUNNING":
                    self.result = self.act(coord, p)
                    self.acted_at = time.time()
                    return
                time.sleep(0.05)
        except Exception as e:  # surfaced by the test
            self.error = e


def test_frozen_worker_is_evicted_and_no_survivor_is_killed(tmp_path, ray_cluster):
    """SIGSTOP on a worker's process mid-run: nothing answers from it, not even its control lane. The group
    evicts it within train.silent_peer_s of its last sign of life, the survivors' blocked collective is
    released, and they go on: nobody else leaves."""
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=frozen", "train.steps=24", "train.workers=3",
                       "sync.name=demo", "train.silent_peer_s=4", "train.min_workers=2")
    frozen = {}

    def freeze(coord, p):
        victim = p["members"][-1]
        os.kill(victim["pid"], signal.SIGSTOP)
        frozen.update(victim)

    w = Watcher("frozen", 6, freeze)
    w.start()
    try:
        summary = train(cfg)
    finally:
        if frozen:
            for sig in (signal.SIGCONT, signal.SIGKILL):  # ours, by PID: in case Ray had not ended it
                try:
                    os.kill(frozen["pid"], sig)
                except ProcessLookupError:
                    pass
    assert w.error is None and frozen, w.error
    _assert_healthy(summary, 24)
    assert _evicted(summary) == [frozen["worker_id"]], summary["events"]
    change = next(c for c in summary["membership_changes"] if c["kind"] == "silent_peer")
    # timed from the fault (its last sign of life), of which detection took about the silent-peer limit
    assert change["seconds_to_resume"] >= change["detection_s"] >= 3.0, change


# one worker (slow: the CI runs two): it computes each step ahead of its call and carries tails between steps,
# so the kill lands with a step computed ahead and a carried tail in the journal
@pytest.mark.parametrize("workers", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_coordinator_killed_the_run_goes_on_without_operator(tmp_path, ray_cluster, workers):
    """SIGKILL on the coordinator's process: Ray restarts it, it reads the journal, adopts the live workers
    (detached, they outlived it), finishes or drops the step in flight, and the run finishes with no
    committed step lost and every document once. The driver just keeps watching."""
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=coordkill", "train.steps=24",
                       f"train.workers={workers}", "sync.name=demo",
                       f"train.batch_tokens={512 if workers > 1 else 8192}")  # one worker: steps long enough to watch

    def kill_coordinator(coord, p):
        pid = ray.get(coord.pid.remote())
        os.kill(pid, signal.SIGKILL)
        return p["step"]

    w = Watcher("coordkill", 8, kill_coordinator)
    w.start()
    summary = train(cfg)
    assert w.error is None and w.result is not None, w.error
    _assert_healthy(summary, 24)
    took = [r for r in summary["resumed_from"] if "live_group" in r]
    assert took and "restarted coordinator" in took[-1]["live_group"], summary["resumed_from"]
    # nothing committed was lost: the new coordinator took over at or after the step the old one reached
    assert summary["resumed_from_step"] >= w.result, (summary["resumed_from_step"], w.result)
    assert not _evicted(summary), summary["events"]
    assert "state-from-checkpoint" not in " ".join(e["what"] for e in summary["events"])
    assert summary["tokens"] == summary["document_slots"], (summary["tokens"], summary["document_slots"])
    if workers == 1:
        assert summary["computed_ahead_steps"] > 12, summary["computed_ahead_steps"]


def test_driver_killed_rerun_follows_the_live_run(tmp_path, ray_cluster):
    """SIGKILL on the driver (`python -m elastic train`) mid-run: the run goes on (its coordinator and workers
    are detached); running the same command again follows it from the step it reached, not from the last
    periodic checkpoint, and exits 0 when it finishes."""
    overrides = small_overrides(tmp_path, ray_cluster.address) + [
        "run.name=driverkill", "train.steps=400", "train.workers=2", "sync.name=demo", "checkpoint.every=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "elastic", "train", *overrides]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = {}

    def kill_driver(coord, p):
        first.kill()  # SIGKILL, by the PID we started
        killed["step"] = p["step"]

    ray.init(address=ray_cluster.address, namespace="raydistro", log_to_driver=False)  # to watch the run
    try:
        w = Watcher("driverkill", 6, kill_driver)
        w.start()
        w.join(300)
    finally:
        ray.shutdown()
    first.wait(30)
    assert killed, w.error
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir(small_config(tmp_path, "", "run.name=driverkill")) / "summary.json").read_text())
    _assert_healthy(summary, 400)
    assert summary["resumed_from_step"] >= killed["step"], (summary["resumed_from_step"], killed)
    assert any("new driver" in r.get("live_group", "") for r in summary["resumed_from"]), summary["resumed_from"]


def test_commit_error_on_one_rank_evicts_only_it(tmp_path, ray_cluster):
    """Applying a committed step raises on one rank (as AdamW's state allocation running out of memory
    would): it takes part in the next collective only to release its peers, and leaves; the step stays
    committed (its peers applied it), so its documents count once; a replica whose parameters drift after a
    commit is found by its fingerprint and re-synced from the majority."""
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=commiterr", "train.steps=20", "train.workers=3",
                       "sync.name=dense", "chaos.commit_error_at=[6]", "chaos.diverge_at=[12]", "train.min_workers=2")
    summary = train(cfg)
    _assert_healthy(summary, 20, agree=False)
    kinds = [c["kind"] for c in summary["membership_changes"]]
    assert "commit_error" in kinds, kinds
    assert len(_evicted(summary)) == 1, summary["events"]
    # the drifted replica: one disagreement, repaired (no more after it)
    assert len(summary["replica_disagreements"]) == 1, summary["replica_disagreements"]
    assert any(e["what"].startswith("resync ") for e in summary["events"]), summary["events"]


def test_joiner_whose_setup_raises_is_replaced(tmp_path, ray_cluster):
    """A new worker whose `prepare()` raises (a RayTaskError, not a death) no longer ends the run: it is
    dropped and another is asked for (with a back-off). Here all three workers are needed to start
    (min_workers=3), so the run can only start once w3's replacement is ready."""
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=badjoiner", "train.steps=20", "train.workers=3",
                       "train.min_workers=3", "sync.name=demo", "chaos.prepare_error=[w3]")
    summary = train(cfg)
    _assert_healthy(summary, 20)
    events = " ".join(e["what"] for e in summary["events"])
    assert "worker-start-failed w3: RuntimeError: chaos.prepare_error" in events, events
    assert summary["world_size_history"][0]["world_size"] == 3, summary["world_size_history"]


def test_failed_resubmit_reports_its_own_failure_not_the_old_summary(tmp_path, ray_cluster):
    """A run stopped cleanly leaves summary.json saying STOPPED; a resubmission that fails (here: no capacity
    for its workers) must say ERRORED with its own error, not the stale STOPPED."""
    base = ["run.name=resubmit", "train.steps=12", "train.workers=2", "sync.name=demo"]
    first = train(small_config(tmp_path, ray_cluster.address, *base, "train.stop_at=4"))
    assert first["state"] == "STOPPED"
    again = train(small_config(tmp_path, ray_cluster.address, *base, "train.worker_cpus=64", "train.start_wait_s=1",
                               "train.pause_timeout_s=2"))
    assert again["state"] == "ERRORED", again
    assert "PausedTooLong" in (again.get("error") or ""), again.get("error")
