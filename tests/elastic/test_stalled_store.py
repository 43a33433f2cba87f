"""A stalled object store (alive, connections open, no answers) stops the run cleanly, checkpointed.

Before `data.read_timeout_s` the workers waited on their reads with no bound and were killed as hung. Here a
real S3 server (moto, in its own process) is frozen with SIGSTOP mid-run, by its PID.
"""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from datasets.bench import free_port, upload_dir
from datasets.sample import ensure_sample
from elastic.checkpoint import CheckpointStore
from elastic.config import checkpoint_uri

from .conftest import small_config, train_with_fault_after_first_checkpoint


def _start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}")
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not come up")


def _small_row_groups(tmp_path: Path) -> Path:
    """The sample's first file with 10-document row groups, so reads keep going to S3 during the run."""
    src = sorted(Path(ensure_sample("train")).glob("*.parquet"))[0]
    out = tmp_path / "local" / "000_00000.parquet"
    out.parent.mkdir(parents=True)
    pq.write_table(pq.read_table(src), out, row_group_size=10, compression="snappy")
    return out.parent


def test_stalled_store_stops_the_run_with_a_data_error_checkpointed(tmp_path, ray_cluster):
    port = free_port()
    moto = _start_moto(port)
    try:
        so = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        upload_dir(str(_small_row_groups(tmp_path)), "corpus", "train", so)
        cfg = small_config(tmp_path, ray_cluster.address, "run.name=s3stall", "data.source=s3://corpus/train/*.parquet",
                           "data.val_source=null", "data.read_timeout_s=4", "data.prefetch_row_groups=1",
                           "checkpoint.every=3", "train.steps=60",
                           f"data.storage_options={{endpoint_url: '{so['endpoint_url']}', key: testing, secret: testing}}")
        stopped = []

        def freeze_store():
            os.kill(moto.pid, signal.SIGSTOP)  # alive, its sockets open, never answers
            stopped.append(time.time())

        failed = train_with_fault_after_first_checkpoint(cfg, freeze_store)
        assert stopped, "the run ended before its first checkpoint"
        assert failed["state"] == "ERRORED", failed.get("error")
        assert "data.read_timeout_s=4" in failed["error"] and "s3://corpus/train/*.parquet" in failed["error"]
        assert "testing" not in failed["error"]  # credentials never in messages
        # no worker was killed as hung: the run stopped on the data error, every member still in it
        assert not [c for c in failed["membership_changes"] if c["kind"] in ("hang", "silent", "kill")], \
            failed["membership_changes"]
        stopped_at = failed["steps"]
        assert 3 <= stopped_at < 60
        assert failed["data"]["duplicated"] == 0 and failed["data"]["skipped"] == 0
        assert CheckpointStore(checkpoint_uri(cfg)).load_latest().step == stopped_at  # nothing committed is lost
    finally:
        os.kill(moto.pid, signal.SIGCONT)
        moto.terminate()
        moto.wait(timeout=30)
