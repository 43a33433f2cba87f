"""Fixtures for datasets tests: a real S3 endpoint (moto's server on 127.0.0.1), FineWeb-like files.

No mocks: S3 tests go over HTTP through s3fs/aiobotocore to a moto server this fixture starts and stops.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets.bench import moto_s3_server
from datasets.sample import ensure_sample


@pytest.fixture(scope="session")
def s3_endpoint():
    """storage_options of a live moto S3 server (session-wide; buckets are per test)."""
    with moto_s3_server() as so:
        yield so


@pytest.fixture
def s3_client(s3_endpoint):
    return boto3.client("s3", endpoint_url=s3_endpoint["endpoint_url"], region_name="us-east-1",
                        aws_access_key_id=s3_endpoint["key"], aws_secret_access_key=s3_endpoint["secret"])


_bucket_counter = [0]


@pytest.fixture
def s3_bucket(s3_client):
    """A fresh bucket (created with boto3: s3fs.mkdir fails on moto with a location-constraint error)."""
    _bucket_counter[0] += 1
    name = f"test-bucket-{os.getpid()}-{_bucket_counter[0]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def sample_train() -> str:
    return ensure_sample("train")


@pytest.fixture(scope="session")
def sample_val() -> str:
    return ensure_sample("val")


def write_fineweb(path: str, texts: Sequence[Optional[str]], row_group_rows: int = 100, variant: str = "fineweb",
                  language_scores: Optional[Sequence[float]] = None, int_scores: Optional[Sequence[int]] = None,
                  text_type: pa.DataType = pa.string(), drop_text: bool = False) -> str:
    """A parquet file with FineWeb columns (variant: fineweb | edu | fineweb2)."""
    n = len(texts)
    cols = {
        "text": pa.array(texts, type=text_type),
        "id": pa.array([f"<urn:uuid:00000000-0000-0000-0000-{i:012d}>" for i in range(n)]),
        "dump": pa.array(["CC-MAIN-2024-10"] * n),
        "url": pa.array([f"https://example.org/{i}" for i in range(n)]),
        "date": pa.array(["2024-02-20T00:00:00Z"] * n),
        "file_path": pa.array(["s3://commoncrawl/crawl-data/x.warc.gz"] * n),
        "language": pa.array(["en" if variant != "fineweb2" else "eng"] * n),
        "language_score": pa.array(list(language_scores) if language_scores is not None else [0.9] * n,
                                   type=pa.float64()),
    }
    if variant in ("fineweb", "edu"):
        cols["token_count"] = pa.array([len((t or "").split()) for t in texts], type=pa.int64())
    if variant == "edu":
        cols["score"] = pa.array([float(s) for s in (int_scores or [3] * n)], type=pa.float64())
        cols["int_score"] = pa.array(list(int_scores or [3] * n), type=pa.int64())
    if variant == "fineweb2":
        cols["language_script"] = pa.array(["Latn"] * n)
        cols["minhash_cluster_size"] = pa.array([1] * n, type=pa.int64())
    if drop_text:
        cols.pop("text")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_rows, compression="snappy")
    return path


def doc_texts(n: int, words: int = 40, tag: str = "doc") -> list[str]:
    return [f"{tag} {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(words)) for i in range(n)]
