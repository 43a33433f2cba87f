"""Bad input: each case either stops with a message naming the file, or is skipped/repaired and counted."""
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from datasets.config import DataConfig
from datasets.bench import free_port, moto_s3_server, upload_dir
from datasets.plan import DocRange
from datasets.reader import ShardReader
from datasets.sources import DataSchemaError, DataSourceError, DataSourceUnavailable, check_text_column, discover

from .conftest import doc_texts, write_fineweb


def test_file_with_unreadable_footer_stops_naming_the_file(tmp_path):
    write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(10))
    bad = tmp_path / "000_00001.parquet"
    bad.write_bytes(b"PAR1" + b"\x00" * 100 + b"garbage!")
    with pytest.raises(DataSchemaError, match=r"000_00001\.parquet: not a readable parquet file"):
        discover(str(tmp_path / "*.parquet"), retries=2, backoff_s=0.01)


def test_corrupt_row_group_is_skipped_counted_and_named(tmp_path, caplog):
    path = write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(300), row_group_rows=100)
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    with open(path, "r+b") as f:
        f.seek(col.dictionary_page_offset or col.data_page_offset)
        f.write(b"\xff" * 64)
    shards = discover(path)
    with caplog.at_level(logging.WARNING), ShardReader(shards, {}, "bytes", DataConfig(retries=2)) as reader:
        batch = reader.read_batch([DocRange(0, 0, 0, 5), DocRange(0, 1, 0, 100), DocRange(0, 2, 0, 5)])
    assert batch.stats.corrupt == 100 and batch.stats.returned == 10
    assert batch.dropped == [(DocRange(0, 1, 0, 100), "unusable")]
    assert "000_00000.parquet row group 1: cannot be decoded" in caplog.text


def test_file_without_text_column_stops_naming_file_and_columns(tmp_path):
    path = write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(5), drop_text=True)
    shards = discover(path)
    with pytest.raises(DataSchemaError, match=r"000_00000\.parquet: no column 'text' \(columns: id, dump, url"):
        ShardReader(shards, {}, "bytes", DataConfig())


def test_filter_on_a_column_the_file_lacks_stops(tmp_path):
    path = write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(5))     # plain FineWeb: no int_score
    with pytest.raises(DataSchemaError, match="int_score"):
        ShardReader(discover(path), {}, "bytes", DataConfig(min_int_score=3))


def test_null_and_empty_documents_are_skipped_and_counted(tmp_path):
    texts = ["first", None, "", "   \n", "fifth"]
    shards = discover(write_fineweb(str(tmp_path / "000_00000.parquet"), texts))
    with ShardReader(shards, {}, "bytes", DataConfig()) as reader:
        batch = reader.read_batch([DocRange(0, 0, 0, 5)])
    assert [bytes(d).decode() for d in batch.docs] == ["first", "fifth"]
    assert batch.stats.empty == 3 and batch.stats.unusable == 3
    assert batch.dropped == [(DocRange(0, 0, 1, 4), "unusable")]


def test_huge_documents_are_truncated_and_counted(tmp_path, caplog):
    huge = "All the world's a stage. " * 20000          # ~140k GPT-2 tokens
    shards = discover(write_fineweb(str(tmp_path / "000_00000.parquet"), ["short one", huge]))
    with caplog.at_level(logging.WARNING), ShardReader(shards, {}, "gpt2", DataConfig(max_doc_tokens=1000)) as reader:
        batch = reader.read_batch([DocRange(0, 0, 0, 2)])
    assert [len(d) for d in batch.docs] == [2, 1000]
    assert batch.stats.truncated == 1
    assert "000_00000.parquet row group 0 row 1)" in caplog.text and "truncated" in caplog.text
    from datasets.tokenizer import get_tokenizer
    assert batch.docs[1] == get_tokenizer("gpt2").encode(huge)[:1000]     # the kept prefix is exact


def test_invalid_utf8_is_decoded_with_replacement_and_counted(tmp_path):
    good = pa.array([b"good text", b"bad \xff\xfe bytes"], type=pa.binary())
    # a string column whose bytes are not UTF-8 (written by a buggy producer; pyarrow does not validate)
    text = pa.StringArray.from_buffers(len(good), good.buffers()[1], good.buffers()[2])
    path = str(tmp_path / "000_00000.parquet")
    pq.write_table(pa.table({"text": text, "id": ["a", "b"]}), path)
    shards = discover(path)
    with ShardReader(shards, {}, "bytes", DataConfig()) as reader:
        batch = reader.read_batch([DocRange(0, 0, 0, 2)])
    assert batch.stats.invalid_utf8 == 1 and batch.stats.returned == 2
    assert bytes(batch.docs[1]).decode() == "bad \ufffd\ufffd bytes"


def test_binary_text_column_is_read(tmp_path):
    path = str(tmp_path / "000_00000.parquet")
    pq.write_table(pa.table({"text": pa.array([b"bytes text"], type=pa.binary())}), path)
    with ShardReader(discover(path), {}, "bytes", DataConfig()) as reader:
        assert reader.read([DocRange(0, 0, 0, 1)]) == [list(b"bytes text")]


