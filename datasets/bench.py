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
import statistics
import time
from typing import Iterator, Optional

from datasets.config import DataConfig
from datasets.plan import DataPlan, ShardInfo
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


def bench_plan(shards: int = 2500, row_groups: int = 100, rows: int = 1000, workers: int = 4,
               tokens_per_worker: int = 70_000_000, checkpoints: tuple[float, ...] = (0.1, 0.5, 0.99)) -> dict:
    """The data plan over one whole epoch of a synthetic FineWeb-sized shard list (no I/O): seconds per
    assign+commit, the checkpointed state's size as the epoch fills, the process's peak memory."""
    import json
    import resource

    infos = [ShardInfo(f"s3://bucket/fineweb/{i:06d}_00000.parquet", 2 * 10**9, (rows,) * row_groups,
                       ("text", "id"), (rows * 700,) * row_groups) for i in range(shards)]
    t0 = time.perf_counter()
    plan = DataPlan(infos, seed=0)
    build_s = time.perf_counter() - t0
    sizes, step_s, todo = {}, [], list(checkpoints)
    share = {r: tokens_per_worker for r in range(workers)}
    step = 0
    while plan.epoch == 0:
        t = time.perf_counter()
        plan.assign(step, share)
        plan.commit(step)
        step_s.append(time.perf_counter() - t)
        step += 1
        if todo:
            done = plan.accounting(0)["delivered_once"] / plan.documents
            if done >= todo[0]:
                sizes[f"{todo.pop(0):.2f}"] = len(json.dumps(plan.state_dict()))
    acc = plan.accounting(0)
    return {"shards": shards, "row_groups": shards * row_groups, "documents": plan.documents,
            "plan_build_s": round(build_s, 2), "steps": step,
            "assign_commit_ms_median": round(statistics.median(step_s) * 1e3, 3),
            "state_json_bytes_at_epoch_fraction": sizes,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "delivered_once": acc["delivered_once"], "duplicated": acc["duplicated"], "skipped": acc["skipped"]}
