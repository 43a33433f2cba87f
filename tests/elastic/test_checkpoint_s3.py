"""Checkpoints on object storage: the same guarantees on s3:// as on a local path.

Real S3 over HTTP (moto's server on 127.0.0.1), real s3fs: keep-N pruning, a cut-short latest detected and
skipped, and a run that stops with its checkpoints in a bucket and resumes from them.
"""
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import boto3
import botocore.config
import pytest
import ray
import torch
from moto.server import ThreadedMotoServer

from datasets.bench import free_port
from elastic.checkpoint import CheckpointStore, to_bytes
from elastic.cli import train

from .conftest import small_config


@pytest.fixture
def bucket():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    so = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    s3 = boto3.client("s3", endpoint_url=so["endpoint_url"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="ckpt")
    try:
        yield so, s3
    finally:
        server.stop()


def test_keep_and_cut_short_latest_on_s3(bucket, caplog):
    so, s3 = bucket
    store = CheckpointStore("s3://ckpt/run-a", keep=2, storage_options=so)
    for step in (5, 10, 15):
        store.write(step, {"step": step}, {"model.pt": to_bytes({"w": torch.full((64,), float(step))})})
    assert store.steps() == [10, 15]  # keep=2 pruned step 5 from the bucket
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="run-a/")["Contents"]}
    assert not any(k.startswith("run-a/step-00000005/") for k in keys), keys
    # the latest upload was cut short: its model file holds fewer bytes than the manifest says
    body = s3.get_object(Bucket="ckpt", Key="run-a/step-00000015/model.pt")["Body"].read()
    s3.put_object(Bucket="ckpt", Key="run-a/step-00000015/model.pt", Body=body[: len(body) // 2])
    fresh = CheckpointStore("s3://ckpt/run-a", keep=2, storage_options=so)  # a resubmitted driver
    with caplog.at_level(logging.WARNING):
        ck = fresh.load_latest()
    assert ck.step == 10 and ck.tensor_file("model.pt")["w"][0] == 10.0
    assert "s3://ckpt/run-a/step-00000015/model.pt: checksum mismatch" in caplog.text


def test_run_stops_with_checkpoints_in_a_bucket_and_resumes_from_them(tmp_path, ray_cluster, bucket):
    so, s3 = bucket
    opts = f"{{endpoint_url: '{so['endpoint_url']}', key: testing, secret: testing}}"
    common = ["run.name=s3ck", "checkpoint.dir=s3://ckpt/runs/s3ck", f"checkpoint.storage_options={opts}",
              "train.steps=10", "checkpoint.every=3"]
    stopped = train(small_config(tmp_path, ray_cluster.address, *common, "train.stop_at=4"))
    assert stopped["state"] == "STOPPED" and stopped["steps"] == 4
    assert stopped["checkpoints"][-1] == "s3://ckpt/runs/s3ck/step-00000004"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/s3ck/")["Contents"]}
    assert "runs/s3ck/step-00000004/COMMIT" in keys
    done = train(small_config(tmp_path, ray_cluster.address, *common))
    assert done["state"] == "FINISHED" and done["steps"] == 10
    assert done["resumed_from"][-1] == {"uri": "s3://ckpt/runs/s3ck/step-00000004", "step": 4}
    assert done["data"]["duplicated"] == 0 and done["data"]["skipped"] == 0
    # the credentials are redacted where the run writes its config: the run dir and the checkpoint's meta
    saved = (tmp_path / "s3ck" / "config.yaml").read_text()
    assert "secret: '***'" in saved and "testing" not in saved
    meta = s3.get_object(Bucket="ckpt", Key="runs/s3ck/step-00000010/meta.json")["Body"].read().decode()
    assert "endpoint_url" in meta and "testing" not in meta


# ---- storage errors during a real run: moto in its own process, frozen by SIGSTOP (by its PID) ------------
@pytest.fixture
def moto_process():
    """A moto S3 server in a process of its own (so it can be frozen), a bucket, and storage options whose
    timeouts are short: a frozen store fails a write in seconds instead of minutes."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    # the test's own client is patient: on a loaded 2-core machine moto may take seconds to answer a listing
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing",
                      config=botocore.config.Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}))
    try:
        deadline = time.time() + 60
        while True:
            try:
                s3.create_bucket(Bucket="ckpt")
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        opts = (f"{{endpoint_url: '{endpoint}', key: testing, secret: testing, config_kwargs: "
                "{connect_timeout: 1, read_timeout: 1, retries: {total_max_attempts: 1}}}")
        yield proc, s3, opts
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _commits(s3, prefix: str) -> list[str]:
    """The checkpoint directories under `prefix` that have a COMMIT, oldest first."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix=prefix).get("Contents", [])]
    return sorted(k.rsplit("/", 2)[-2] for k in keys if k.endswith("/COMMIT"))


def _wait_for(cond, what: str, limit: float = 240.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


class StorageFault(threading.Thread):
    """Freezes the store once the run has committed a checkpoint; `then(coord, s3, events)` does the rest."""

    def __init__(self, run: str, proc, s3, then):
        super().__init__(daemon=True)
        self.run_name, self.proc, self.s3, self.then = run, proc, s3, then
        self.before: list[str] = []
        self.events: list[str] = []
        self.error = None

    def coordinator(self):
        return ray.get_actor(f"raydistro/{self.run_name}/coordinator", namespace="raydistro")

    def watch_events(self, coord) -> list[str]:
        try:
            recent = ray.get(coord.progress.remote(), timeout=10)["recent_events"]
        except ray.exceptions.GetTimeoutError:  # a busy coordinator: ask again on the next poll
            return self.events
        for e in recent:
            if e["what"] not in self.events:
                self.events.append(e["what"])
        return self.events

    def run(self):  # noqa: D401 - threading.Thread's entry point
        coord = None
        try:
            self.before = _wait_for(lambda: _commits(self.s3, f"runs/{self.run_name}/"), "a first checkpoint")
            coord = self.coordinator()
            os.kill(self.proc.pid, signal.SIGSTOP)  # the store stops answering mid-run
            self.then(self, coord)
        except Exception as e:  # surfaced by the test
            self.error = e
            os.kill(self.proc.pid, signal.SIGCONT)
            try:  # the run has no end of its own (train.steps=100000): end it, so the test fails at once
                (coord or self.coordinator()).stop.remote()
            except Exception:
                pass


def test_storage_error_mid_run_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, ray_cluster,
                                                                                   moto_process):
    proc, s3, opts = moto_process

    def then(fault, coord):
        _wait_for(lambda: any(e.startswith("checkpoint-failed") for e in fault.watch_events(coord)),
                  "a checkpoint-failed event")
        os.kill(proc.pid, signal.SIGCONT)  # the store is back: later checkpoints commit again
        _wait_for(lambda: len(_commits(s3, "runs/s3fail/")) > len(fault.before) + 1, "commits after the fault")
        coord.stop.remote()

    fault = StorageFault("s3fail", proc, s3, then)
    fault.start()
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=s3fail", "checkpoint.dir=s3://ckpt/runs/s3fail",
                       f"checkpoint.storage_options={opts}", "train.steps=100000", "checkpoint.every=3",
                       "checkpoint.keep=100", "checkpoint.write_timeout_s=15")
    summary = train(cfg)
    fault.join(60)
    assert fault.error is None, fault.error
    assert summary["state"] == "STOPPED", summary.get("error")
    failed = [e for e in fault.events if e.startswith("checkpoint-failed")]
    # the event names the checkpoint and the storage's error
    m = re.match(r"checkpoint-failed (s3://ckpt/runs/s3fail/(step-\d{8}(?:\.\d+)?)) \((\w[\w-]*)\): (\S+): (\w+)",
                 failed[0])
    assert m, failed
    uri, name = m.group(1), m.group(2)
    assert m.group(5) not in ("KeyError", "AssertionError", "TypeError"), failed[0]  # a storage error, not a bug
    # never committed, or complete: a COMMIT sent into the frozen store before the coordinator gave up lands when
    # the store wakes (the ambiguity of any timed-out write), and the marker goes out only after every file
    if name in _commits(s3, "runs/s3fail/"):
        assert "COMMIT the store already received may still land" in failed[0], failed[0]
        assert CheckpointStore("s3://ckpt/runs/s3fail", storage_options=cfg.checkpoint.storage_options
                               ).read(int(name[5:13])).uri.endswith(name)
    # the checkpoint committed before the fault is intact and loads; training went on past the failed one
    store = CheckpointStore("s3://ckpt/runs/s3fail", storage_options=cfg.checkpoint.storage_options)
    last_good = fault.before[-1]
    assert store.read(int(last_good[5:13])).uri.endswith(last_good)
    latest = store.load_latest()
    assert latest.step == summary["steps"] > int(name[5:13]) and latest.meta["reason"] == "stop"
    assert summary["checkpoints"][-1] == latest.uri and uri not in summary["checkpoints"]
    assert summary["data"]["duplicated"] == 0 and summary["data"]["skipped"] == 0


# slow: the frozen store mid-run (the test above) runs in CI; this one freezes it for the stop checkpoint
@pytest.mark.slow
def test_a_final_checkpoint_that_cannot_be_written_ends_the_run_with_a_clear_error(tmp_path, ray_cluster,
                                                                                   moto_process):
    proc, s3, opts = moto_process

    def then(fault, coord):
        coord.stop.remote()  # the stop checkpoint meets a frozen store

    fault = StorageFault("s3final", proc, s3, then)
    fault.start()
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=s3final", "checkpoint.dir=s3://ckpt/runs/s3final",
                       f"checkpoint.storage_options={opts}", "train.steps=100000", "checkpoint.every=3",
                       "checkpoint.keep=100", "checkpoint.write_timeout_s=15")
    summary = train(cfg)
    fault.join(60)
    os.kill(proc.pid, signal.SIGCONT)
    assert fault.error is None, fault.error
    assert summary["state"] == "ERRORED"
    assert re.search(r"CheckpointFailed: the stop checkpoint at step \d+ could not be written "
                     r"\(s3://ckpt/runs/s3final/step-\d{8}", summary["error"]), summary["error"]
    # what was committed before stays, and is what a resubmitted run resumes from
    latest = CheckpointStore("s3://ckpt/runs/s3final", storage_options=cfg.checkpoint.storage_options).load_latest()
    assert latest is not None and latest.meta["reason"] == "periodic"
    assert latest.uri.rsplit("/", 1)[-1] in _commits(s3, "runs/s3final/")
