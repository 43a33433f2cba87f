"""`python -m clusters local up|status|down` on a real fake_multinode head.

Pins: demand for an ``accelerator_type:A100`` actor makes the autoscaler add an ``a100`` node; ``down``
stops every process ``up`` started (head, autoscaler, simulated nodes, workers) and nothing else, not
even same-user processes that look like Ray by name.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters import local

from .conftest import alive

REPO = Path(__file__).resolve().parents[2]


def _cli(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "clusters", "local", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def start_bystander():
    """Starts a same-user process, in its own session, whose name looks like Ray's (`raylet`).

    Started after `up`, so only the session/RAY_TMPDIR test (never the name) keeps `down` off it.
    """
    procs = []

    def start():
        procs.append(subprocess.Popen(["bash", "-c", "exec -a raylet sleep 600"], start_new_session=True))
        return procs[-1]

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(300)
def test_a100_demand_adds_a_node_and_down_stops_exactly_our_processes(cluster_env, start_bystander,
                                                                       tmp_path):
    import ray

    res = _cli(cluster_env, "up")
    assert res.returncode == 0, res.stdout + res.stderr
    state = json.loads(Path(cluster_env["RAYDISTRO_CACHE"], "local-cluster.json").read_text())
    assert f"RAY_ADDRESS={state['address']}" in res.stdout
    assert "http://127.0.0.1:" in res.stdout
    assert state["tmpdir"].startswith("/tmp/rd-")
    assert state["leader_pid"] in state["pids"]  # the state file records what `up` started
    bystander = start_bystander()

    ray.init(address=state["address"], log_to_driver=False)

    @ray.remote(num_cpus=1, resources={"accelerator_type:A100": 1})
    class OnA100:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    head = ray.get_runtime_context().get_node_id()
    actor = OnA100.remote()
    node = ray.get(actor.node.remote(), timeout=120)
    assert node != head
    a100_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("accelerator_type:A100")]
    assert [n["NodeID"] for n in a100_nodes] == [node]

    status = _cli(cluster_env, "status")
    assert status.returncode == 0, status.stderr
    assert "a100" in status.stdout and "ray.head.default" in status.stdout
    assert "accelerator_type" in status.stdout or "GPU" in status.stdout

    ray.kill(actor)
    ray.shutdown()

    # The documented job path: `ray job submit --working-dir . -- python -m <module>` against the dashboard.
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "jobmod.py").write_text("import ray\nprint('jobmod ran with ray', ray.__version__)\n")
    dashboard = res.stdout.split("dashboard: ", 1)[1].split()[0]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    job = subprocess.run([ray_bin, "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
                          "python", "-m", "jobmod"], cwd=job_dir, env=cluster_env,
                         capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    assert "jobmod ran with ray" in job.stdout

    cluster = local.load_state()
    ours_before_down = set(local._our_processes(cluster))
    assert cluster.leader_pid in ours_before_down
    assert len(ours_before_down) > 10  # head processes + the simulated a100 node's raylet and agents

    res = _cli(cluster_env, "down")
    assert res.returncode == 0, res.stdout + res.stderr
    stopped = set(json.loads(res.stdout.split(": ", 1)[1])) if ": [" in res.stdout else set()
    assert ours_before_down <= stopped

    time.sleep(0.5)
    assert [p for p in stopped if alive(p)] == []
    assert not Path(cluster.tmpdir).exists()
    assert local.load_state() is None
    assert alive(bystander.pid), "down touched a process it did not start"
    # Every PID down stopped was started after `up` began: nothing older was ever a candidate.
    assert os.getpid() not in stopped and bystander.pid not in stopped


def test_down_without_a_cluster_is_a_no_op(cluster_env):
    res = _cli(cluster_env, "down")
    assert res.returncode == 0
    assert "no local cluster" in res.stdout


def test_up_rejects_a_cloud_yaml(cluster_env):
    res = _cli(cluster_env, "up", str(REPO / "clusters" / "aws-mixed-gpu.yaml"))
    assert res.returncode == 1
    assert "is not fake_multinode" in res.stderr
    assert local.load_state() is None
