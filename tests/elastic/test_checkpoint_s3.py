"""Checkpoints on object storage: the same guarantees on s3:// as on a local path.

Real S3 over HTTP (moto's server on 127.0.0.1), real s3fs: keep-N pruning, a cut-short latest detected and
skipped, and a run that stops with its checkpoints in a bucket and resumes from them.
"""
import logging

import boto3
import pytest
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
