"""Where documents live: URL/glob -> sorted shard list from parquet footers, object-store access, retries.

Promises:
- `discover(url, storage_options)` reads only parquet footers and returns `ShardInfo`s sorted by path,
  so the same files always give the same plan. "sample" / "sample-val" mean the bundled Shakespeare
  corpus (train / held-out), built on first use (see `datasets.sample`).
- Object-store calls go through `call_with_retries`: transient errors (OSError, botocore/aiohttp connection
  errors, timeouts) are retried with exponential backoff; after `retries` tries a `DataSourceUnavailable`
  names the URL and endpoint and what to check.
- Credentials (key, secret, token, passwords) never appear in logs or error messages: every message built
  here passes through `redact`.
- Errors name the bad thing: no matching files, a file whose footer is not parquet, a missing text column
  or one that does not hold strings (`check_text_column`, from the footers: before any worker starts).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import time
from typing import Any, Callable, Mapping, Optional, TypeVar

import fsspec
import pyarrow.parquet as pq

from datasets.plan import ShardInfo

log = logging.getLogger(__name__)

T = TypeVar("T")

# GPT-2 averages ~4 bytes of English per token (FineWeb: token_count vs text length); used only to size shares.
BYTES_PER_TOKEN = 4.0
SAMPLE_SOURCES = ("sample", "sample-val")
_SECRET_KEYS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                "aws_session_token", "session_token", "client_secret", "sas_token", "account_key")


class DataSourceError(RuntimeError):
    """The data source cannot be used as configured (stops the run; the message says what to fix)."""


class DataSourceUnavailable(DataSourceError):
    """The object store did not answer (or refused) after bounded retries; the caller checkpoints and stops."""


class DataSchemaError(DataSourceError):
    """A file is not usable parquet or lacks the text column."""


def _secret_values(storage_options: Mapping[str, Any]) -> list[str]:
    out: list[str] = []

    def walk(d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v)
            elif isinstance(v, str) and v and k.lower() in _SECRET_KEYS:
                out.append(v)
    walk(storage_options or {})
    for env in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        if os.environ.get(env):
            out.append(os.environ[env])
    return out


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/@\s]+(?=@)")


def redact(text: str, storage_options: Optional[Mapping[str, Any]]) -> str:
    """`text` with every credential value of storage_options (and the AWS env) replaced by ***, and the
    password of any `scheme://user:password@host` in it."""
    for v in _secret_values(storage_options or {}):
        if len(v) >= 3:
            text = text.replace(v, "***")
    return _URL_PASSWORD.sub(r"\g<head>***", text)


def endpoint_of(url: str, storage_options: Optional[Mapping[str, Any]]) -> str:
    """The endpoint a URL talks to, for error messages."""
    so = storage_options or {}
    ep = so.get("endpoint_url") or (so.get("client_kwargs") or {}).get("endpoint_url")
    if not ep and url.startswith(("s3://", "s3a://")):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "default AWS S3 endpoint"
    return ep or url.split("://", 1)[0] + " filesystem"


def _transient_types() -> tuple[type, ...]:
    types: list[type] = [OSError, TimeoutError, ConnectionError]
    try:
        import botocore.exceptions as bce
        types += [bce.BotoCoreError, bce.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp
        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import asyncio
        types.append(asyncio.TimeoutError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


TRANSIENT_ERRORS = _transient_types()

# pyarrow reports a damaged file as a plain OSError/ArrowInvalid with these words; retrying cannot help.
_CORRUPTION_MARKERS = ("parquet magic", "thrift", "corrupt", "snappy", "decompress", "invalid utf8",
                       "unexpected end of stream", "page header", "not a parquet", "parquet file size is 0",
                       "couldn't deserialize", "out of bounds", "invalid column metadata", "parquet: ")


def is_corruption(exc: BaseException) -> bool:
    """True when an exception says the bytes are damaged (not that the store did not answer)."""
    import pyarrow as pa
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(exc, (pa.ArrowInvalid, pa.ArrowNotImplementedError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, OSError) and any(m in msg for m in _CORRUPTION_MARKERS)


def call_with_retries(fn: Callable[[], T], *, what: str, url: str, storage_options: Optional[Mapping[str, Any]],
                      retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> T:
    """fn() with exponential backoff on transient errors; corruption is raised at once (not retried)."""
    tries = max(1, int(retries))
    last: Optional[BaseException] = None
    for attempt in range(tries):
        try:
            return fn()
        except TRANSIENT_ERRORS as e:  # type: ignore[misc]
            if is_corruption(e):
                raise
            last = e
            if attempt + 1 < tries:
                delay = min(max_backoff_s, backoff_s * (2 ** attempt))
                log.warning("%s: %s (%s); retry %d/%d in %.2fs", what, type(e).__name__,
                            redact(str(e), storage_options)[:200], attempt + 1, tries - 1, delay)
                time.sleep(delay)
    assert last is not None
    raise unavailable_error(what, url, storage_options, tries, last) from None


def unavailable_error(what: str, url: str, storage_options: Optional[Mapping[str, Any]], tries: int,
                      exc: BaseException) -> DataSourceUnavailable:
    detail = redact(f"{type(exc).__name__}: {exc}", storage_options)[:300]
    if isinstance(exc, FileNotFoundError):
        hint = "the object does not exist (or the credentials cannot see it); check data.source"
        msg = f"{url}: {what} failed after {tries} tries: not found ({detail}); {hint}"
    elif isinstance(exc, PermissionError):
        msg = (f"{url}: {what} failed after {tries} tries: access denied ({detail}); check the credentials "
               "in data.storage_options (key/secret) or the AWS environment")
    else:
        ep = endpoint_of(url, storage_options)
        hint = ("check data.storage_options.endpoint_url" if url.startswith(("s3://", "s3a://", "gs://", "gcs://"))
                else "check that the path is reachable")
        msg = f"{url} endpoint {ep} unreachable after {tries} tries ({detail}); {hint}"
    return DataSourceUnavailable(msg)


def filesystem_for(url: str, storage_options: Optional[Mapping[str, Any]]):
    """(fsspec filesystem, path without protocol) for a URL.

    For S3 the botocore client is told to fail fast (1 attempt, 10 s connect timeout) unless the user set
    its config: retrying is done once, here, with our backoff and our error message."""
    so = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        cfg = dict(so.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", 10)
        cfg.setdefault("read_timeout", 60)
        cfg.setdefault("retries", {"max_attempts": 1})
        so["config_kwargs"] = cfg
    try:
        fs, path = fsspec.core.url_to_fs(url, **so)
    except (ImportError, ValueError, TypeError) as e:
        raise DataSourceError(redact(f"data.source {url}: cannot open filesystem ({type(e).__name__}: {e}); "
                                     "check data.storage_options", so)) from None
    if protocol in ("s3", "s3a") and hasattr(fs, "retries"):
        fs.retries = 1                    # s3fs's own retry loop; call_with_retries wraps it
    return fs, path


_GLOB_CHARS = "*?["


def list_parquet_files(url: str, storage_options: Optional[Mapping[str, Any]], retries: int = 5,
                       backoff_s: float = 0.5) -> list[str]:
    """Sorted full URLs of the parquet files a URL names (a glob, a directory, or one file)."""
    fs, path = filesystem_for(url, storage_options)

    def expand() -> list[str]:
        if any(c in path for c in _GLOB_CHARS):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = fs.glob(path.rstrip("/") + "/**/*.parquet")
        elif fs.exists(path):
            found = [path]
        else:
            found = []
        return [p for p in found if p.endswith(".parquet") and not fs.isdir(p)]

    found = call_with_retries(expand, what="listing", url=url, storage_options=storage_options,
                              retries=retries, backoff_s=backoff_s)
    if not found:
        raise DataSourceError(f"data.source: no parquet files match {url}")
    return sorted(fs.unstrip_protocol(p) if "://" in url else p for p in found)


def read_footer(path: str, storage_options: Optional[Mapping[str, Any]], text_column: str = "text",
                retries: int = 5, backoff_s: float = 0.5) -> ShardInfo:
    """ShardInfo of one parquet file, from its footer only."""
    fs, p = filesystem_for(path, storage_options)

    def read() -> ShardInfo:
        size = int(fs.size(p))
        # footer reads only: a small block size keeps the range requests small on object stores
        with fs.open(p, "rb", block_size=256 * 1024) as f:
            md = pq.ParquetFile(f).metadata
        schema = md.schema.to_arrow_schema()
        names = tuple(schema.names)
        text_idx = names.index(text_column) if text_column in names else None
        rows, tokens = [], []
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            rows.append(rg.num_rows)
            if text_idx is not None:
                tokens.append(int(rg.column(text_idx).total_uncompressed_size / BYTES_PER_TOKEN))
            else:
                tokens.append(0)
        return ShardInfo(path=path, size=size, row_group_rows=tuple(rows), schema_names=names,
                         row_group_tokens=tuple(tokens), column_types=tuple(str(t) for t in schema.types))

    try:
        return call_with_retries(read, what="reading parquet footer", url=path, storage_options=storage_options,
                                 retries=retries, backoff_s=backoff_s)
    except DataSourceUnavailable:
        raise
    except Exception as e:
        if is_corruption(e) or isinstance(e, (OSError, ValueError)):
            raise DataSchemaError(redact(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); "
                                         "remove or replace it", storage_options)) from None
        raise


def resolve_source(url: str) -> str:
    """'sample'/'sample-val' -> the local bundled corpus directory (built on first use); other URLs as given."""
    if url in SAMPLE_SOURCES:
        from datasets.sample import ensure_sample
        return ensure_sample("train" if url == "sample" else "val")
    return url


def discover(url: str, storage_options: Optional[Mapping[str, Any]] = None, *, text_column: str = "text",
             retries: int = 5, backoff_s: float = 0.5, max_workers: int = 16) -> list[ShardInfo]:
    """Shards a URL names, sorted by path, from parquet footers only (parallel footer reads)."""
    resolved = resolve_source(url)
    so = storage_options if resolved == url else {}
    paths = list_parquet_files(resolved, so, retries=retries, backoff_s=backoff_s)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(max_workers, len(paths))) as pool:
        shards = list(pool.map(lambda p: read_footer(p, so, text_column, retries, backoff_s), paths))
    return shards


# arrow types the reader takes as text: strings, and bytes it decodes as UTF-8 (a dictionary-encoded column
# reads back as its values)
_TEXT_TYPES = ("string", "large_string", "string_view", "binary", "large_binary", "binary_view")


def is_text_type(arrow_type: str) -> bool:
    """Whether a column of this arrow type (as `str(pa.DataType)`) holds text."""
    return arrow_type in _TEXT_TYPES or (arrow_type.startswith("dictionary<values=")
                                         and arrow_type[len("dictionary<values="):].split(",")[0] in _TEXT_TYPES)


def discover_usable(url: str, data, known: list[ShardInfo] | None = None) -> list[ShardInfo]:
    """The shards of `url` a run can train on: `known` (a list read before) or `discover` with the storage
    options and retries of `data` (a `DataConfig`), then `check_text_column` on them. The one way a run lists
    its data: the driver's preflight and the coordinator both call it."""
    shards = known or discover(url, data.storage_options, text_column=data.text_column, retries=data.retries,
                               backoff_s=data.retry_backoff_s)
    check_text_column(shards, data.text_column)
    return shards


def check_text_column(shards: list[ShardInfo], text_column: str) -> None:
    """Stop before training if any file lacks the text column or holds something else than text in it
    (naming the file, the column and what it has): a worker would fail on every step it reads that file."""
    for sh in shards:
        if text_column not in sh.schema_names:
            raise DataSchemaError(
                f"{sh.path}: no column {text_column!r} (columns: {', '.join(sh.schema_names)}); "
                "set data.text_column or remove the file")
        if sh.column_types:
            kind = sh.column_types[sh.schema_names.index(text_column)]
            if not is_text_type(kind):
                text = [n for n, t in zip(sh.schema_names, sh.column_types) if is_text_type(t)]
                raise DataSchemaError(
                    f"{sh.path}: column {text_column!r} holds {kind}, not text (string or binary); set "
                    f"data.text_column to a text column ({', '.join(text) if text else 'the file has none'}) or remove the file")
