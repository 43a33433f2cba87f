"""A dead object store mid-run: the run stops with a clear error, checkpointed, and loses nothing.

Real S3 over HTTP (moto's server on 127.0.0.1), real Ray workers streaming row groups from it.
"""
from pathlib import Path

import pyarrow.parquet as pq
from moto.server import ThreadedMotoServer

from datasets.bench import free_port, upload_dir
from datasets.sample import ensure_sample
from elastic.cli import train

from .conftest import small_config, train_with_fault_after_first_checkpoint


def _small_row_groups(tmp_path: Path) -> Path:
    """The sample's first file rewritten with 10-document row groups, so reads keep going to S3."""
    src = sorted(Path(ensure_sample("train")).glob("*.parquet"))[0]
    out = tmp_path / "local" / "000_00000.parquet"
    out.parent.mkdir(parents=True)
    pq.write_table(pq.read_table(src), out, row_group_size=10, compression="snappy")
    return out.parent


def _serve(port: int, local: Path) -> tuple[ThreadedMotoServer, dict]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    so = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    upload_dir(str(local), "corpus", "train", so)  # moto keeps data in memory: upload on every start
    return server, so


def test_dead_s3_endpoint_stops_the_run_checkpointed_and_resume_loses_nothing(tmp_path, ray_cluster):
    local = _small_row_groups(tmp_path)
    port = free_port()
    server, so = _serve(port, local)
    overrides = ["run.name=s3dead", "data.source=s3://corpus/train/*.parquet", "data.val_source=null",
                 "data.retries=2", "data.retry_backoff_s=0.1", "checkpoint.every=5", "train.steps=40",
                 f"data.storage_options={{endpoint_url: '{so['endpoint_url']}', key: testing, secret: testing}}"]
    cfg = small_config(tmp_path, ray_cluster.address, *overrides)
    failed = train_with_fault_after_first_checkpoint(cfg, server.stop)
    assert failed["state"] == "ERRORED"
    assert "DataSourceUnavailable" in failed["error"] and so["endpoint_url"] in failed["error"]
    assert "endpoint_url" in failed["error"]  # says what to check
    stopped_at = failed["steps"]
    assert 5 <= stopped_at < 40
    assert failed["data"]["duplicated"] == 0 and failed["data"]["skipped"] == 0
    # the endpoint comes back: the resubmitted run resumes from the checkpoint and finishes
    server, so = _serve(port, local)
    try:
        resumed = train(cfg)
    finally:
        server.stop()
    assert resumed["state"] == "FINISHED" and resumed["steps"] == 40
    assert resumed["resumed_from"][-1]["step"] == stopped_at
    assert resumed["data"]["duplicated"] == 0 and resumed["data"]["skipped"] == 0
    assert resumed["data"]["in_flight"] == 0
