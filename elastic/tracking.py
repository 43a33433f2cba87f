"""Experiment tracking while a run trains: metrics.jsonl, TensorBoard, W&B, MLflow, summary.json.

Driven by the coordinator: `on_commit(coordinator, step, loss, tokens, reports, wall)` once per committed step,
`on_finish(coordinator)` once at the end. Writes under `runs/<run.name>/`:

- `metrics.jsonl`: one JSON row per committed step, appended and flushed at once (a resumed run appends; a
  step retried after every replica was lost appears again, as it was trained again): step, t, loss, tokens,
  tokens_per_s, wall_s, bytes_sent / bytes_received (mean per worker this step), dense_equivalent_bytes,
  compression_ratio (dense / sent this step), world_size, generation, accelerators, val_loss (when the held-out
  set was scored since the last row), and the membership changes and events recorded since the last row
  (`membership`, `events`). The last row of a run has `"final": true` with the end state.
- `tensorboard/`: a TensorBoard event file (`EventFile`: tensorboardX's protos, which ray[train] brings, written
  synchronously) with the same scalars (train/*, cluster/*, val/loss) and the membership changes as text; on
  disk at every step.
- W&B when `tracking.wandb.project` is set and `wandb` is installed (`tracking.wandb.mode=offline` writes
  under runs/<name>/wandb without an account); MLflow when `tracking.mlflow.uri` is set and `mlflow` is
  installed (`file:///abs/path` or a server URL). Installed but unusable (no login, server down): a warning,
  the run goes on.
- `summary.json` rewritten every `tracking.summary_every` committed steps (state RUNNING), not only at the end.

Tracking never fails a step: an error in a sink is logged once and that sink is turned off.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from elastic.config import RunConfig, run_dir, to_dict
from elastic.messages import tokens_per_s

log = logging.getLogger("raydistro.tracking")


def _get(report: Any, key: str, default: Any = 0):
    """A field of a worker's step report (a dict or an elastic.messages.StepReport)."""
    if isinstance(report, dict):
        return report.get(key, default)
    return getattr(report, key, default)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class EventFile:
    """A TensorBoard event file written synchronously: every `flush()` leaves every event on disk (tensorboardX's
    SummaryWriter queues events to a thread and its flush() does not wait for that queue). Uses tensorboardX's
    protos and TFRecord framing (masked CRC32C), the format TensorBoard reads."""

    def __init__(self, logdir: Path):
        import socket

        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import RecordWriter

        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.raydistro"
        self._writer = RecordWriter(str(logdir / name))
        self._writer.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self._writer.flush()

    def _write(self, summary, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._writer.write(Event(wall_time=time.time(), step=int(step), summary=summary).SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        self._write(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        from tensorboardX.summary import text as text_summary

        self._write(text_summary(tag, text), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class RunTracker:
    """The sinks of one run (one per coordinator)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.t = cfg.tracking
        self.dir = run_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seen_changes = 0
        self._seen_events = 0
        self._seen_val = None
        self._rows = 0
        self._tb_flushed_at = 0.0  # the first row reaches the disk at once, later ones every tracking.flush_s
        self._jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1) if self.t.jsonl else None
        self._tb = self._open("tensorboard", self._open_tensorboard) if self.t.tensorboard else None
        self._wandb = self._open("wandb", self._open_wandb) if self.t.wandb.project else None
        self._mlflow = self._open("mlflow", self._open_mlflow) if self.t.mlflow.uri else None

    # ---- sinks -------------------------------------------------------------------------------
    def _open(self, name: str, opener):
        try:
            return opener()
        except ImportError as e:
            log.warning("tracking.%s is configured but %s is not installed (%s); pip install it to track there",
                        name, name if name != "tensorboard" else "tensorboardX", e)
        except Exception as e:
            log.warning("tracking.%s could not start (%s: %s); the run goes on without it", name,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None

    def _open_tensorboard(self):
        return EventFile(self.dir / "tensorboard")

    def _open_wandb(self):
        import wandb

        w = self.t.wandb
        kwargs = {"project": w.project, "name": self.cfg.run.name, "id": w.run_id or None,
                  "dir": str(self.dir), "config": to_dict(self.cfg, redact=True), "resume": "allow"}
        if w.entity:
            kwargs["entity"] = w.entity
        if w.mode:
            kwargs["mode"] = w.mode
        return wandb.init(**kwargs)

    def _open_mlflow(self):
        m = self.t.mlflow
        if m.uri.startswith("file:"):  # MLflow 3 keeps its file store only on request; the user asked for one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=m.uri)
        exp = client.get_experiment_by_name(m.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(m.experiment)
        run = client.create_run(exp_id, run_name=self.cfg.run.name, tags={"raydistro.run": self.cfg.run.name})
        params = [Param(k, str(v)[:250]) for k, v in _flat(to_dict(self.cfg, redact=True)).items()]
        for i in range(0, len(params), 90):  # the REST API takes at most 100 params per call
            client.log_batch(run.info.run_id, params=params[i:i + 90])
        return client, run.info.run_id

    def _each(self, name: str, fn) -> None:
        sink = getattr(self, f"_{name}")
        if sink is None:
            return
        try:
            fn(sink)
        except Exception as e:
            log.warning("tracking.%s failed (%s: %s); turned off for the rest of the run", name, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            setattr(self, f"_{name}", None)

    # ---- per step ----------------------------------------------------------------------------
    def on_commit(self, coord, step: int, loss: float, tokens: int, reports: list, wall: float) -> dict:
        """Record committed step `step`; returns the metrics.jsonl row."""
        d = coord.summary.data
        n = max(1, len(reports))
        sent = sum(_get(r, "bytes_sent") for r in reports) / n
        received = sum(_get(r, "bytes_received") for r in reports) / n
        dense = max((_get(r, "dense_equivalent_bytes") for r in reports), default=0)
        gen = coord.generation
        row = {
            "step": step, "t": round(time.time(), 3), "loss": loss, "tokens": tokens,
            "tokens_per_s": tokens_per_s(tokens, wall), "wall_s": round(wall, 5),
            "bytes_sent": sent, "bytes_received": received, "dense_equivalent_bytes": dense,
            "compression_ratio": (dense / sent) if sent else None,
            "world_size": len(reports), "generation": gen.generation,
            "accelerators": [m.accelerator for m in gen.members],
            "codec_ms": max((_get(r, "codec_ms", 0.0) for r in reports), default=0.0),
        }
        if d.get("val_loss") is not None and d.get("val_loss") != self._seen_val:
            row["val_loss"] = self._seen_val = d["val_loss"]
        self._add_news(row, d)
        self._write(row)
        every = self.t.summary_every
        self._rows += 1
        if every and self._rows % every == 0:
            try:
                coord.summary.write(self.dir)
            except Exception as e:
                log.warning("rewriting summary.json failed: %s", e)
        return row

    def _add_news(self, row: dict, d: dict) -> None:
        """The membership changes and events of summary data `d` that no earlier row carried, into `row`."""
        changes = d.get("membership_changes", [])[self._seen_changes:]
        events = d.get("events", [])[self._seen_events:]
        self._seen_changes += len(changes)
        self._seen_events += len(events)
        if changes:
            row["membership"] = changes
        if events:
            row["events"] = events

    def _write(self, row: dict) -> None:
        if self._jsonl is not None:
            try:
                self._jsonl.write(json.dumps(row, default=str) + "\n")
            except Exception as e:
                log.warning("metrics.jsonl write failed (%s); turned off", e)
                self._jsonl = None
        step = row["step"]
        scalars = {f"train/{k}": row[k] for k in ("loss", "tokens_per_s", "bytes_sent", "bytes_received",
                                                  "dense_equivalent_bytes", "compression_ratio", "codec_ms",
                                                  "wall_s", "tokens") if row.get(k) is not None}
        scalars.update({"cluster/world_size": row["world_size"], "cluster/generation": row["generation"]})
        if "val_loss" in row:
            scalars["val/loss"] = row["val_loss"]

        def tb(w):
            for k, v in scalars.items():
                w.add_scalar(k, v, step)
            for c in row.get("membership", []):
                w.add_text("membership", json.dumps(c), step)
            now = time.time()
            if now - self._tb_flushed_at >= self.t.flush_s or "membership" in row:
                w.flush()  # an fsync: not on every step of a fast run (the run's end closes the file)
                self._tb_flushed_at = now

        self._each("tb", tb)
        self._each("wandb", lambda run: run.log(scalars, step=step))

        def ml(sink):
            from mlflow.entities import Metric

            client, run_id = sink
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k.replace("/", "."), float(v), ts, step)
                                              for k, v in scalars.items()])

        self._each("mlflow", ml)

    # ---- end ---------------------------------------------------------------------------------
    def on_finish(self, coord) -> None:
        """The run ended (finished, stopped or errored): a final row, and every sink closed."""
        d = coord.summary.data
        row = {"step": max(0, coord.step - 1), "t": round(time.time(), 3), "final": True,
               "state": d.get("state"), "steps": coord.step, "final_loss": d.get("final_loss"),
               "val_loss": d.get("val_loss"), "error": d.get("error")}
        self._add_news(row, d)
        if self._jsonl is not None:
            try:
                self._jsonl.write(json.dumps(row, default=str) + "\n")
                self._jsonl.close()
            except Exception:
                pass
            self._jsonl = None
        if d.get("val_loss") is not None:
            self._each("tb", lambda w: w.add_scalar("val/loss", d["val_loss"], row["step"]))
            self._each("wandb", lambda run: run.summary.update({"val_loss": d["val_loss"]}))
        self._each("tb", lambda w: w.close())
        self._each("wandb", lambda run: run.finish(exit_code=0 if d.get("state") in ("FINISHED", "STOPPED") else 1))

        def ml(sink):
            client, run_id = sink
            if d.get("val_loss") is not None:
                client.log_metric(run_id, "val.loss", float(d["val_loss"]), step=row["step"])
            client.set_terminated(run_id, "FINISHED" if d.get("state") in ("FINISHED", "STOPPED") else "FAILED")

        self._each("mlflow", ml)
        self._tb = self._wandb = self._mlflow = None


def on_commit(coord, step: int, loss: float, tokens: int, reports: list, wall: float) -> None:
    """The coordinator's one call per committed step (creates the run's tracker on first use)."""
    try:
        tracker = coord.__dict__.get("_tracker")
        if tracker is None:
            tracker = coord._tracker = RunTracker(coord.cfg)
        tracker.on_commit(coord, step, loss, tokens, reports, wall)
    except Exception:  # tracking is for people watching: it never fails a step
        log.exception("tracking step %d failed", step)


def on_finish(coord) -> None:
    """The coordinator's call when the run ends (after summary.json is written)."""
    tracker = coord.__dict__.get("_tracker")
    if tracker is None:
        return
    try:
        tracker.on_finish(coord)
    except Exception:
        log.exception("closing the trackers failed")
