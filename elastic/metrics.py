"""Prometheus metrics through `ray.util.metrics`, shown in the Ray dashboard's metrics view.

Ray exports them on each node's metrics port with the `ray_` prefix (e.g. `ray_raydistro_loss`);
clusters/grafana/raydistro.json charts them. Run metrics carry the tag `run`; worker metrics `run`, `worker`
and `accelerator`. Gauges are re-reported every REFRESH_S seconds (see `Gauge`).
"""
from __future__ import annotations

import threading
import weakref

from ray.util import metrics

# Ray exports metrics every RAY_metrics_report_interval_ms (10 s by default), and newer Ray drops a gauge series
# that was not set since the previous export: a value set only when it changes (world size, generation) would
# vanish from Prometheus. Every gauge here re-reports its last value(s) this often, below that interval.
REFRESH_S = 4.0


class Gauge(metrics.Gauge):
    """`ray.util.metrics.Gauge` that keeps its last value per tag set and re-reports it every REFRESH_S."""

    def __init__(self, name: str, description: str = "", tag_keys: tuple = ()):
        super().__init__(name, description, tag_keys)
        self._last: dict = {}
        self._last_lock = threading.Lock()
        _Refresher.add(self)

    def set(self, value, tags: dict | None = None) -> None:
        super().set(value, tags)
        with self._last_lock:
            self._last[tuple(sorted((tags or {}).items()))] = (value, tags)

    def refresh(self) -> None:
        with self._last_lock:
            last = list(self._last.values())
        for value, tags in last:
            super().set(value, tags)


class _Refresher:
    """One daemon thread per process re-reporting every live Gauge."""

    gauges: "weakref.WeakSet[Gauge]" = weakref.WeakSet()
    thread: threading.Thread | None = None
    lock = threading.Lock()

    @classmethod
    def add(cls, gauge: Gauge) -> None:
        with cls.lock:
            cls.gauges.add(gauge)
            if cls.thread is None:
                cls.thread = threading.Thread(target=cls._run, name="raydistro-metrics-refresh", daemon=True)
                cls.thread.start()

    @classmethod
    def _run(cls) -> None:
        stop = threading.Event()
        while not stop.wait(REFRESH_S):
            for gauge in list(cls.gauges):
                try:
                    gauge.refresh()
                except Exception:  # metrics are for people watching: never raise here
                    pass


class WorkerMetrics:
    def __init__(self, run: str, worker_id: str, accelerator: str):
        tags = {"run": run, "worker": worker_id, "accelerator": accelerator}
        keys = tuple(tags)
        self.tokens_per_s = Gauge("raydistro_tokens_per_s", "tokens/s computed by a worker", keys)
        self.step_seconds = Gauge("raydistro_step_seconds", "wall seconds of a worker's step", keys)
        self.bytes_sent = metrics.Counter("raydistro_bytes_sent", "bytes handed to the collective", keys)
        self.bytes_received = metrics.Counter("raydistro_bytes_received", "bytes received from peers", keys)
        self.codec_ms = Gauge("raydistro_codec_ms", "encode+decode ms per step", keys)
        for m in (self.tokens_per_s, self.step_seconds, self.bytes_sent, self.bytes_received, self.codec_ms):
            m.set_default_tags(tags)

    def record_step(self, report) -> None:
        """`report`: an ok elastic.messages.StepReport."""
        self.tokens_per_s.set(report.tokens_per_s())
        self.step_seconds.set(report.step_s)
        for counter, n in ((self.bytes_sent, report.bytes_sent), (self.bytes_received, report.bytes_received)):
            if n > 0:  # ray's Counter rejects increments of 0
                counter.inc(float(n))
        self.codec_ms.set(report.codec_ms)


class RunMetrics:
    def __init__(self, run: str):
        tags = {"run": run}
        keys = ("run",)
        self.loss = Gauge("raydistro_loss", "training loss (token-weighted mean over workers)", keys)
        self.val_loss = Gauge("raydistro_val_loss", "held-out loss", keys)
        self.world_size = Gauge("raydistro_world_size", "workers in the current generation", keys)
        self.generation = Gauge("raydistro_generation", "membership generation", keys)
        self.step = Gauge("raydistro_step", "committed steps", keys)
        self.tokens_per_s = Gauge("raydistro_run_tokens_per_s", "tokens/s of the whole group", keys)
        self.compression_ratio = Gauge(
            "raydistro_compression_ratio", "dense bf16 bytes / bytes sent per worker per step, over the run", keys)
        self.data_lag_s = Gauge(
            "raydistro_data_lag_s", "seconds the slowest worker waited on data reads", keys)
        self.membership_changes = metrics.Counter(
            "raydistro_membership_changes", "membership changes (deaths, joins, drains)", keys)
        for m in (self.loss, self.val_loss, self.world_size, self.generation, self.step, self.tokens_per_s,
                  self.compression_ratio, self.data_lag_s, self.membership_changes):
            m.set_default_tags(tags)
