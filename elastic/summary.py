"""The run's record: what `summary.json` says, accumulated step by step and saved in checkpoints.

Every figure in it is computed from what workers reported (bytes handed to the collective, tokens
counted from real targets, fingerprints of real parameters), never from configuration.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from elastic.config import RunConfig


# summary.json `step_timing`, one row per committed step: the step, unix time of the commit, the coordinator's
# wall s (dispatch -> all reports), then the slowest worker's read s, compute s (commit+read+fwd/bwd), codec ms,
# comm ms, step s (all of the worker's step), commit s (apply the previous step), fwd/bwd s (launch to the
# loss read), ahead s (of the step, what ran before its call arrived: train.compute_ahead)
WORKER_TIMING = ("read_s", "compute_s", "codec_ms", "comm_ms", "step_s", "commit_s", "fwd_bwd_s", "ahead_s")
STEP_TIMING_COLS = ("step", "t", "wall_s") + WORKER_TIMING
# per-step lists: journaled a row at a time, not rewritten whole every step
JOURNAL_ROW_KEYS = ("loss_history", "step_timing")


class RunSummary:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.data: dict = {
            "run_name": cfg.run.name,
            "sync": cfg.sync.name,
            "model": {"n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd, "n_head": cfg.model.n_head,
                      **({"hf": cfg.model.hf} if cfg.model.hf else {})},  # model.hf: the shape is config.json's
            "steps": 0,
            "tokens": 0,
            "initial_loss": None,
            "final_loss": None,
            "val_loss": None,
            "val_tokens": 0,
            "val_history": [],           # {step, val_loss, val_tokens}: every train.eval_every steps and at the end
            "world_size_history": [],
            "bytes_sent_per_worker_total": {},
            "bytes_received_per_worker_total": {},
            "bytes_sent_per_step_mean": 0.0,
            # bytes per step by level, per node (mean over nodes and steps): what a node sends off the node
            # (the compressed payloads) and what its workers send each other inside it (sync.hierarchy=node:
            # the dense all-reduce and the decoded shards; flat: 0 on multi-node groups, where every payload
            # crosses, and everything on a single node). `bytes_per_level` holds the running sums behind them.
            "hierarchy": cfg.sync.hierarchy,
            "cross_node_bytes_per_step": 0.0,
            "in_node_bytes_per_step": 0.0,
            "bytes_per_level": {"steps": 0, "cross_node": 0.0, "in_node": 0.0},
            "dense_equivalent_bytes": 0,
            "dense_equivalent_bytes_per_step": 0,
            "compression_ratio": None,
            "codec_ms_median": None,
            "membership_changes": [],
            "checkpoints": [],
            "replica_hashes_agree": True,
            "replica_disagreements": [],
            "rejected_steps": [],
            "rebalanced_steps": 0,       # steps the coordinator re-split by token counts (train.balance_rows)
            "split_steps": 0,            # of those, steps cut between ranks at token level (train.split_docs)
            "computed_ahead_steps": 0,   # steps every rank started before its call (train.compute_ahead)
            # target slots of the committed steps' documents (tokens + 1 each): `tokens` (the slots trained)
            # equals it once no carried tail is pending (train.carry_tail), e.g. at the end of a run
            "document_slots": 0,
            "rows": 0,                   # packed rows trained: tokens / (rows x seq_len) is the packing
            "profiles": {},              # per worker: where its step time went (train.profile_at)
            "events": [],
            "loss_history": [],
            "step_timing": [],
            "resumed_from": [],
            "resumed_from_step": None,   # where the latest new coordinator or driver took over (or resumed)
            "data": {},
            "wall_s": 0.0,
            "state": "RUNNING",
            "error": None,
        }
        self._codec_ms: list[float] = []
        self._sent_per_step: list[float] = []
        self._sent_sum = 0.0
        self._last_row: list | None = None

    # ---- recording --------------------------------------------------------------------------
    def started(self, step: int) -> None:
        self.data["events"].append({"step": step, "what": "started", "t": time.time()})

    def step(self, step: int, loss: float, tokens: int, reports: list, agree: bool, wall: float,
             nodes: dict[str, str] | None = None) -> None:
        """`reports`: the step's ok elastic.messages.StepReport of every rank; `nodes`: worker id -> Ray node id
        (for the bytes per level)."""
        d = self.data
        if d["initial_loss"] is None:
            d["initial_loss"] = loss
        d["final_loss"] = loss
        d["steps"] = step + 1
        d["tokens"] += tokens
        d["document_slots"] += sum(r.doc_slots for r in reports)
        d["rows"] += sum(r.rows for r in reports)
        d["loss_history"].append([step, round(loss, 5), d["tokens"]])
        d.setdefault("step_timing", []).append(  # STEP_TIMING_COLS
            [step, round(time.time(), 4), round(wall, 5)]
            + [round(max((getattr(r, k) for r in reports), default=0.0), 5) for k in WORKER_TIMING])
        d["replica_hashes_agree"] = d["replica_hashes_agree"] and agree
        for r in reports:
            w = r.worker_id
            d["bytes_sent_per_worker_total"][w] = d["bytes_sent_per_worker_total"].get(w, 0) + r.bytes_sent
            d["bytes_received_per_worker_total"][w] = d["bytes_received_per_worker_total"].get(w, 0) + r.bytes_received
            self._codec_ms.append(r.codec_ms)
        self._last_row = [d["loss_history"][-1], d["step_timing"][-1], [r.codec_ms for r in reports], None]
        if reports:
            dense = reports[0].dense_equivalent_bytes
            sent = statistics.mean(r.bytes_sent for r in reports)
            d["dense_equivalent_bytes_per_step"] = dense
            d["dense_equivalent_bytes"] += dense
            self._sent_per_step.append(sent)
            self._sent_sum += sent
            self._last_row[3] = sent
            if nodes is not None:
                self._bytes_per_level(reports, nodes)

    def _bytes_per_level(self, reports: list, nodes: dict[str, str]) -> None:
        """Add one step's bytes to the per-node means (see `cross_node_bytes_per_step`): a report's `bytes_sent`
        leaves its node when the group spans nodes (flat: every payload; hierarchy=node: the shard payloads),
        `local_bytes_sent` stays inside it."""
        d = self.data
        per_node: dict[str, list[float]] = {}
        for r in reports:
            acc = per_node.setdefault(nodes.get(r.worker_id, ""), [0.0, 0.0])
            acc[0] += r.bytes_sent
            acc[1] += getattr(r, "local_bytes_sent", 0)
        spans = len(per_node) > 1
        cross = statistics.mean(a[0] for a in per_node.values()) if spans else 0.0
        inside = statistics.mean(a[1] + (0.0 if spans else a[0]) for a in per_node.values())
        lv = d.setdefault("bytes_per_level", {"steps": 0, "cross_node": 0.0, "in_node": 0.0})
        lv["steps"] += 1
        lv["cross_node"] += cross
        lv["in_node"] += inside
        d["cross_node_bytes_per_step"] = lv["cross_node"] / lv["steps"]
        d["in_node_bytes_per_step"] = lv["in_node"] / lv["steps"]

    def sent_per_step_mean(self) -> float:
        """Mean bytes sent per worker per step so far (diloco sends only at outer steps)."""
        return self._sent_sum / len(self._sent_per_step) if self._sent_per_step else 0.0

    def world_size(self, step: int, world: int, generation: int, accelerators: list[str]) -> None:
        self.data["world_size_history"].append(
            {"step": step, "world_size": world, "generation": generation, "accelerators": accelerators})

    def membership_change(self, step: int, kind: str, seconds: float, world: int,
                          from_capacity: float | None = None, detection_s: float | None = None) -> None:
        """`seconds`: from the fault (the last sign of life of who left; a joiner ready) to the next committed
        step; `detection_s`: of that, how long it took to notice."""
        change = {"step": step, "kind": kind, "seconds_to_resume": round(seconds, 3), "world_size": world}
        if from_capacity is not None:
            change["seconds_from_capacity"] = round(from_capacity, 3)
        if detection_s is not None:
            change["detection_s"] = round(detection_s, 3)
        self.data["membership_changes"].append(change)

    def checkpoint(self, uri: str, step: int, reason: str, seconds: float) -> None:
        self.data["checkpoints"].append(uri)
        self.event(step, f"checkpoint {reason} {seconds:.2f}s")

    def replicas_disagree(self, step: int, when: str, prints: list[str]) -> None:
        self.data["replica_hashes_agree"] = False
        self.data["replica_disagreements"].append({"step": step, "when": when, "fingerprints": prints})

    def rejected_step(self, step: int, errors: dict) -> None:
        self.data["rejected_steps"].append({"step": step, "errors": errors})

    def event(self, step: int, what: str) -> None:
        self.data["events"].append({"step": step, "what": what, "t": round(time.time(), 3)})

    def val(self, step: int, loss: float, tokens: int) -> None:
        self.data["val_loss"] = loss
        self.data["val_tokens"] = tokens
        self.data["val_history"].append({"step": step, "val_loss": loss, "val_tokens": tokens})

    def resumed_from(self, uri: str, step: int) -> None:
        self.data["resumed_from"].append({"uri": uri, "step": step})
        self.data["resumed_from_step"] = step

    def took_over(self, step: int, who: str) -> None:
        """A new coordinator (restarted, or started by a new driver) adopted the live group at `step`."""
        self.data["resumed_from"].append({"live_group": who, "step": step, "t": time.time()})
        self.data["resumed_from_step"] = step
        self.event(step, f"took-over {who}")

    def error(self, message: str) -> None:
        self.data["error"] = message

    def finish(self, step: int, accounting: dict, wall: float, state: str) -> None:
        d = self.data
        d["steps"] = step
        d["data"] = accounting
        d["wall_s"] = round(d.get("wall_s", 0.0) + wall, 3)
        d["state"] = state
        if self._sent_per_step:
            d["bytes_sent_per_step_mean"] = statistics.mean(self._sent_per_step)
            if d["bytes_sent_per_step_mean"] > 0:
                d["compression_ratio"] = d["dense_equivalent_bytes_per_step"] / d["bytes_sent_per_step_mean"]
        if self._codec_ms:
            d["codec_ms_median"] = statistics.median(self._codec_ms)

    # ---- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"data": self.data, "codec_ms": self._codec_ms[-1000:], "sent": self._sent_per_step[-1000:]}

    # ---- the coordinator's journal (elastic/journal.py): a small state plus one row per committed step ---
    def journal_state(self) -> dict:
        return {"data": {k: v for k, v in self.data.items() if k not in JOURNAL_ROW_KEYS}}

    def journal_row(self) -> list | None:
        """The last committed step's row, once (None if no step committed since the last call)."""
        row, self._last_row = self._last_row, None
        return row

    def journal_rows(self) -> list:
        """Rows of the steps recorded so far (e.g. restored from a checkpoint), to seed a journal with."""
        d = self.data
        return [[lh, st, [], None] for lh, st in zip(d["loss_history"], d["step_timing"])]

    def load_journal(self, state: dict, rows: list) -> None:
        self.data.update(state.get("data", {}))
        self.data["loss_history"] = [r[0] for r in rows]
        self.data["step_timing"] = [r[1] for r in rows]
        self._codec_ms = [c for r in rows[-1000:] for c in r[2]]
        self._sent_per_step = [r[3] for r in rows if r[3] is not None]
        self._sent_sum = sum(self._sent_per_step)

    def load_state_dict(self, sd: dict) -> None:
        if not sd:
            return
        keep_name = self.data["run_name"]
        self.data.update(sd.get("data", {}))
        self.data["run_name"] = keep_name
        self.data["error"] = None
        self._codec_ms = list(sd.get("codec_ms", []))
        self._sent_per_step = list(sd.get("sent", []))
        self._sent_sum = sum(self._sent_per_step)

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, path)
        return path
