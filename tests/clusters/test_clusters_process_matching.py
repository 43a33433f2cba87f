"""Which processes `local down` may stop: its session or its RAY_TMPDIR, same user, newer than `up`.

Plain processes stand in for Ray's here, so these run in a second without a cluster.
"""

import os
import subprocess
import time

import pytest

from clusters import local

from .conftest import alive


@pytest.fixture
def spawn():
    procs = []

    def start(args, **kw):
        procs.append(subprocess.Popen(args, start_new_session=True, **kw))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _cluster(tmp_path, leader_pid, started_at, leader_start=None):
    if leader_start is None:
        leader_start = local._stat(leader_pid)[2]
    return local.LocalCluster(config="local.yaml", tmpdir=str(tmp_path / "rd-test"), leader_pid=leader_pid,
                              started_at=started_at, gcs_port=0, dashboard_port=0, address="",
                              dashboard_url="", leader_start=leader_start)


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def test_session_members_and_tmpdir_carriers_are_ours_lookalikes_are_not(tmp_path, spawn, monkeypatch):
    monkeypatch.setenv("RAYDISTRO_CACHE", str(tmp_path / "cache"))
    t0 = time.time() - 2
    tmpdir = str(tmp_path / "rd-test")
    leader = spawn(["bash", "-c", "sleep 60 & sleep 60 & wait"])
    carrier = spawn(["sleep", "60"], env={**os.environ, "RAY_TMPDIR": tmpdir})
    lookalike = spawn(["bash", "-c", "exec -a raylet sleep 60"])  # same user, Ray-like name
    time.sleep(0.3)
    children = _children(leader.pid)
    assert len(children) == 2

    cluster = _cluster(tmp_path, leader.pid, t0)
    ours = set(local._our_processes(cluster))
    assert ours == {leader.pid, carrier.pid, *children}

    stopped = set(local.down(cluster, grace_s=2))
    assert stopped == ours
    leader.wait(5)
    carrier.wait(5)
    assert not any(alive(p) for p in children)
    assert alive(lookalike.pid)


def test_processes_older_than_up_are_never_candidates(tmp_path, spawn):
    leader = spawn(["sleep", "60"])
    time.sleep(0.2)
    cluster = _cluster(tmp_path, leader.pid, started_at=time.time() + 60)
    assert local._our_processes(cluster) == []


def test_a_reused_leader_pid_does_not_make_its_session_ours(tmp_path, spawn):
    t0 = time.time() - 2
    leader = spawn(["bash", "-c", "sleep 60 & sleep 60 & wait"])
    carrier = spawn(["sleep", "60"], env={**os.environ, "RAY_TMPDIR": str(tmp_path / "rd-test")})
    time.sleep(0.3)
    # The state says the leader started at another time: this PID now belongs to someone else.
    cluster = _cluster(tmp_path, leader.pid, t0, leader_start=local._stat(leader.pid)[2] - 1)
    assert local._our_processes(cluster) == [carrier.pid]
