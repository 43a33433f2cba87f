"""The CLI around runs. --json: stdout carries the JSON alone, even when other processes write to the
inherited fd 1 (as Ray's log monitor and a dying raylet's notice do); status of a run that is not live."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

PROG = """
import json, os, subprocess, sys
from elastic.progress import json_only_stdout
with json_only_stdout(True):
    print("progress line from python")
    subprocess.run(["sh", "-c", "echo '(raylet) Raylet is terminated' >&1"], check=True)
print(json.dumps({"ok": 1}))
"""


def test_json_only_stdout_moves_other_writers_to_stderr():
    out = subprocess.run([sys.executable, "-c", PROG], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"ok": 1}
    assert "progress line from python" in out.stderr and "Raylet is terminated" in out.stderr


def test_status_of_a_run_that_is_not_live_names_it_and_exits_1(ray_cluster):
    out = subprocess.run([sys.executable, "-m", "elastic", "status", "nosuch", "--address", ray_cluster.address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "no running run named 'nosuch'" in out.stderr


# slow: tests/elastic/test_field_faults.py::test_driver_killed_rerun_follows_the_live_run runs in CI (a second
# driver follows a live run); this one adds either driver stopping it
@pytest.mark.slow
def test_a_second_driver_for_a_live_run_name_follows_it_and_can_stop_it(tmp_path, ray_cluster):
    """Running the command again for a live run (a driver that died and came back, a job submitted twice)
    follows that run instead of starting a second one on the same checkpoints; either driver's SIGTERM
    (`ray job stop`) checkpoints and stops the run, and both exit with its summary."""
    args = [f"run.dir={tmp_path}", f"cluster.address={ray_cluster.address}", "run.name=twice", "train.steps=100000",
            "train.workers=1", "data.tokenizer=bytes", "data.max_doc_tokens=192", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=32", "model.block_size=64", "train.seq_len=64", "train.batch_tokens=512"]
    first = subprocess.Popen([sys.executable, "-m", "elastic", "train", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    log = open(tmp_path / "second.log", "w")
    second = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            st = subprocess.run([sys.executable, "-m", "elastic", "status", "twice", "--json", "--address",
                                 ray_cluster.address], capture_output=True, text=True, timeout=60)
            if st.returncode == 0 and json.loads(st.stdout)["state"] == "RUNNING":
                break
            assert first.poll() is None, "the first driver exited"
            time.sleep(1)
        else:
            raise AssertionError("the first run never showed as RUNNING")
        second = subprocess.Popen([sys.executable, "-m", "elastic", "train", *args], stdout=log, stderr=log,
                                  start_new_session=True)
        deadline = time.time() + 120
        while "following it instead of starting a second one" not in (tmp_path / "second.log").read_text():
            assert time.time() < deadline and second.poll() is None, (tmp_path / "second.log").read_text()[-2000:]
            time.sleep(0.5)
        assert first.poll() is None, "the second driver must not disturb the live run"
        os.killpg(second.pid, signal.SIGTERM)  # `ray job stop` on the second: checkpoint, then exit
        assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-2000:]
        assert first.wait(timeout=120) == 0
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        log.close()
    summary = json.loads((tmp_path / "twice" / "summary.json").read_text())
    assert summary["state"] == "STOPPED" and summary["checkpoints"]
    assert any("new driver" in r.get("live_group", "") for r in summary["resumed_from"])

