"""Atomic, checksummed checkpoints on any fsspec storage (local path, s3://, gs://), written without
stalling training and without gathering state in one place.

Layout: `<uri>/step-00000123/{meta.json, model.pt, sync-rank0.pt, ...}` and, written last, `COMMIT`, a
JSON manifest with the sha256 and size of every other file. A checkpoint without COMMIT, or whose files do
not match it, is not a checkpoint: `load_latest` warns and falls back to the previous one.

Who writes what (`files_by_rank`): each rank writes only what is its own. The parameters are replicated, so
rank 0 alone writes `model.pt`; the sync state is written once by rank 0 when it is replicated (dense,
diloco), else every rank writes its own `sync-rank{r}.pt` (demo's momentum). A worker copies its committed
state to host memory (`HostSnapshot`: pinned buffers and an event on CUDA, so the training stream is not
held) and returns; `BackgroundWrites` serializes and writes the files in a thread and reports each file's
sha256 and size. The coordinator (`CheckpointWriter`) writes only meta.json and the COMMIT manifest built
from those reports, in a thread of its own; it never holds the model or the sync state.

Never a committed checkpoint is deleted before its replacement has committed: a checkpoint rewritten at the
same step goes to a new versioned directory (`step-00000025.1`); checkpoints are ordered by (step,
version); pruning runs after a COMMIT and keeps the newest `keep` committed ones (never the newest).
Nothing here knows about Ray.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch

log = logging.getLogger(__name__)

COMMIT = "COMMIT"
META = "meta.json"
MODEL = "model.pt"
PREFIX = "step-"
CHUNK = 8 << 20  # bytes read at a time when checksumming
_DIR = re.compile(r"^step-(\d{8,})(?:\.(\d+))?$")
# checkpoints taken at these moments are always started, even while another is being written
_PERIODIC = "periodic"


class CheckpointError(RuntimeError):
    pass


class CheckpointFailed(RuntimeError):
    """A checkpoint the run ends on (a stop, the end) could not be written."""


# ---- names and who writes them ------------------------------------------------------------------
def dir_name(step: int, version: int = 0) -> str:
    """`step-00000025` for the first checkpoint at step 25, `step-00000025.1` for its rewrite."""
    return f"{PREFIX}{step:08d}" + (f".{version}" if version else "")


def parse_dir_name(name: str) -> tuple[int, int] | None:
    """(step, version) of a checkpoint directory's name, None for anything else."""
    m = _DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def sync_file(rank: int) -> str:
    return f"sync-rank{rank}.pt"


def files_by_rank(world: int, replicated_sync: bool) -> list[dict[str, str]]:
    """What each rank writes, `{file name: "model" | "sync"}`: the replicated parameters once (rank 0), the
    sync state once when it is replicated, else each rank its own."""
    out: list[dict[str, str]] = [{} for _ in range(world)]
    if world:
        out[0][MODEL] = "model"
    for r in range(world):
        if r == 0 or not replicated_sync:
            out[r][sync_file(r)] = "sync"
    return out


def sync_file_for(rank: int, names, replicated_sync: bool) -> str | None:
    """The sync-state file rank `rank` loads from a checkpoint holding `names`: its own; else, for a
    replicated sync state, rank 0's; else none (it starts from a fresh state, as a joiner does)."""
    own = sync_file(rank)
    if own in names:
        return own
    if replicated_sync and sync_file(0) in names:
        return sync_file(0)
    return None


# ---- bytes, records, manifests --------------------------------------------------------------------
def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def file_record(data: bytes) -> dict:
    """What the manifest says of one file."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


class _HashingWriter:
    """A write-only stream that checksums what passes through it (torch.save streams into it: the
    serialized file is never held in memory whole)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.n += len(data)
        self.f.write(data)
        return len(data)

    def flush(self) -> None:
        pass  # the file is flushed when it is closed

    def record(self) -> dict:
        return {"sha256": self.sha.hexdigest(), "bytes": self.n}


def write_file(fs, path: str, obj: Any) -> dict:
    """Write `obj` (bytes as they are, anything else through torch.save) to `path`; its record."""
    with fs.open(path, "wb") as f:
        w = _HashingWriter(f)
        if isinstance(obj, (bytes, bytearray)):
            w.write(obj)
        else:
            torch.save(obj, w)
    return w.record()


