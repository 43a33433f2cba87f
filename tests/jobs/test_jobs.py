"""`ray job submit` end to end on a real head with the dashboard: what an operator sees and does.

One long run serves the folder: while it trains, the dashboard's actor list and the node's Prometheus
endpoint are checked; then `ray job stop` must leave a "stop" checkpoint, and the same run.name
resubmitted must resume from exactly that step and finish, with logs a browser can read.
"""
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

RUN = "jobrun"
TRAIN = ["python", "-m", "elastic", "train", "--config", "tiny"]
ANSI = "\x1b["


@pytest.fixture(scope="module")
def long_job(head, tmp_path_factory):
    """A run far longer than the test, submitted with the real CLI; yields once it is past step 10."""
    run_dir = tmp_path_factory.mktemp("runs")
    head.submit("raydistro-long", TRAIN + head.overrides(run_dir, RUN, "train.steps=100000"))
    head.wait_log("raydistro-long", r"^step ([1-9]\d|\d{3,})/100000 ", timeout=150)  # past step 10
    yield {"id": "raydistro-long", "run_dir": run_dir}
    client = head.client()
    if str(client.get_job_status("raydistro-long").value) == "RUNNING":
        client.stop_job("raydistro-long")


def test_dashboard_lists_actors_named_for_their_role_and_accelerator(head, long_job):
    from ray.util.state import list_actors

    actors = [a for a in list_actors(address=head.url, filters=[("state", "=", "ALIVE")], detail=True)
              if (a.name or "").startswith(f"raydistro/{RUN}/")]
    names = sorted(a.name for a in actors)
    assert f"raydistro/{RUN}/coordinator" in names
    workers = [a for a in actors if "/worker-" in a.name]
    assert len(workers) == 2, names
    for w in workers:
        assert re.fullmatch(rf"raydistro/{RUN}/worker-\d+\[CPU\]", w.name), w.name
        assert w.ray_namespace == "raydistro"
        # the dashboard's "Repr" column (repr_name, taken once by Ray after __init__): id, accelerator, run
        assert re.fullmatch(rf"Worker\(w\d+\[CPU\] run={RUN}\)", w.repr_name), w.repr_name
    coord = next(a for a in actors if a.name.endswith("/coordinator"))
    assert coord.repr_name == f"Coordinator({RUN} sync=dense steps=100000)", coord.repr_name


def _scrape(urls: list[str]) -> str:
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            continue
    return ""


def test_node_metrics_endpoint_exports_trainer_metrics(head, long_job):
    port = head.cluster.ports["metrics_export"]
    ip = head.cluster.address.rsplit(":", 1)[0]
    urls = [f"http://{ip}:{port}/metrics", f"http://127.0.0.1:{port}/metrics"]
    want = ["ray_raydistro_loss", "ray_raydistro_tokens_per_s", "ray_raydistro_bytes_sent_total",
            "ray_raydistro_world_size", "ray_raydistro_generation", "ray_raydistro_compression_ratio"]
    deadline = time.time() + 60  # metrics reach the export port through the agent every few seconds
    text = ""
    while time.time() < deadline:
        text = _scrape(urls)
        if all(re.search(rf"^{m}{{", text, re.M) for m in want):
            break
        time.sleep(2)
    missing = [m for m in want if not re.search(rf"^{m}{{", text, re.M)]
    assert not missing, f"missing {missing} on {urls}; raydistro lines: " + \
        "\n".join(line for line in text.splitlines() if "raydistro" in line)[:2000]
    tok = [line for line in text.splitlines() if line.startswith("ray_raydistro_tokens_per_s{")]
    assert any('worker="w' in line and f'run="{RUN}"' in line for line in tok), tok
    world = [line for line in text.splitlines() if line.startswith("ray_raydistro_world_size{") and RUN in line]
    assert world and float(world[-1].rsplit(" ", 1)[1]) == 2.0, world


def _checkpoints(run_dir: Path) -> dict[int, dict]:
    out = {}
    for d in sorted((run_dir / RUN / "checkpoints").glob("step-*")):
        if (d / "COMMIT").exists():
            out[int(d.name.split("-")[1])] = json.loads((d / "meta.json").read_text())
    return out


def test_job_stop_checkpoints_and_resubmit_resumes_from_that_step(head, long_job):
    run_dir = long_job["run_dir"]
    assert _checkpoints(run_dir) == {} or all(m["reason"] != "stop" for m in _checkpoints(run_dir).values())
    t0 = time.time()
    res = head.ray("job", "stop", "--address", head.url, long_job["id"], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert head.wait_status(long_job["id"], {"STOPPED"}, timeout=60) == "STOPPED"
    stopped_in = time.time() - t0

    stops = {step: m for step, m in _checkpoints(run_dir).items() if m["reason"] == "stop"}
    assert len(stops) == 1, f"no committed stop checkpoint ({stopped_in:.1f}s after `ray job stop`)"
    stop_step = next(iter(stops))
    assert stop_step >= 10
    first = json.loads((run_dir / RUN / "summary.json").read_text())
    assert first["state"] == "STOPPED" and first["steps"] == stop_step
    logs = head.logs(long_job["id"])
    assert "asking the run to checkpoint and stop" in logs

    # checkpoint.every=0: only the stop checkpoint can explain where the resubmitted run starts
    head.submit("raydistro-resume", TRAIN + head.overrides(run_dir, RUN, f"train.steps={stop_step + 4}"))
    assert head.wait_status("raydistro-resume", {"SUCCEEDED"}, timeout=150) == "SUCCEEDED", \
        head.logs("raydistro-resume")[-3000:]
    summary = json.loads((run_dir / RUN / "summary.json").read_text())
    assert summary["state"] == "FINISHED"
    assert summary["resumed_from"][-1]["step"] == stop_step
    assert summary["steps"] == stop_step + 4

    # the dashboard's log viewer and `ray job logs`: plain progress lines, the run directory, no color codes
    logs = head.logs("raydistro-resume")
    assert re.search(rf"^step \d+/{stop_step + 4} loss \d", logs, re.M), logs[-3000:]
    assert f"run directory: {run_dir / RUN}" in logs
    assert ANSI not in logs, [line for line in logs.splitlines() if ANSI in line][:5]
    assert ANSI not in head.logs(long_job["id"])