def test_no_matching_files_stops_with_the_url(tmp_path, s3_endpoint, s3_bucket):
    with pytest.raises(DataSourceError, match=r"data.source: no parquet files match .*/nothing/\*\.parquet"):
        discover(str(tmp_path / "nothing" / "*.parquet"))
    url = f"s3://{s3_bucket}/x/*.parquet"
    with pytest.raises(DataSourceError, match=r"^data.source: no parquet files match s3://.*/x/\*\.parquet$"):
        discover(url, s3_endpoint)


def test_dead_s3_endpoint_ends_in_clear_error_after_bounded_retries():
    port = free_port()     # nothing listens there
    so = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIDSECRETKEYID", "secret": "SUPERSECRETVALUE"}
    with pytest.raises(DataSourceUnavailable) as err:
        discover("s3://bucket/prefix/**/*.parquet", so, retries=3, backoff_s=0.01)
    msg = str(err.value)
    assert f"endpoint http://127.0.0.1:{port} unreachable after 3 tries" in msg
    assert "check data.storage_options.endpoint_url" in msg and msg.startswith("s3://bucket/prefix/")
    assert "SUPERSECRETVALUE" not in msg and "AKIDSECRETKEYID" not in msg


def test_endpoint_dying_mid_run_ends_in_clear_error(tmp_path):
    write_fineweb(str(tmp_path / "d" / "000_00000.parquet"), doc_texts(300), row_group_rows=100)
    with moto_s3_server() as so:
        upload_dir(str(tmp_path / "d"), "dying", "data", so)
        shards = discover("s3://dying/data/*.parquet", so)
        reader = ShardReader(shards, so, "bytes", DataConfig(retries=3, retry_backoff_s=0.01))
        assert len(reader.read([DocRange(0, 0, 0, 10)])) == 10
    with pytest.raises(DataSourceUnavailable, match=r"s3://dying/data/000_00000.parquet endpoint .* unreachable after 3 tries"):
        reader.read([DocRange(0, 2, 0, 10)])
    # the endpoint comes back (same address, same data): the same reader recovers, nothing stale is cached
    port = int(so["endpoint_url"].rsplit(":", 1)[1])
    with moto_s3_server(port) as so2:
        upload_dir(str(tmp_path / "d"), "dying", "data", so2)
        assert len(reader.read([DocRange(0, 2, 0, 10)])) == 10
    reader.close()


def test_missing_object_stops_after_retries_naming_it(tmp_path, s3_endpoint, s3_bucket):
    write_fineweb(str(tmp_path / "d" / "000_00000.parquet"), doc_texts(300), row_group_rows=100)
    upload_dir(str(tmp_path / "d"), s3_bucket, "data", s3_endpoint)
    shards = discover(f"s3://{s3_bucket}/data/*.parquet", s3_endpoint)
    s3fs.S3FileSystem(**s3_endpoint).rm(f"{s3_bucket}/data/000_00000.parquet")
    s3fs.S3FileSystem.clear_instance_cache()
    reader = ShardReader(shards, s3_endpoint, "bytes", DataConfig(retries=2, retry_backoff_s=0.01))
    with pytest.raises(DataSourceUnavailable, match=r"000_00000.parquet: reading row group 1 failed after 2 tries: not found"):
        reader.read([DocRange(0, 1, 0, 10)])
    reader.close()


@pytest.mark.parametrize("column", [pa.array([1, 2, 3]), pa.array([1.5, 2.5, 3.5]),
                                    pa.array([["a"], ["b"], ["c"]]), pa.array([True, False, True])])
def test_non_string_text_column_stops_before_reading_naming_file_and_column(tmp_path, column):
    """Used to pass preflight, then fail every step a worker read the file (evicting healthy workers)."""
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": column}), tmp_path / "001_00000.parquet")
    write_fineweb(str(tmp_path / "000_00000.parquet"), doc_texts(3))  # a good file beside it
    shards = discover(str(tmp_path / "*.parquet"))
    with pytest.raises(DataSchemaError) as e:
        check_text_column(shards, "text")
    assert str(e.value).startswith(f"{tmp_path}/001_00000.parquet: column 'text' holds {str(column.type)[:4]}")
    assert "data.text_column" in str(e.value) and "id" in str(e.value)  # names the file's text columns
    with pytest.raises(DataSchemaError, match="001_00000.parquet: column 'text' holds"):
        ShardReader(shards, {}, "bytes", DataConfig())
    check_text_column(discover(str(tmp_path / "000_*.parquet")), "text")  # string columns pass


def test_shard_info_keeps_column_types_and_bytes_count_as_text(tmp_path):
    pq.write_table(pa.table({"text": pa.array([b"x"], type=pa.binary()), "n": [1]}), tmp_path / "a.parquet")
    (sh,) = discover(str(tmp_path / "a.parquet"))
    assert sh.column_types == ("binary", "int64")
    check_text_column([sh], "text")  # bytes are text the reader decodes
    with pytest.raises(DataSchemaError, match="column 'n' holds int64"):
        check_text_column([sh], "n")