def build_manifest(step: int, version: int, records: Mapping[str, dict]) -> dict:
    """The COMMIT manifest: every file of the checkpoint with its sha256 and size."""
    if META not in records:
        raise ValueError(f"a manifest needs {META}; got {sorted(records)}")
    for name, r in records.items():
        if not (isinstance(r.get("sha256"), str) and len(r["sha256"]) == 64 and isinstance(r.get("bytes"), int)):
            raise ValueError(f"manifest record of {name} is not {{sha256, bytes}}: {r}")
    return {"step": step, "version": version, "created": time.time(),
            "files": {name: dict(records[name]) for name in sorted(records)}}


def prune_plan(entries: list[tuple[int, int, bool]], keep: int) -> list[tuple[int, int]]:
    """Which of the (step, version, committed) directories to delete: committed ones beyond the newest
    `keep` (the newest committed is always kept), and uncommitted ones older than the newest committed
    (abandoned writes). Uncommitted ones newer than every committed one may still be being written: kept."""
    order = sorted(entries)
    committed = [(s, v) for s, v, c in order if c]
    if not committed:
        return []
    kept = set(committed[-max(1, keep):])
    newest = committed[-1]
    return [(s, v) for s, v, c in order if (c and (s, v) not in kept) or (not c and (s, v) < newest)]


def should_start(reason: str, in_flight: int) -> bool:
    """A periodic checkpoint is skipped while another is still being written (slow storage must not pile
    snapshots up in host memory); any other (a membership change, a stop, the end, an error) starts."""
    return not (reason == _PERIODIC and in_flight > 0)


def verify_file(fs, path: str, record: dict, public: str) -> None:
    """Stream `path` through sha256 (chunk by chunk, never held whole); CheckpointError if it does not
    match its manifest `record`."""
    sha, n = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"{public}: missing") from None
    _check(public, n, sha.hexdigest(), record)


def _check(public: str, n: int, digest: str, record: dict) -> None:
    if n != record["bytes"] or digest != record["sha256"]:
        raise CheckpointError(f"{public}: checksum mismatch ({n} bytes, manifest says {record['bytes']}): "
                              "truncated or corrupt")


def read_checked(fs, path: str, record: dict, public: str) -> bytes:
    """The bytes at `path`, checked against its manifest `record`; CheckpointError names `public`."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{public}: missing") from None
    _check(public, len(data), hashlib.sha256(data).hexdigest(), record)
    return data


def load_file(dir_uri: str, name: str, record: dict, storage_options: dict | None = None) -> bytes:
    """One file of the checkpoint at `dir_uri`, checked against its manifest `record` (a worker loading
    its own part of a checkpoint calls this; nothing goes through the coordinator)."""
    fs, root = fsspec.core.url_to_fs(dir_uri.rstrip("/"), **(storage_options or {}))
    return read_checked(fs, f"{root}/{name}", record, f"{dir_uri.rstrip('/')}/{name}")


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def load_tensors(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ---- reading ------------------------------------------------------------------------------------------
class _Files(Mapping):
    """A committed checkpoint's data files, read (and checked against the manifest) on first access."""

    def __init__(self, fs, root: str, public: str, records: dict):
        self._fs, self._root, self._public = fs, root, public
        self._records = {k: v for k, v in records.items() if k != META}
        self._cache: dict[str, bytes] = {}

    def __getitem__(self, name: str) -> bytes:
        if name not in self._records:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = read_checked(self._fs, f"{self._root}/{name}", self._records[name],
                                             f"{self._public}/{name}")
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


@dataclass
class Checkpoint:
    step: int
    uri: str
    meta: dict
    files: Mapping[str, bytes]  # name -> bytes; read from storage on first access for a stored checkpoint
    version: int = 0
    records: dict = field(default_factory=dict)  # the manifest's {name: {sha256, bytes}}

    def tensor_file(self, name: str) -> Any:
        return load_tensors(self.files[name])


