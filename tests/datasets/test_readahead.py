"""`ReadAheadProcess`: the read-ahead's child process reads (here from S3, moto's server over HTTP) and packs
exactly what the trainer would have read itself, and a failed read comes back as the reader's error."""
import pytest

from datasets import DataPlan, discover, pack
from datasets.bench import upload_dir
from datasets.config import DataConfig
from datasets.readahead import ReadAheadProcess
from datasets.reader import ShardReader
from datasets.sources import DataSourceError

from .conftest import doc_texts, write_fineweb


def test_child_reads_and_packs_from_s3_like_the_reader(tmp_path, s3_endpoint, s3_bucket):
    for i in range(2):
        write_fineweb(str(tmp_path / "d" / f"00{i}_00000.parquet"), doc_texts(250, tag=f"f{i}"), row_group_rows=100)
    upload_dir(str(tmp_path / "d"), s3_bucket, "data", s3_endpoint)
    shards = discover(f"s3://{s3_bucket}/data/*.parquet", s3_endpoint)
    cfg = DataConfig(tokenizer="gpt2")
    hint = DataPlan(shards, seed=0).peek({0: 3000, 1: 3000})
    read, core = hint[0] + hint[1], hint[0]
    child = ReadAheadProcess(shards, s3_endpoint, "gpt2", cfg, 64)
    try:
        batch, core_batch, inputs, targets = child.submit(read, core).result(timeout=120)
    finally:
        child.close()
    reader = ShardReader(shards, s3_endpoint, "gpt2", cfg)
    try:
        plain, plain_core = reader.read_batch(read), reader.read_batch(core)
    finally:
        reader.close()
    as_lists = lambda docs: [d.tolist() for d in docs]  # noqa: E731 (the child sends int32 arrays)
    assert as_lists(batch.docs) == plain.docs and batch.origins == plain.origins
    assert as_lists(core_batch.docs) == plain_core.docs and core_batch.dropped == plain_core.dropped
    assert all(d.dtype.name == "int32" for d in batch.docs)
    want_in, want_t = pack(plain_core.docs, 64, reader.eot)
    assert (inputs == want_in.numpy()).all() and (targets == want_t.numpy()).all()


def test_a_failed_read_in_the_child_raises_the_readers_error(tmp_path):
    write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(50), row_group_rows=50)
    shards = discover(str(tmp_path / "*.parquet"), {})
    bad = [type(r)(r.shard, r.row_group, 0, 10**6) for r in DataPlan(shards, seed=0).peek({0: 100})[0]]
    child = ReadAheadProcess(shards, {}, "bytes", DataConfig(tokenizer="bytes"), 64)
    try:
        with pytest.raises((DataSourceError, ValueError), match="000_00000.parquet"):
            child.submit(bad).result(timeout=120)
    finally:
        child.close()


def test_a_read_that_does_not_finish_in_time_names_the_source_and_the_option():
    import concurrent.futures

    from datasets.readahead import ReadTimedOut, wait_read
    from datasets.sources import DataSourceUnavailable

    never = concurrent.futures.Future()  # a read stuck on a store that does not answer
    so = {"endpoint_url": "http://admin:url-pw@127.0.0.1:9", "secret": "s3cr3t-pw"}
    with pytest.raises(ReadTimedOut) as e:
        wait_read(never, 0.05, source="s3://b/x/*.parquet", storage_options=so, limit_s=120)
    msg = str(e.value)
    assert isinstance(e.value, DataSourceUnavailable)  # the coordinator's data-error path: stop, checkpointed
    assert msg.startswith("s3://b/x/*.parquet: ") and "data.read_timeout_s=120" in msg and "url-pw" not in msg and "admin:***@" in msg
    done = concurrent.futures.Future()
    done.set_result("rows")
    assert wait_read(done, 0.0, source="s3://b/x", storage_options={}, limit_s=1) == "rows"
