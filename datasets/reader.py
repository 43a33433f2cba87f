"""Reading planned document ranges into token lists: row-group streaming, prefetch, retries, bad-row handling.

`ShardReader(shards, storage_options, tokenizer, cfg).read(ranges) -> list[list[int]]`.

Promises:
- Only the row groups a range touches are read (`ParquetFile.read_row_group(i, columns=[...])` over an
  fsspec file handle, footer reused from the first open): a 4 GiB FineWeb file is never in memory.
- Memory is bounded: at most `cache_row_groups` decoded row groups (text + filter columns) are held,
  least recently used evicted; background threads fetch the row groups of the next step (`prefetch`).
- Transient store errors are retried with exponential backoff (datasets.sources.call_with_retries) and end
  in `DataSourceUnavailable` (stop; the caller checkpoints).
- Never a silent wrong result. Each document is exactly one of: returned (tokenized, maybe truncated),
  filtered (config filters), empty (null/blank text), corrupt (its row group cannot be decoded). Counters
  for each, plus truncated and invalid_utf8 (decoded with U+FFFD), are kept per call and cumulatively;
  every skip or repair logs a warning naming the file and row group. What stops the run and what is
  skipped is listed in docs/datasets.md.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasets.config import DataConfig
from datasets.plan import DocRange, ShardInfo
from datasets.sources import (DataSchemaError, call_with_retries, check_text_column, filesystem_for,
                              is_corruption, redact)
from datasets.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

# Text longer than this many characters per allowed token is cut before tokenizing (then re-checked):
# avoids tokenizing a 100 MB document to keep 64k tokens.
_CHARS_PER_TOKEN_CAP = 8
_TRUNCATION_MARGIN = 64


@dataclass
class ReadStats:
    documents: int = 0        # rows requested
    returned: int = 0         # documents handed back as token lists
    tokens: int = 0           # tokens in those documents (no EOT)
    text_chars: int = 0       # characters of text tokenized
    filtered: int = 0         # dropped by min_language_score / min_int_score
    empty: int = 0            # null or blank text
    corrupt: int = 0          # in a row group that cannot be decoded
    truncated: int = 0        # longer than max_doc_tokens (cut, still returned)
    invalid_utf8: int = 0     # had invalid UTF-8 (decoded with replacement characters, still returned)

    @property
    def unusable(self) -> int:
        """Documents consumed but not trained on for data reasons (what DataPlan.commit calls unusable)."""
        return self.empty + self.corrupt

    def add(self, other: "ReadStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DocBatch:
    docs: list[list[int]]  # token ids per document (int32 numpy arrays when from the read-ahead child)
    stats: ReadStats
    # rows consumed but not returned, as (DocRange, "filtered" | "unusable"): what DataPlan.commit takes
    dropped: list[tuple[DocRange, str]] = field(default_factory=list)
    # the one-row DocRange each of `docs` came from
    origins: list[DocRange] = field(default_factory=list)

    def dropped_json(self) -> list[list]:
        return [r.to_list() + [reason] for r, reason in self.dropped]


def _merge_drops(drops: list[tuple[DocRange, str]]) -> list[tuple[DocRange, str]]:
    out: list[tuple[DocRange, str]] = []
    for r, reason in drops:
        if out:
            p, pr = out[-1]
            if pr == reason and p.shard == r.shard and p.row_group == r.row_group and p.stop == r.start:
                out[-1] = (DocRange(p.shard, p.row_group, p.start, r.stop), reason)
                continue
        out.append((r, reason))
    return out


def assemble(batches: Sequence[DocBatch], ranges: Sequence[DocRange]) -> tuple[DocBatch, list[DocRange]]:
    """The batch `read_batch(ranges)` would give, put together from batches already read (of other, possibly
    overlapping ranges): documents and drops in the order of `ranges`. Also returns the rows none of the
    batches covers (as one-row ranges): read those, then assemble again with that batch too. Stats count
    documents, returned documents and tokens only. A row may appear once in `ranges`."""
    docs_of: dict[tuple[int, int, int], list[int]] = {}
    drop_of: dict[tuple[int, int, int], str] = {}
    for b in batches:
        for o, d in zip(b.origins, b.docs):
            docs_of[(o.shard, o.row_group, o.start)] = d
        for r, reason in b.dropped:
            for row in range(r.start, r.stop):
                drop_of[(r.shard, r.row_group, row)] = reason
    st = ReadStats()
    docs, origins, drops, missing = [], [], [], []
    for r in ranges:
        for row in range(r.start, r.stop):
            key = (r.shard, r.row_group, row)
            one = DocRange(r.shard, r.row_group, row, row + 1)
            st.documents += 1
            if key in docs_of:
                docs.append(docs_of[key])
                origins.append(one)
            elif key in drop_of:
                drops.append((one, drop_of[key]))
            else:
                missing.append(one)
    st.returned, st.tokens = len(docs), sum(len(d) for d in docs)
    return DocBatch(docs=docs, stats=st, dropped=_merge_drops(drops), origins=origins), missing


_CORRUPT = object()   # cache marker: this row group cannot be decoded


class ShardReader:
    """Reads `DocRange`s of `shards` into token lists. Thread-safe for one reader thread plus prefetch."""

    def __init__(self, shards: Sequence[ShardInfo], storage_options: Optional[Mapping[str, Any]] = None,
                 tokenizer: Union[str, Tokenizer, None] = None, cfg: Optional[DataConfig] = None,
                 io_threads: int = 4, cache_row_groups: Optional[int] = None):
        self.cfg = cfg or DataConfig()
        self.shards = list(shards)
        self.storage_options = dict(storage_options if storage_options is not None else self.cfg.storage_options)
        tok = tokenizer if tokenizer is not None else self.cfg.tokenizer
        self.tokenizer: Tokenizer = get_tokenizer(tok) if isinstance(tok, str) else tok
        self.eot = self.tokenizer.eot
        check_text_column(self.shards, self.cfg.text_column)
        self._filters: list[tuple[str, float]] = []
        if self.cfg.min_language_score is not None:
            self._filters.append(("language_score", float(self.cfg.min_language_score)))
        if self.cfg.min_int_score is not None:
            self._filters.append(("int_score", float(self.cfg.min_int_score)))
        for col, _ in self._filters:
            for sh in self.shards:
                if col not in sh.schema_names:
                    raise DataSchemaError(
                        f"{sh.path}: filter on {col!r} configured (data.min_{'language_score' if col == 'language_score' else 'int_score'}) "
                        f"but the file has no such column (columns: {', '.join(sh.schema_names)})")
        self._columns = [self.cfg.text_column] + [c for c, _ in self._filters]
        self._capacity = cache_row_groups or max(2, 2 * int(self.cfg.prefetch_row_groups))
        self._cache: "collections.OrderedDict[tuple[int, int], concurrent.futures.Future]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="shard-io")
        self._metadata: dict[int, pq.FileMetaData] = {}
        self.stats = ReadStats()
        self.row_groups_read = 0          # actual row-group reads from storage (tests pin streaming)

    # ------------------------------------------------------------------ row groups
    def _load_row_group(self, s: int, g: int):
        sh = self.shards[s]
        fs, path = filesystem_for(sh.path, self.storage_options)

        def fetch() -> pa.Table:
            # no readahead cache: pyarrow asks for exact column-chunk ranges, and s3fs's default 50 MB readahead
            # would fetch far more than one row group (docs/BENCHMARKS.md times both)
            with fs.open(path, "rb", cache_type="none") as f:
                pf = pq.ParquetFile(f, metadata=self._metadata.get(s))
                self._metadata.setdefault(s, pf.metadata)
                return pf.read_row_group(g, columns=self._columns)

        try:
            table = call_with_retries(fetch, what=f"reading row group {g}", url=sh.path,
                                      storage_options=self.storage_options, retries=self.cfg.retries,
                                      backoff_s=self.cfg.retry_backoff_s)
        except Exception as e:
            if is_corruption(e):
                log.warning("%s row group %d: cannot be decoded (%s: %s); its %d documents are skipped "
                            "and counted as corrupt", sh.path, g, type(e).__name__,
                            redact(str(e), self.storage_options)[:200], sh.row_group_rows[g])
                return _CORRUPT
            raise
        with self._lock:
            self.row_groups_read += 1
        return table

    def _future(self, key: tuple[int, int], keep: frozenset = frozenset()) -> concurrent.futures.Future:
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._load_row_group, *key)
            self._cache[key] = fut
            # evict least recently used finished entries beyond capacity (never ones this read still needs)
            for old in list(self._cache):
                if len(self._cache) <= self._capacity:
                    break
                if old != key and old not in keep and self._cache[old].done():
                    del self._cache[old]
            return fut

    def prefetch(self, ranges: Sequence[DocRange]) -> None:
        """Start fetching the row groups of `ranges` in the background (a hint; bounded by the cache size)."""
        seen: list[tuple[int, int]] = []
        for r in ranges:
            key = (r.shard, r.row_group)
            if key not in seen:
                seen.append(key)
        for key in seen[: self._capacity // 2 or 1]:
            with self._lock:
                full = key not in self._cache and len(self._cache) >= self._capacity
            if full:          # a hint, never a reason to hold more than the cache bound
                break
            self._future(key)

    # ------------------------------------------------------------------ documents
    def _texts(self, s: int, g: int, table: pa.Table, r: DocRange, st: ReadStats,
               drops: list[tuple[DocRange, str]], origins: list[DocRange]) -> list[str]:
        """Texts of rows [r.start, r.stop) that pass the filters, with bad rows counted."""
        sl = table.slice(r.start, len(r))
        keep = None
        for col, minimum in self._filters:
            ok = pc.fill_null(pc.greater_equal(sl.column(col), pa.scalar(minimum)), False)
            keep = ok if keep is None else pc.and_(keep, ok)
        texts_col = sl.column(self.cfg.text_column)
        if not (pa.types.is_binary(texts_col.type) or pa.types.is_large_binary(texts_col.type)):
            texts_col = texts_col.cast(pa.large_binary() if pa.types.is_large_string(texts_col.type) else pa.binary())
        raw = texts_col.to_pylist()
        mask = keep.to_pylist() if keep is not None else None
        out: list[str] = []
        path = self.shards[s].path
        for i, b in enumerate(raw):
            row = DocRange(s, g, r.start + i, r.start + i + 1)
            if mask is not None and not mask[i]:
                st.filtered += 1
                drops.append((row, "filtered"))
                continue
            if b is None:
                st.empty += 1
                drops.append((row, "unusable"))
                continue
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:
                text = b.decode("utf-8", errors="replace")
                st.invalid_utf8 += 1
                log.warning("%s row group %d row %d: invalid UTF-8, decoded with replacement characters",
                            path, g, r.start + i)
            if not text.strip():
                st.empty += 1
                drops.append((row, "unusable"))
                continue
            out.append(text)
            origins.append(row)
        return out

    def _tokenize(self, texts: list[str], origins: list[DocRange], st: ReadStats) -> list[list[int]]:
        limit = int(self.cfg.max_doc_tokens)
        cap = limit * _CHARS_PER_TOKEN_CAP
        heads = [t if len(t) <= cap else t[:cap] for t in texts]
        docs = self.tokenizer.encode_batch(heads)
        first_cut = None
        for i, (text, head) in enumerate(zip(texts, heads)):
            if head is not text and len(docs[i]) <= limit + _TRUNCATION_MARGIN:
                docs[i] = self.tokenizer.encode(text)       # the cut was too short to decide: do it whole
            if len(docs[i]) > limit:
                o = origins[i]
                # one line per batch below, not per document: a corpus of long documents must not flood logs
                log.debug("%s row group %d row %d: %d+ tokens, truncated to data.max_doc_tokens=%d",
                          self.shards[o.shard].path, o.row_group, o.start, len(docs[i]), limit)
                if first_cut is None:
                    first_cut = o
                docs[i] = docs[i][:limit]
                st.truncated += 1
            st.text_chars += len(text)
        if first_cut is not None:
            log.warning("%d documents longer than data.max_doc_tokens=%d truncated (counted; first: %s row group "
                        "%d row %d)", st.truncated, limit, self.shards[first_cut.shard].path, first_cut.row_group,
                        first_cut.start)
        return docs

    def read_batch(self, ranges: Sequence[DocRange]) -> DocBatch:
        """Documents of `ranges`, in order, with the counts of what was dropped or repaired."""
        st = ReadStats()
        self.prefetch(ranges)
        keep = frozenset((r.shard, r.row_group) for r in ranges)
        texts: list[str] = []
        drops: list[tuple[DocRange, str]] = []
        origins: list[DocRange] = []
        for r in ranges:
            sh = self.shards[r.shard]
            if not (0 <= r.row_group < sh.num_row_groups and 0 <= r.start <= r.stop <= sh.row_group_rows[r.row_group]):
                raise ValueError(f"{sh.path}: range {r} outside the file's row groups {list(sh.row_group_rows)}")
            st.documents += len(r)
            key = (r.shard, r.row_group)
            fut = self._future(key, keep)
            try:
                table = fut.result()
            except BaseException:
                with self._lock:          # do not cache a failure: a later read (after recovery) retries
                    if self._cache.get(key) is fut:
                        del self._cache[key]
                raise
            if table is _CORRUPT:
                st.corrupt += len(r)
                drops.append((r, "unusable"))
                continue
            texts.extend(self._texts(r.shard, r.row_group, table, r, st, drops, origins))
        docs = self._tokenize(texts, origins, st) if texts else []
        st.returned = len(docs)
        st.tokens = sum(len(d) for d in docs)
        if st.empty or st.corrupt:
            log.warning("read: %d empty and %d corrupt documents skipped (counted)", st.empty, st.corrupt)
        with self._lock:
            self.stats.add(st)
        return DocBatch(docs=docs, stats=st, dropped=_merge_drops(drops), origins=origins)

    def read(self, ranges: Sequence[DocRange]) -> list[list[int]]:
        """Token lists of the usable documents of `ranges` (no EOT; `pack` adds the separators)."""
        return self.read_batch(ranges).docs

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._cache.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