class CheckpointStore:
    def __init__(self, uri: str, keep: int = 3, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.keep = keep
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        # versions handed out by `begin` and not yet committed or released: maybe not on storage yet, and
        # never pruned while being written (`begin` runs in the coordinator's thread, `commit` in its writer's)
        self._claimed: set[tuple[int, int]] = set()
        self._newest: dict[int, int] | None = None  # step -> highest version seen or handed out (listed once)
        self._lock = threading.Lock()

    def _dir(self, step: int, version: int = 0) -> str:
        return f"{self.root}/{dir_name(step, version)}"

    def public_uri(self, step: int, version: int = 0) -> str:
        return f"{self.uri}/{dir_name(step, version)}"

    def entries(self) -> list[tuple[int, int]]:
        """Every checkpoint directory's (step, version), committed or not, oldest first."""
        try:
            paths = self.fs.ls(self.root, detail=False, refresh=True) if self.fs.exists(self.root) else []
        except FileNotFoundError:
            return []
        return sorted(p for p in (parse_dir_name(path) for path in paths) if p is not None)

    def steps(self) -> list[int]:
        """The steps that have a checkpoint directory (committed or not), oldest first."""
        return sorted({s for s, _ in self.entries()})

    def _manifest(self, step: int, version: int) -> dict:
        public = self.public_uri(step, version)
        try:
            with self.fs.open(f"{self._dir(step, version)}/{COMMIT}", "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            raise CheckpointError(f"{public}: no {COMMIT} marker (written partially)") from None
        except json.JSONDecodeError:
            raise CheckpointError(f"{public}/{COMMIT}: manifest is not valid JSON") from None
        if not isinstance(manifest.get("files"), dict) or META not in manifest["files"]:
            raise CheckpointError(f"{public}/{COMMIT}: manifest lists no {META}")
        return manifest

    def read(self, step: int, version: int | None = None) -> Checkpoint:
        """The committed checkpoint at `step` (its newest valid version unless `version` is given), every
        file checked against the manifest (streamed: nothing is held but meta.json; the data files are
        read again when asked for through `files` / `tensor_file`)."""
        if version is None:
            versions = sorted((v for s, v in self.entries() if s == step), reverse=True) or [0]
            err: CheckpointError | None = None
            for v in versions:
                try:
                    return self.read(step, v)
                except CheckpointError as e:
                    err = err or e
            raise err
        d, public = self._dir(step, version), self.public_uri(step, version)
        records = self._manifest(step, version)["files"]
        for name, rec in records.items():
            if name != META:
                verify_file(self.fs, f"{d}/{name}", rec, f"{public}/{name}")
        meta = json.loads(read_checked(self.fs, f"{d}/{META}", records[META], f"{public}/{META}"))
        return Checkpoint(step=step, uri=public, meta=meta, files=_Files(self.fs, d, public, records),
                          version=version, records=records)

    def load_latest(self) -> Checkpoint | None:
        """The newest valid checkpoint by (step, version); invalid newer ones are reported and skipped."""
        for step, version in reversed(self.entries()):
            try:
                return self.read(step, version)
            except CheckpointError as e:
                log.warning("skipping checkpoint: %s; using the previous one", e)
        return None

    def latest_committed_uri(self) -> str | None:
        """The newest directory with a COMMIT marker (not checked further; for messages)."""
        for step, version in reversed(self.entries()):
            if self.fs.exists(f"{self._dir(step, version)}/{COMMIT}"):
                return self.public_uri(step, version)
        return None

    # ---- writing ------------------------------------------------------------------------------------
    def begin(self, step: int) -> tuple[int, str]:
        """A fresh directory for a checkpoint at `step`: (version, its URI). A version never reused, so a
        rewrite at the same step never touches the committed checkpoint it replaces."""
        if self._newest is None:  # storage is listed once; later versions are known from here
            newest: dict[int, int] = {}
            for s, v in self.entries():
                newest[s] = max(newest.get(s, -1), v)
            self._newest = newest
        with self._lock:
            version = self._newest.get(step, -1) + 1
            self._newest[step] = version
            self._claimed.add((step, version))
        if _is_local(self.fs):  # object stores have no directories: nothing to ask a (maybe slow) store here
            self.fs.makedirs(self._dir(step, version), exist_ok=True)
        return version, self.public_uri(step, version)

    def commit(self, step: int, version: int, meta: dict, records: Mapping[str, dict], prune: bool = True,
               abandoned: threading.Event | None = None) -> str:
        """Write meta.json, then the COMMIT manifest of `records` (the writers' reports) and meta.json; then
        prune (unless `prune` is False: the caller prunes on its own time). The checkpoint exists from the
        moment COMMIT does. `abandoned` set by then (its writer gave up on a store that hung): no COMMIT."""
        d = self._dir(step, version)
        meta_bytes = json.dumps(meta, indent=1, sort_keys=True, default=str).encode()
        all_records = {**records, META: write_file(self.fs, f"{d}/{META}", meta_bytes)}
        manifest = build_manifest(step, version, all_records)
        if abandoned is not None and abandoned.is_set():
            raise CheckpointFailed(f"{self.public_uri(step, version)} was abandoned before its COMMIT")
        write_file(self.fs, f"{d}/{COMMIT}", json.dumps(manifest, indent=1).encode())
        self.release(step, version)
        if prune:
            self.prune_quietly(f"after committing {dir_name(step, version)}")
        return self.public_uri(step, version)

    def prune_quietly(self, when: str) -> None:
        """`prune`, a failure only logged: the checkpoints it would delete stay until the next one."""
        try:
            self.prune()
        except Exception as e:
            log.warning("pruning %s %s failed (%s: %s); older checkpoints stay until the next", self.uri, when,
                        type(e).__name__, first_line(e))

    def release(self, step: int, version: int) -> None:
        """Forget a version handed out by `begin` (committed, or abandoned: pruned once older than a commit)."""
        with self._lock:
            self._claimed.discard((step, version))

    def write(self, step: int, meta: dict, files: Mapping[str, Any]) -> str:
        """Write a whole checkpoint from one process (bytes or objects for torch.save); returns its URI."""
        version, _ = self.begin(step)
        d = self._dir(step, version)
        records = {name: write_file(self.fs, f"{d}/{name}", obj) for name, obj in files.items()}
        return self.commit(step, version, meta, records)

    def prune(self) -> None:
        entries = [(s, v, self.fs.exists(f"{self._dir(s, v)}/{COMMIT}")) for s, v in self.entries()]
        with self._lock:
            claimed = set(self._claimed)
        for s, v in prune_plan(entries, self.keep):
            if (s, v) in claimed:
                continue  # being written right now (by this process's writers)
            try:
                self.fs.rm(self._dir(s, v), recursive=True)
            except FileNotFoundError:
                pass


# ---- the worker's side: snapshot, then write in the background -------------------------------------
def state_trees(files: Mapping[str, str], model: torch.nn.Module, sync) -> dict[str, Any]:
    """The live (device) state behind each file of `files` ({name: "model" | "sync"}): the model's
    state_dict, or the sync's state_dict ({} without a sync)."""
    trees: dict[str, Any] = {}
    for name, what in files.items():
        if what == "model":
            trees[name] = model.state_dict()
        elif what == "sync":  # on the device: the snapshot queues its own copies to pinned host memory
            trees[name] = sync.state_dict(on_device=True) if sync is not None else {}
        else:
            raise ValueError(f"checkpoint file {name} holds '{what}'; expected model or sync")
    return trees


def checkpoint_layout(model: torch.nn.Module, sync) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor a worker's snapshot may copy: the parameters (model.pt, written by rank
    0) and its sync state (written by every rank, or once if replicated) once the sync has stepped."""
    model_part = [(tuple(t.shape), t.dtype) for t in model.state_dict().values()]
    return model_part + (sync.state_layout() if sync is not None else [])


class PinnedPool:
    """Pinned host buffers kept from one snapshot to the next. Pinning memory costs far more than copying
    into it, so every checkpoint after a worker's first reuses the buffers of the one before (given back
    once its write is done); at most as many buffers of a shape are kept as one snapshot used."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._peak: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        buf = self.try_take(shape, dtype)
        return buf if buf is not None else torch.empty(shape, dtype=dtype, pin_memory=True)

    def try_take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """A pooled buffer of that shape, or None (nothing is allocated)."""
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            return free.pop() if free else None

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        counts: dict[tuple, int] = {}
        for b in buffers:
            key = (tuple(b.shape), b.dtype)
            counts[key] = counts.get(key, 0) + 1
        with self._lock:
            for key, n in counts.items():
                self._peak[key] = max(self._peak.get(key, 0), n)
            for b in buffers:
                key = (tuple(b.shape), b.dtype)
                free = self._free.setdefault(key, [])
                if len(free) < self._peak[key]:
                    free.append(b)

    def reserve(self, layout: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
        """Pin one buffer per (shape, dtype) of `layout` ahead of a worker's first checkpoint (at set-up, off
        the step path: pinning gigabytes takes about a second, and while it runs the training thread's CUDA
        calls wait on the driver). Counts as what one snapshot uses. Returns the bytes pinned."""
        bufs = [torch.empty(shape, dtype=dtype, pin_memory=True) for shape, dtype in layout]
        self.give_back(bufs)
        return sum(b.numel() * b.element_size() for b in bufs)

    def pooled_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for bs in self._free.values() for b in bs)


