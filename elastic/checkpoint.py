"""Atomic, checksummed checkpoints on any fsspec storage (local path, s3://, gs://).

Layout: `<uri>/step-00000123/{meta.json, model.pt, sync-rank0.pt, ...}` and, written last, `COMMIT`,
a JSON manifest with the sha256 and size of every other file. A checkpoint without COMMIT, or whose
files do not match it, is not a checkpoint: `load_latest` warns and falls back to the previous one.
Nothing here knows about Ray; the coordinator hands in bytes and gets bytes back.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

log = logging.getLogger(__name__)

COMMIT = "COMMIT"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    step: int
    uri: str
    meta: dict
    files: dict[str, bytes]

    def tensor_file(self, name: str) -> Any:
        return torch.load(io.BytesIO(self.files[name]), map_location="cpu", weights_only=True)


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class CheckpointStore:
    def __init__(self, uri: str, keep: int = 3, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.keep = keep
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))

    def _dir(self, step: int) -> str:
        return f"{self.root}/{PREFIX}{step:08d}"

    def public_uri(self, step: int) -> str:
        return f"{self.uri}/{PREFIX}{step:08d}"

    def write(self, step: int, meta: dict, files: dict[str, bytes]) -> str:
        """Write data files, then the COMMIT manifest; returns the checkpoint's URI."""
        d = self._dir(step)
        if self.fs.exists(d):
            self.fs.rm(d, recursive=True)
        self.fs.makedirs(d, exist_ok=True)
        all_files = dict(files)
        all_files["meta.json"] = json.dumps(meta, indent=1, sort_keys=True, default=str).encode()
        manifest = {"step": step, "created": time.time(), "files": {}}
        for name, data in all_files.items():
            with self.fs.open(f"{d}/{name}", "wb") as f:
                f.write(data)
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        with self.fs.open(f"{d}/{COMMIT}", "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
        self._prune()
        return self.public_uri(step)

    def steps(self) -> list[int]:
        if not self.fs.exists(self.root):
            return []
        out = []
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
                out.append(int(name[len(PREFIX):]))
        return sorted(out)

    def read(self, step: int) -> Checkpoint:
        d = self._dir(step)
        try:
            with self.fs.open(f"{d}/{COMMIT}", "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            raise CheckpointError(f"{self.public_uri(step)}: no {COMMIT} marker (written partially)") from None
        except json.JSONDecodeError:
            raise CheckpointError(f"{self.public_uri(step)}/{COMMIT}: manifest is not valid JSON") from None
        files: dict[str, bytes] = {}
        for name, info in manifest["files"].items():
            try:
                with self.fs.open(f"{d}/{name}", "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise CheckpointError(f"{self.public_uri(step)}/{name}: missing") from None
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise CheckpointError(
                    f"{self.public_uri(step)}/{name}: checksum mismatch ({len(data)} bytes, "
                    f"manifest says {info['bytes']}): truncated or corrupt"
                )
            files[name] = data
        meta = json.loads(files.pop("meta.json"))
        return Checkpoint(step=step, uri=self.public_uri(step), meta=meta, files=files)

    def load_latest(self) -> Checkpoint | None:
        """The newest valid checkpoint; invalid newer ones are reported and skipped."""
        for step in reversed(self.steps()):
            try:
                return self.read(step)
            except CheckpointError as e:
                log.warning("skipping checkpoint: %s; using the previous one", e)
        return None

    def _prune(self) -> None:
        steps = self.steps()
        valid = [s for s in steps if self.fs.exists(f"{self._dir(s)}/{COMMIT}")]
        keep = set(valid[-self.keep:])
        newest_valid = valid[-1] if valid else -1
        for s in steps:
            # drop old valid checkpoints beyond `keep`, and partial ones older than the newest valid
            if s not in keep and (s in valid or s < newest_valid):
                self.fs.rm(self._dir(s), recursive=True)
