"""Prometheus metrics through `ray.util.metrics`, shown in the Ray dashboard's metrics view.

Ray exports them on each node's metrics port with the `ray_` prefix (e.g. `ray_raydistro_loss`);
clusters/grafana/raydistro.json charts them.
"""
from __future__ import annotations

from ray.util import metrics


class WorkerMetrics:
    def __init__(self, run: str, worker_id: str, accelerator: str):
        tags = {"run": run, "worker": worker_id, "accelerator": accelerator}
        keys = tuple(tags)
        self.tokens_per_s = metrics.Gauge("raydistro_tokens_per_s", "tokens/s computed by a worker", keys)
        self.step_seconds = metrics.Gauge("raydistro_step_seconds", "wall seconds of a worker's step", keys)
        self.bytes_sent = metrics.Counter("raydistro_bytes_sent", "bytes handed to the collective", keys)
        self.bytes_received = metrics.Counter("raydistro_bytes_received", "bytes received from peers", keys)
        self.codec_ms = metrics.Gauge("raydistro_codec_ms", "encode+decode ms per step", keys)
        for m in (self.tokens_per_s, self.step_seconds, self.bytes_sent, self.bytes_received, self.codec_ms):
            m.set_default_tags(tags)

    def record_step(self, report: dict) -> None:
        self.tokens_per_s.set(report["tokens"] / max(1e-9, report["compute_s"]))
        self.step_seconds.set(report.get("step_s", 0.0))
        for counter, key in ((self.bytes_sent, "bytes_sent"), (self.bytes_received, "bytes_received")):
            if report.get(key, 0) > 0:  # ray's Counter rejects increments of 0
                counter.inc(float(report[key]))
        self.codec_ms.set(report.get("codec_ms", 0.0))


class RunMetrics:
    def __init__(self, run: str):
        tags = {"run": run}
        keys = ("run",)
        self.loss = metrics.Gauge("raydistro_loss", "training loss (token-weighted mean over workers)", keys)
        self.val_loss = metrics.Gauge("raydistro_val_loss", "held-out loss", keys)
        self.world_size = metrics.Gauge("raydistro_world_size", "workers in the current generation", keys)
        self.generation = metrics.Gauge("raydistro_generation", "membership generation", keys)
        self.step = metrics.Gauge("raydistro_step", "committed steps", keys)
        self.tokens_per_s = metrics.Gauge("raydistro_run_tokens_per_s", "tokens/s of the whole group", keys)
        self.compression_ratio = metrics.Gauge(
            "raydistro_compression_ratio", "dense bf16 bytes / bytes sent per worker per step, over the run", keys)
        self.data_lag_s = metrics.Gauge(
            "raydistro_data_lag_s", "seconds the slowest worker waited on data reads", keys)
        self.membership_changes = metrics.Counter(
            "raydistro_membership_changes", "membership changes (deaths, joins, drains)", keys)
        for m in (self.loss, self.val_loss, self.world_size, self.generation, self.step, self.tokens_per_s,
                  self.compression_ratio, self.data_lag_s, self.membership_changes):
            m.set_default_tags(tags)