class _Staged:
    """A device copy waiting to be moved to host memory by the writing thread."""

    def __init__(self, t: torch.Tensor):
        self.t = t


class HostSnapshot:
    """A copy of state trees (nested dicts/lists of tensors) in host memory, taken without waiting for
    the device: CUDA tensors are copied into pinned buffers (from `pool`, reused across checkpoints) with
    non_blocking copies queued on the current stream (so later in-place updates of the parameters queue
    after them), and an event marks their end; host tensors are cloned when `clone_host` (on a CPU worker
    they are the live state itself). A tensor the pool has no buffer for yet (a worker's first checkpoint:
    pinning memory takes about as long as a step) is copied on the device instead (`clone`, a fraction of a
    millisecond) when free device memory allows, and moved to a pinned buffer allocated by the writing
    thread, on a stream of its own (`wait`)."""

    def __init__(self, trees: dict[str, Any], clone_host: bool, pool: PinnedPool | None = None):
        self.event = None
        self.bytes = 0
        self.pool = pool
        self.pinned: list[torch.Tensor] = []  # buffers taken from `pool`, given back by `release`
        self.staged = 0  # tensors copied on the device, moved to host memory by `wait`
        self._stage_budget: int | None = None  # device bytes the staged copies may take
        self._unstaged = False
        self.trees = {name: self._copy(tree, clone_host) for name, tree in trees.items()}
        if self.event is not None:
            self.event.record()

    def _copy(self, x: Any, clone_host: bool) -> Any:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            self.bytes += t.numel() * t.element_size()
            if t.device.type == "cuda":
                if self.event is None:
                    self.event = torch.cuda.Event()
                if self.pool is not None:
                    buf = self.pool.try_take(t.size(), t.dtype)
                    if buf is None and self._may_stage(t):
                        self.staged += 1
                        return _Staged(t.clone())
                    buf = buf if buf is not None else self.pool.take(t.size(), t.dtype)
                    self.pinned.append(buf)
                else:
                    buf = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                return buf
            return t.clone() if clone_host else t
        if isinstance(x, dict):
            return {k: self._copy(v, clone_host) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self._copy(v, clone_host) for v in x)
        return x

    def _may_stage(self, t: torch.Tensor) -> bool:
        if self._stage_budget is None:
            free, _ = torch.cuda.mem_get_info(t.device)
            self._stage_budget = max(0, free - (4 << 30)) // 2  # leave training its room
        n = t.numel() * t.element_size()
        if n > self._stage_budget:
            return False
        self._stage_budget -= n
        return True

    def wait(self) -> None:
        """Block until the device copies are done, then move the staged ones to pinned host buffers
        (called by the writing thread)."""
        if self.event is not None:
            self.event.synchronize()
        if self.staged and not self._unstaged:
            self.trees = {name: self._unstage(tree) for name, tree in self.trees.items()}
            self._unstaged = True

    def _unstage(self, x: Any) -> Any:
        if isinstance(x, _Staged):
            buf = self.pool.take(x.t.size(), x.t.dtype)  # pinning happens here, off the training thread
            self.pinned.append(buf)
            side = torch.cuda.Stream(device=x.t.device)  # not the training stream: its work never waits
            with torch.cuda.stream(side):
                buf.copy_(x.t, non_blocking=True)
            side.synchronize()
            x.t = None  # the device copy is freed
            return buf
        if isinstance(x, dict):
            return {k: self._unstage(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self._unstage(v) for v in x)
        return x

    def release(self) -> None:
        """The files are written: drop the copies, the pinned buffers go back to the pool."""
        self.trees = {}
        if self.pool is not None and self.pinned:
            self.pool.give_back(self.pinned)
        self.pinned = []


class BackgroundWrites:
    """A worker's checkpoint writes: `start` queues a snapshot's files for one thread (writes run one at a
    time, oldest first), `result` waits for a checkpoint's records ({name: {sha256, bytes}})."""

    def __init__(self, name: str = "checkpoint"):
        self._name = f"{name}-write"
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self.pinned = PinnedPool()  # for this worker's snapshots (`HostSnapshot(..., pool=writes.pinned)`)
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._cv = threading.Condition()

    def start(self, dir_uri: str, snap: HostSnapshot, storage_options: dict | None = None) -> None:
        self._register(dir_uri, self._pool.submit(self._write, dir_uri, snap, dict(storage_options or {})))

    def failed(self, dir_uri: str, error: BaseException) -> None:
        """Record that the snapshot for `dir_uri` could not be taken (`result` raises it)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_exception(error)
        self._register(dir_uri, fut)

    def _register(self, dir_uri: str, fut: concurrent.futures.Future) -> None:
        with self._cv:
            self._futures[dir_uri] = fut
            self._cv.notify_all()

    @staticmethod
    def _write(dir_uri: str, snap: HostSnapshot, storage_options: dict) -> dict:
        t0 = time.perf_counter()
        try:
            snap.wait()
            fs, root = fsspec.core.url_to_fs(dir_uri.rstrip("/"), **storage_options)
            if _is_local(fs):
                fs.makedirs(root, exist_ok=True)
            records = {name: write_file(fs, f"{root}/{name}", tree) for name, tree in snap.trees.items()}
        finally:
            snap.release()
        log.info("wrote %s to %s in %.2fs", sorted(records), dir_uri, time.perf_counter() - t0)
        return records

    def result(self, dir_uri: str, timeout: float | None = None) -> dict:
        """The records of the files written for `dir_uri`; raises what the write raised, or TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while dir_uri not in self._futures:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no snapshot was taken for {dir_uri}")
                self._cv.wait(left)
            fut = self._futures[dir_uri]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            records = fut.result(left)
        except concurrent.futures.TimeoutError:
            with self._cv:  # a store that hangs holds that thread: later writes get a fresh one
                if fut.running():
                    self._pool.shutdown(wait=False)
                    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self._name)
            raise TimeoutError(f"writing {dir_uri} took longer than {timeout:.0f}s (checkpoint.write_timeout_s)") \
                from None
        finally:
            if fut.done():
                with self._cv:
                    self._futures.pop(dir_uri, None)
        return records

    def in_flight(self) -> int:
        """How many writes are queued or running."""
        with self._cv:
            return sum(not f.done() for f in self._futures.values())

    def wait_all(self, timeout: float | None = None) -> None:
        """Block until every queued write has finished (succeeded or failed)."""
        with self._cv:
            futs = list(self._futures.values())
        concurrent.futures.wait(futs, timeout)


