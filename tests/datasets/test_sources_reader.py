"""discover and ShardReader on local files and on a live S3 endpoint (moto server over HTTP)."""
import json

import pyarrow.parquet as pq
import s3fs

from datasets.config import DataConfig
from datasets.plan import DataPlan, DocRange
from datasets.reader import ShardReader
from datasets.sources import discover
from datasets.tokenizer import get_tokenizer

from .conftest import doc_texts, write_fineweb


def make_tree(root):
    write_fineweb(f"{root}/CC-MAIN-2024-10/000_00000.parquet", doc_texts(250, tag="a"), row_group_rows=100)
    write_fineweb(f"{root}/CC-MAIN-2024-10/000_00001.parquet", doc_texts(120, tag="b"), row_group_rows=100)
    write_fineweb(f"{root}/CC-MAIN-2023-50/000_00000.parquet", doc_texts(30, tag="c"), row_group_rows=100)
    (root / "README.md").write_text("not parquet")


def test_discover_local_glob_directory_and_file_url(tmp_path):
    make_tree(tmp_path)
    shards = discover(str(tmp_path / "**" / "*.parquet"))
    assert [s.path.split(str(tmp_path))[1] for s in shards] == [
        "/CC-MAIN-2023-50/000_00000.parquet", "/CC-MAIN-2024-10/000_00000.parquet",
        "/CC-MAIN-2024-10/000_00001.parquet"]
    assert [s.row_group_rows for s in shards] == [(30,), (100, 100, 50), (100, 20)]
    assert all(s.token_estimate > 0 and s.size > 0 and "text" in s.schema_names for s in shards)
    assert [s.path for s in discover(str(tmp_path))] == [s.path for s in shards]            # a directory
    one = discover("file://" + str(tmp_path / "CC-MAIN-2024-10" / "000_00001.parquet"))
    assert len(one) == 1 and one[0].row_group_rows == (100, 20)


def test_discover_and_read_on_s3(tmp_path, s3_endpoint, s3_bucket):
    make_tree(tmp_path)
    fs = s3fs.S3FileSystem(**s3_endpoint)
    fs.put(str(tmp_path / "CC-MAIN-2024-10"), f"{s3_bucket}/fineweb/data/CC-MAIN-2024-10", recursive=True)
    fs.put(str(tmp_path / "CC-MAIN-2023-50"), f"{s3_bucket}/fineweb/data/CC-MAIN-2023-50", recursive=True)
    url = f"s3://{s3_bucket}/fineweb/data/**/*.parquet"
    shards = discover(url, s3_endpoint)
    assert [s.path for s in shards] == [
        f"s3://{s3_bucket}/fineweb/data/CC-MAIN-2023-50/000_00000.parquet",
        f"s3://{s3_bucket}/fineweb/data/CC-MAIN-2024-10/000_00000.parquet",
        f"s3://{s3_bucket}/fineweb/data/CC-MAIN-2024-10/000_00001.parquet"]
    assert [s.row_group_rows for s in shards] == [(30,), (100, 100, 50), (100, 20)]
    local = discover(str(tmp_path / "**" / "*.parquet"))
    assert DataPlan(shards, seed=1).fingerprint == DataPlan(local, seed=1).fingerprint   # same data, same plan
    with ShardReader(shards, s3_endpoint, "gpt2", DataConfig(retry_backoff_s=0.01)) as reader:
        docs = reader.read([DocRange(1, 2, 10, 13), DocRange(0, 0, 0, 2)])
    tok = get_tokenizer("gpt2")
    assert docs == [tok.encode(t) for t in doc_texts(250, tag="a")[210:213] + doc_texts(30, tag="c")[0:2]]


def test_reader_reads_only_the_requested_row_groups(tmp_path):
    path = write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(500), row_group_rows=100)
    # damage row group 0: a reader that touched it would count corrupt documents
    md = pq.ParquetFile(path).metadata
    col = md.row_group(0).column(0)
    offset = col.dictionary_page_offset or col.data_page_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    shards = discover(path)
    with ShardReader(shards, {}, "bytes", DataConfig()) as reader:
        docs = reader.read([DocRange(0, 3, 5, 8)])
        assert reader.row_groups_read == 1
        assert reader.stats.corrupt == 0
        assert [bytes(d).decode() for d in docs] == doc_texts(500)[305:308]
        reader.read([DocRange(0, 3, 8, 20)])                 # same row group: served from the bounded cache
        assert reader.row_groups_read == 1


