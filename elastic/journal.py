"""The coordinator's journal: what a new coordinator needs to adopt a live group without losing a step.

The live state of a run sits in two places: the parameters and sync state in the workers (every replica),
and the control state (data-plan cursor, step, generation, members, chaos, the record) in the coordinator.
The workers are detached actors that outlive the coordinator and the driver; the control state is written
here after every commit decision, *before* the decision is sent (it rides on the next step's call), to a
key-value store that outlives the coordinator's process: Ray's GCS (`RayKV`). A coordinator restarted by Ray,
or started by a driver run again, reads the journal, asks the live workers where they are, finishes or drops
the one step that may be in flight, and goes on. Nothing committed is lost: a worker applies step s only after
the journal says s is committed.

With the head node, the GCS goes too (unless GCS fault tolerance keeps it in Redis): then the run resumes
from the latest checkpoint in storage (docs/elastic.md, "What survives what").

Cost per step: one put of a small record (the plan's state, the step, the summary's last row); the summary's
per-step rows are kept in blocks of `ROWS_PER_BLOCK`, so a put never grows with the run's length.
"""
from __future__ import annotations

import pickle
import zlib
from typing import Any, Protocol

ROWS_PER_BLOCK = 64
FORMAT = 1


class KV(Protocol):
    def put(self, key: str, value: bytes) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def delete_prefix(self, prefix: str) -> None: ...


class DictKV:
    """In-memory store (tests; a run with no Ray)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = bytes(value)

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def delete_prefix(self, prefix: str) -> None:
        for k in [k for k in self.data if k.startswith(prefix)]:
            del self.data[k]


class RayKV:
    """Ray's GCS key-value store (survives any actor; goes with the head unless GCS fault tolerance is on)."""

    NAMESPACE = "raydistro"

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=self.NAMESPACE)

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key, namespace=self.NAMESPACE)

    def delete_prefix(self, prefix: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(prefix, del_by_prefix=True, namespace=self.NAMESPACE)


def _pack(obj: Any) -> bytes:
    return zlib.compress(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), 1)


def _unpack(data: bytes) -> Any:
    return pickle.loads(zlib.decompress(data))


class Journal:
    """`record(head, row)` after every commit decision; `load()` in a new coordinator."""

    def __init__(self, kv: KV, namespace: str, run_name: str):
        self.kv = kv
        self.prefix = f"journal/{namespace}/{run_name}/"
        self._rows: list = []     # rows of the block being filled (also inside every head)
        self._blocks = 0          # full blocks written

    # ---- writing ----------------------------------------------------------------------------------------
    def start(self, shards: Any, rows: list | None = None) -> None:
        """A fresh run (or an adopted one, with the rows it had): the shard lists once, so an adopting
        coordinator never has to list the source again (the plan's state is only valid for the same shards)."""
        if rows is None:
            self.kv.delete_prefix(self.prefix)
        self.kv.put(self.prefix + "shards", _pack(shards))
        self._rows, self._blocks = [], 0
        for row in rows or []:
            self._add_row(row)

    def _add_row(self, row: Any) -> None:
        self._rows.append(row)
        if len(self._rows) == ROWS_PER_BLOCK:
            self.kv.put(f"{self.prefix}rows/{self._blocks:08d}", _pack(self._rows))
            self._blocks += 1
            self._rows = []

    def record(self, head: dict, row: Any = None) -> None:
        """Durably record the control state `head` (and one more row of the record). Must return before
        the decision it contains reaches any worker."""
        if row is not None:
            self._add_row(row)
        self.kv.put(self.prefix + "head", _pack({"format": FORMAT, "head": head, "tail": self._rows,
                                                 "blocks": self._blocks}))

    def finish(self) -> None:
        """The run ended (finished, stopped or errored with a checkpoint): nothing to adopt any more."""
        self.kv.delete_prefix(self.prefix)

    # ---- reading -----------------------------------------------------------------------------------------
    def load(self) -> tuple[dict, list, Any] | None:
        """(head, all rows in order, shards) of a run that has not ended, or None."""
        raw = self.kv.get(self.prefix + "head")
        if raw is None:
            return None
        rec = _unpack(raw)
        if rec.get("format") != FORMAT:
            return None
        rows: list = []
        for b in range(rec["blocks"]):
            block = self.kv.get(f"{self.prefix}rows/{b:08d}")
            if block is None:
                raise RuntimeError(f"journal {self.prefix}: row block {b} is missing")
            rows.extend(_unpack(block))
        rows.extend(rec["tail"])
        shards_raw = self.kv.get(self.prefix + "shards")
        return rec["head"], rows, (_unpack(shards_raw) if shards_raw is not None else None)