# ---- the coordinator's side: which checkpoints are in flight, and their commits ----------------------
@dataclass
class InFlightCheckpoint:
    """A checkpoint whose files are being written by the workers; `writers`: handle -> (who, files)."""
    step: int
    version: int
    uri: str
    reason: str
    meta: dict
    writers: dict[Any, tuple[str, dict[str, str]]]
    started: float = field(default_factory=time.time)
    snapshots: dict[Any, str] = field(default_factory=dict)  # handle -> who, for the host copies' durations
    snapshot_s: float = 0.0  # the longest host copy (how long training was held)
    records: dict[str, dict] = field(default_factory=dict)
    error: str | None = None
    commit: concurrent.futures.Future | None = None
    commit_started: float = 0.0
    abandoned: threading.Event = field(default_factory=threading.Event)  # no COMMIT may follow

    @property
    def pending(self) -> list:
        """The handles whose files have not been reported yet."""
        return [] if self.error else list(self.writers)

    def deliver(self, handle: Any, report: dict) -> None:
        """A writer's report: {name: {sha256, bytes}} for exactly the files it was asked for."""
        who, want = self.writers.pop(handle)
        got = set(report)
        if got != set(want):
            self.fail(who, f"reported files {sorted(got)}, expected {sorted(want)}")
            return
        self.records.update(report)

    def fail(self, who: str, why: str) -> None:
        if self.error is None:
            self.error = f"{who}: {why}"
        self.writers.clear()