def test_prefetch_fetches_next_step_in_background(tmp_path):
    path = write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(300), row_group_rows=100)
    shards = discover(path)
    with ShardReader(shards, {}, "bytes", DataConfig(prefetch_row_groups=2)) as reader:
        reader.prefetch([DocRange(0, 1, 0, 10), DocRange(0, 2, 0, 10)])
        for fut in list(reader._cache.values()):
            fut.result(timeout=10)
        assert reader.row_groups_read == 2
        reader.read([DocRange(0, 1, 0, 10), DocRange(0, 2, 0, 10)])
        assert reader.row_groups_read == 2


def test_reader_memory_is_bounded_by_the_row_group_cache(tmp_path):
    path = write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(2000, words=5), row_group_rows=100)
    shards = discover(path)
    with ShardReader(shards, {}, "bytes", DataConfig(prefetch_row_groups=2)) as reader:
        for g in range(20):
            reader.read([DocRange(0, g, 0, 100)])
            assert len(reader._cache) <= 4
        assert reader.stats.returned == 2000


def test_fineweb_edu_and_fineweb2_variants_and_filters(tmp_path):
    edu = write_fineweb(str(tmp_path / "edu" / "000_00000.parquet"), doc_texts(10), variant="edu",
                        int_scores=[1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    fw2 = write_fineweb(str(tmp_path / "fw2" / "000_00000.parquet"), doc_texts(10), variant="fineweb2",
                        language_scores=[0.1, 0.9] * 5)
    edu_shards = discover(edu)
    assert {"score", "int_score", "token_count"} <= set(edu_shards[0].schema_names)
    with ShardReader(edu_shards, {}, "bytes", DataConfig(min_int_score=3)) as reader:
        batch = reader.read_batch([DocRange(0, 0, 0, 10)])
    assert batch.stats.filtered == 4 and batch.stats.returned == 6
    fw2_shards = discover(fw2)
    assert "token_count" not in fw2_shards[0].schema_names
    with ShardReader(fw2_shards, {}, "bytes", DataConfig(min_language_score=0.5)) as reader:
        batch = reader.read_batch([DocRange(0, 0, 0, 10)])
    assert batch.stats.filtered == 5 and [bytes(d).decode() for d in batch.docs] == doc_texts(10)[1::2]


def test_filtered_documents_are_accounted_as_filtered_not_delivered(tmp_path):
    path = write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(40), language_scores=[0.2, 0.8] * 20)
    shards = discover(path)
    plan = DataPlan(shards, seed=0)
    with ShardReader(shards, {}, "bytes", DataConfig(min_language_score=0.5)) as reader:
        step = 0
        while plan.epoch == 0 and plan.accounting()["remaining"] > 0:
            a = plan.assign(step, {0: 200, 1: 300})
            batches = [reader.read_batch(r) for r in a.values()]
            plan.commit(step, dropped=[d for b in batches for d in b.dropped_json()])
            step += 1
    acc = plan.accounting(0)
    assert acc["filtered"] == 20 and acc["delivered_once"] == 20 and acc["skipped"] == 0 and acc["duplicated"] == 0


def test_sample_sources_resolve_to_the_bundled_corpus(sample_train):
    shards = discover("sample")
    assert shards and all(s.path.startswith(sample_train) for s in shards)
    val = discover("sample-val")
    assert val and all("/val/" in s.path for s in val)


def test_inspect_cli_json(tmp_path, capsys):
    from datasets.__main__ import main

    make_tree(tmp_path)
    assert main(["inspect", str(tmp_path / "**" / "*.parquet"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == 3 and out["rows"] == 400 and out["row_groups"] == 6
    assert "language_score" in out["schemas"][0] and out["estimated_tokens"] > 0
