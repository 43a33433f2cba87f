"""Reader throughput: tokens/s of one ShardReader (read + decode + tokenize), from local files and from S3.

The yardstick is what one GPT-2-small worker on an H100 consumes: 8 x 1024 tokens per ~33.5 ms step
(docs/../shared reference distro.md) = ~245k tokens/s; the target is one reader >= 5x that.
Each pass over the data uses a fresh reader, so no row group is served from the reader's cache.
`--s3-moto` starts moto's S3 server on 127.0.0.1 (real HTTP, real s3fs), uploads the files and repeats.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Iterator, Optional

from datasets.config import DataConfig
from datasets.plan import DataPlan
from datasets.reader import ShardReader
from datasets.sources import discover, resolve_source
from datasets.tokenizer import get_tokenizer

H100_GPT2_SMALL_TOKENS_PER_S = 8 * 1024 / 0.0335


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3_server(port: Optional[int] = None) -> Iterator[dict]:
    """A real S3 endpoint on loopback; yields storage_options for s3fs (dummy credentials)."""
    import logging
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # one log line per HTTP request otherwise
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    finally:
        server.stop()


def upload_dir(local_dir: str, bucket: str, prefix: str, storage_options: dict) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=storage_options["endpoint_url"], region_name="us-east-1",
                      aws_access_key_id=storage_options["key"], aws_secret_access_key=storage_options["secret"])
    # boto3, not s3fs.mkdir: moto rejects s3fs's bucket creation (location constraint)
    s3.create_bucket(Bucket=bucket)
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            if name.endswith(".parquet"):
                rel = os.path.relpath(os.path.join(root, name), local_dir)
                s3.upload_file(os.path.join(root, name), bucket, f"{prefix}/{rel}")


def measure(url: str, storage_options: Optional[dict], seconds: float, tokenizer: str,
            tokens_per_step: int = 65536) -> dict:
    cfg = DataConfig(tokenizer=tokenizer, storage_options=dict(storage_options or {}))
    shards = discover(url, storage_options)
    get_tokenizer(tokenizer)                       # build once, outside the timed region
    plan = DataPlan(shards, seed=0)
    tokens = docs = chars = steps = 0
    t0 = time.perf_counter()
    reader = ShardReader(shards, storage_options, tokenizer, cfg)
    epoch = plan.epoch
    step = 0
    nxt = plan.assign(step, {0: tokens_per_step})[0]
    while time.perf_counter() - t0 < seconds:
        cur = nxt
        plan.commit(step)
        step += 1
        nxt = plan.assign(step, {0: tokens_per_step})[0]
        if plan.epoch != epoch:                     # new pass: a fresh reader, nothing cached
            reader.close()
            reader = ShardReader(shards, storage_options, tokenizer, cfg)
            epoch = plan.epoch
        reader.prefetch(nxt)
        batch = reader.read_batch(cur)
        tokens += batch.stats.tokens
        docs += batch.stats.returned
        chars += batch.stats.text_chars
        steps += 1
    dt = time.perf_counter() - t0
    reader.close()
    return {
        "url": url, "tokenizer": tokenizer, "seconds": round(dt, 2), "steps": steps, "documents": docs,
        "tokens": tokens, "tokens_per_s": round(tokens / dt), "text_mb_per_s": round(chars / dt / 1e6, 1),
        "x_h100_gpt2_small_worker": round(tokens / dt / H100_GPT2_SMALL_TOKENS_PER_S, 1),
    }


def bench(url: str, seconds: float = 5.0, tokenizer: str = "gpt2", s3_moto: bool = False,
          storage_options: Optional[dict] = None) -> list[dict]:
    results = [measure(url, storage_options, seconds, tokenizer)]
    if s3_moto:
        local = resolve_source(url)
        if "://" in local and not local.startswith("file://"):
            raise ValueError("bench --s3-moto uploads local files; give a local path or 'sample'")
        with moto_s3_server() as so:
            upload_dir(local.replace("file://", ""), "bench", "data", so)
            results.append(measure("s3://bench/data/**/*.parquet", so, seconds, tokenizer))
    return results
