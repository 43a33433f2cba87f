"""Training demand makes the autoscaler add A100/L4 nodes and the elastic group grows onto them.

A real fake_multinode autoscaling head (`python -m clusters local up`, which reports its node types where Ray
keeps them), a real training driver (`python -m elastic train`) with the default `train.device=auto` and no
`train.worker_gpus`: the cluster has no GPU yet but can add GPU nodes, so each worker asks for a GPU, and every
worker is demand the autoscaler must meet with an `a100` or `l4` node. Then a node is lost (its raylet SIGKILLed, as a
reclaimed spot VM): the group shrinks, and grows back when the autoscaler replaces the node. Then
`python -m elastic scale` shrinks the group (the leaving worker drains gracefully), the run is stopped
(checkpointed) and resubmitted to finish.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters import local

REPO = Path(__file__).resolve().parents[2]


NODES_OF_WORKERS = """
import json, ray
from ray.util.state import list_actors
ray.init(log_to_driver=False)
print(json.dumps(sorted({a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")])
                         if (a.name or "").startswith("raydistro/grow/worker-")})))
"""


def _kill_node_of_a_worker(env: dict, state) -> list[int]:
    """A node vanishes like a reclaimed spot VM: SIGKILL its raylet and every process under it (a lost VM
    takes its workers with it; killing the raylet alone leaves them to notice it later)."""
    out = subprocess.run([sys.executable, "-c", NODES_OF_WORKERS], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    nodes = json.loads(out.stdout.strip().splitlines()[-1])  # GPU nodes: the head has no GPU
    ours = set(local._our_processes(state))
    for pid in ours:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"raylet") and any(f"--node_id={n}".encode() in cmd for n in nodes):
            tree = _descendants(pid, ours)
            for victim in tree:
                os.kill(victim, signal.SIGKILL)
            return tree
    raise AssertionError(f"no raylet of ours hosts a worker; worker nodes {nodes}")


def _descendants(root: int, ours: set[int]) -> list[int]:
    """`root` and the processes under it, among `ours`."""
    parent = {}
    for pid in ours:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = [root]
    for pid in tree:
        tree += [p for p, pp in parent.items() if pp == pid]
    return tree


def _status(env: dict, address: str) -> dict:
    """The live run as a user sees it: `python -m elastic status grow --json` ({} while not running)."""
    out = subprocess.run([sys.executable, "-m", "elastic", "status", "grow", "--json", "--address", address],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _world_size(env: dict, address: str) -> int | None:
    return _status(env, address).get("world_size")


@pytest.fixture
def autoscaling_cluster(cluster_env):
    res = subprocess.run([sys.executable, "-m", "clusters", "local", "up"], cwd=REPO, env=cluster_env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return cluster_env, local.load_state()


@pytest.mark.timeout(420)
@pytest.mark.parametrize("node_loss", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["grow-shrink", "grow-lose-a-node-replace-shrink"])
def test_autoscaler_adds_gpu_nodes_the_group_grows_then_shrinks_and_the_run_finishes(autoscaling_cluster, tmp_path,
                                                                                    node_loss):
    """CI runs grow -> scale down -> stop -> resume; `-m slow` also loses a node in the middle and waits for
    the autoscaler's replacement node to join."""
    env, state = autoscaling_cluster
    env = dict(env, RAY_ADDRESS=state.address, PYTHONUNBUFFERED="1")
    args = [f"run.dir={tmp_path}/runs", "run.name=grow", "train.workers=1", "train.max_workers=2",
            "train.worker_cpus=1", "train.steps=100000", "checkpoint.every=0",
            "data.tokenizer=bytes", "data.max_doc_tokens=192", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=32", "model.block_size=64", "train.seq_len=64", "train.batch_tokens=512",
            "train.eval_tokens=2048", "train.step_timeout_s=20"]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "elastic", "train", *args], cwd=REPO, env=env,
                            stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 240
        seen = []
        while time.time() < deadline and 2 not in seen:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            seen.append(_world_size(env, state.address))
            time.sleep(1)
        assert 2 in seen, f"group never grew to 2: {seen}"
        if node_loss:
            # a node is lost: the group shrinks at once, and the autoscaler's replacement joins again. An
            # idle node the autoscaler kept may take the loss back within a second or two, too fast to see
            # world size 1 between two looks: count the deaths instead.
            deaths = _status(env, state.address).get("change_kinds", {}).get("death", 0)
            _kill_node_of_a_worker(env, state)
            deadline = time.time() + 60
            now = {}
            while time.time() < deadline and now.get("change_kinds", {}).get("death", 0) <= deaths:
                now = _status(env, state.address)
                seen.append(now.get("world_size"))
            assert now.get("change_kinds", {}).get("death", 0) > deaths, \
                f"the group did not shrink when a node went away: {seen} {now}"
            deadline = time.time() + 180
            while time.time() < deadline and seen[-1] != 2:
                assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                seen.append(_world_size(env, state.address))
                time.sleep(1)
            assert seen[-1] == 2, f"the lost node's capacity never came back: {seen}"
        out = subprocess.run([sys.executable, "-m", "elastic", "scale", "grow", "1", "--address",
                              state.address], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        deadline = time.time() + 60
        while time.time() < deadline and seen[-1] != 1:
            seen.append(_world_size(env, state.address))
            time.sleep(0.5)
        assert seen[-1] == 1, seen
        os.killpg(proc.pid, signal.SIGTERM)  # as `ray job stop` does: checkpoint, then exit
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    stopped = json.loads((tmp_path / "runs" / "grow" / "summary.json").read_text())
    assert stopped["state"] == "STOPPED", stopped.get("error")
    history = [h["world_size"] for h in stopped["world_size_history"]]
    assert history[0] == 1 and history.count(2) >= (2 if node_loss else 1) and history[-1] == 1, history
    if node_loss:
        assert "death" in [c["kind"] for c in stopped["membership_changes"]], stopped["membership_changes"]
    accelerators = {a for h in stopped["world_size_history"] for a in h["accelerators"]}
    assert accelerators and accelerators <= {"A100", "L4"}, accelerators  # GPU-typed nodes, never the head
    assert stopped["replica_hashes_agree"] and stopped["data"]["duplicated"] == 0
    # resubmitted, it resumes from the stop checkpoint and finishes
    finish = [a if not a.startswith("train.steps=") else f"train.steps={stopped['steps'] + 20}" for a in args]
    done = subprocess.run([sys.executable, "-m", "elastic", "train", *finish, "train.max_workers=0",
                           "train.workers=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "grow" / "summary.json").read_text())
    assert summary["state"] == "FINISHED" and summary["resumed_from"][-1]["step"] == stopped["steps"]
