"""The CLI around runs. --json: stdout carries the JSON alone, even when other processes write to the
inherited fd 1 (as Ray's log monitor and a dying raylet's notice do); status of a run that is not live."""
import json
import subprocess
import sys

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