class CheckpointWriter:
    """The coordinator's checkpoints in flight: started with `begin`, fed the workers' reports, committed
    (meta.json + COMMIT, then pruning) in a background thread so a slow store never holds the step loop."""

    def __init__(self, store: CheckpointStore, timeout_s: float = 600.0):
        self.store = store
        self.timeout_s = timeout_s  # a commit (meta.json + COMMIT) not done by then fails (checkpoint.write_timeout_s)
        self.in_flight: list[InFlightCheckpoint] = []
        self.last_committed: str | None = None  # this run's newest committed checkpoint
        self.last_error: str | None = None  # why the last checkpoint that failed failed
        self.final_failed = False  # a checkpoint the run ends on could not be written
        self._pool = self._commit_thread()
        # pruning lists and deletes: on a store that hangs it must not hold a commit, nor pile up
        self._prune_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-prune")
        self._pruning: concurrent.futures.Future | None = None

    @staticmethod
    def _commit_thread() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-commit")

    def should_start(self, reason: str) -> bool:
        return should_start(reason, len(self.in_flight))

    def begin(self, step: int, reason: str, meta: dict) -> InFlightCheckpoint:
        version, uri = self.store.begin(step)
        ck = InFlightCheckpoint(step, version, uri, reason, {**meta, "version": version}, {})
        self.in_flight.append(ck)
        return ck

    def abandon(self, why: str) -> None:
        """Give up on every checkpoint whose files are not all written (`advance` reports them)."""
        for ck in self.in_flight:
            if ck.writers:
                ck.fail("coordinator", why)

    def failure(self, ck: InFlightCheckpoint) -> str:
        """What a failed checkpoint's warning says."""
        prev = f"the previous checkpoint {self.last_committed} stays" if self.last_committed else \
            "the previous checkpoint, if any, stays"
        return f"checkpoint {ck.uri} ({ck.reason}, step {ck.step}) failed: {ck.error}; {prev}"

    def advance(self, wait_s: float = 0.0) -> list[InFlightCheckpoint]:
        """Start the commit of every checkpoint whose files are all written; return (and forget) those
        finished: committed (`error` None) or failed. Waits up to `wait_s` for commits in progress."""
        for ck in self.in_flight:
            if ck.error is None and not ck.writers and ck.commit is None:
                ck.commit_started = time.time()
                ck.commit = self._pool.submit(self.store.commit, ck.step, ck.version, ck.meta, dict(ck.records),
                                              prune=False, abandoned=ck.abandoned)
        running = [ck.commit for ck in self.in_flight if ck.commit is not None and not ck.commit.done()]
        if running and wait_s > 0:
            concurrent.futures.wait(running, wait_s)
        for ck in self.in_flight:  # a store that hangs: the commit fails, later ones get a fresh thread
            if (ck.error is None and ck.commit is not None and not ck.commit.done()
                    and time.time() - ck.commit_started > self.timeout_s):
                ck.abandoned.set()
                ck.error = (f"coordinator: writing {META}/{COMMIT} took longer than {self.timeout_s:.0f}s "
                            "(checkpoint.write_timeout_s; a COMMIT the store already received may still land: that "
                            "checkpoint is then complete, since every file was written before it)")
                self._pool.shutdown(wait=False)
                self._pool = self._commit_thread()
        done = []
        for ck in list(self.in_flight):
            if ck.error is None and (ck.commit is None or not ck.commit.done()):
                continue
            if ck.error is None and ck.commit.exception() is not None:
                e = ck.commit.exception()
                ck.error = f"coordinator: writing {META}/{COMMIT}: {type(e).__name__}: {first_line(e)}"
            if ck.error is not None:
                self.store.release(ck.step, ck.version)
                self.last_error = ck.error
            else:
                self.last_committed = ck.uri
            self.in_flight.remove(ck)
            done.append(ck)
        if any(ck.error is None for ck in done) and (self._pruning is None or self._pruning.done()):
            self._pruning = self._prune_pool.submit(self.store.prune_quietly, "after a commit")
        return done


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
