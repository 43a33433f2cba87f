"""The driver of a run: it connects to (or starts) Ray, starts the coordinator actor (or attaches to the live
one of a run of the same name), shows progress, and turns SIGTERM/SIGINT (`ray job stop`, Ctrl-C) into
"checkpoint, then exit" so a resubmitted run resumes where it stopped.

Deliberately thin: the run itself lives in the coordinator. `preflight` fails fast on unusable data before
any Ray process starts.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time

from elastic.config import ConfigError, run_dir, to_yaml

log = logging.getLogger("raydistro")


class RunAlreadyLive(RuntimeError):
    """Another driver runs a run of this name on the cluster."""


def preflight(cfg) -> dict:
    """Fail fast, before any Ray process starts, on data the run could not use (footers only).
    Returns the shard lists by key, so the coordinator does not read every footer a second time."""
    from datasets import discover_usable

    d = cfg.data
    return {key: discover_usable(url, d) for key, url in (("data.source", d.source), ("data.val_source", d.val_source))
            if url}


class RayRuntime:
    """Connects to RAY_ADDRESS / cluster.address, or starts Ray here (optionally simulating nodes)."""

    def __init__(self, cfg, log_to_driver: bool = True):
        self.cfg = cfg
        self.log_to_driver = log_to_driver  # off when stdout carries JSON: Ray prints node deaths there
        self.cluster = None
        self.sim_nodes: list = []
        self.started_here = False

    def __enter__(self):
        import ray

        c = self.cfg.cluster
        address = c.address or os.environ.get("RAY_ADDRESS", "")
        self.reused = False
        if ray.is_initialized():
            if c.address or c.simulate:
                raise ConfigError("this process is already connected to Ray: call ray.shutdown() first, or drop "
                                  "cluster.address/cluster.simulate to train on the connected cluster")
            self.reused = True  # e.g. a notebook that called ray.init(): train there, leave it connected
            return self
        if c.simulate or not address:  # a Ray started here: its nodes get Ray's settings for slow links (a
            for k, v in c.ray_node_env.items():  # value already in the environment wins)
                os.environ.setdefault(k, str(v))
        # the repo root must be importable by workers on every node (ray job submit sets it via working_dir)
        if c.simulate:
            from ray.cluster_utils import Cluster

            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            for acc in c.simulate:
                self.add_sim_node(acc)
            ray.init(address=self.cluster.address, namespace=c.namespace, log_to_driver=self.log_to_driver)
            self.started_here = True
        elif address:
            ray.init(address=address, namespace=c.namespace, log_to_driver=self.log_to_driver)
        else:
            ncpu = c.num_cpus if c.num_cpus is not None else max(os.cpu_count() or 2, self.cfg.train.workers)
            ray.init(num_cpus=ncpu, namespace=c.namespace, include_dashboard=False, log_to_driver=self.log_to_driver)
            self.started_here = True
        return self

    def add_sim_node(self, acc: str):
        node = self.cluster.add_node(num_cpus=self.cfg.cluster.simulate_node_cpus, num_gpus=1,
                                     resources={f"accelerator_type:{acc}": 1})
        self.sim_nodes.append(node)
        return node

    def remove_sim_node(self, index: int = -1):
        if self.sim_nodes:
            node = self.sim_nodes.pop(index)
            self.cluster.remove_node(node, allow_graceful=False)

    def __exit__(self, *exc):
        import ray

        if self.reused:
            return
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()


class NodeChaos:
    """remove_node_at / add_node_at act on nodes this driver simulates (it owns the Cluster).

    Polled from the driver's main loop: Ray starts node processes with signal handlers, which only
    the main thread may install."""

    def __init__(self, runtime: RayRuntime, cfg):
        self.runtime = runtime
        self.cfg = cfg
        # at the same step a removal goes first, so "remove then add" rehearses a replaced spot node
        self.todo = sorted([(s, 0, "remove") for s in cfg.chaos.remove_node_at] +
                           [(s, 1, "add") for s in cfg.chaos.add_node_at])

    def poll(self, step: int, member_nodes: list | None = None) -> None:
        while self.todo and step >= self.todo[0][0]:
            _, _, kind = self.todo.pop(0)
            if kind == "remove" and self.runtime.sim_nodes:
                # the newest simulated node that runs a member of the group: losing capacity in use is
                # the rehearsal; an idle node (e.g. one already drained) would test nothing
                busy = set(member_nodes or [])
                index = max((i for i, n in enumerate(self.runtime.sim_nodes) if n.node_id in busy), default=-1)
                log.warning("chaos: removing a simulated node at step %d", step)
                self.runtime.remove_sim_node(index)
            elif kind == "add":
                sim = self.cfg.cluster.simulate
                acc = sim[len(self.runtime.sim_nodes) % len(sim)]
                log.warning("chaos: adding a simulated %s node at step %d", acc, step)
                self.runtime.add_sim_node(acc)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_ansi(record: logging.LogRecord) -> bool:
    """Ray's own INFO lines carry colorama codes (the dashboard URL in bold green)."""
    msg = record.getMessage()
    if "\x1b[" in msg:
        record.msg, record.args = _ANSI.sub("", msg), ()
    return True


def _live_coordinator(name: str, ns: str, wait_s: float = 30.0):
    """(handle, progress) of a live coordinator of this name, or None once the name is free. A run whose result
    a driver already took is leaving: wait for its name to go. One that does not answer is restarting."""
    import ray

    deadline = time.time() + wait_s
    while True:
        try:
            coord = ray.get_actor(name, namespace=ns)
        except ValueError:
            return None
        try:
            info = ray.get(coord.progress.remote(), timeout=10)
            if not info.get("result_taken"):
                return coord, info
        except Exception as e:
            if time.time() > deadline:
                raise RunAlreadyLive(f"{name} (namespace {ns}) exists but does not answer ({type(e).__name__}); wait "
                                     "for it to restart or stop it, or pick another run.name") from e
        if time.time() > deadline:
            raise RunAlreadyLive(f"{name} (namespace {ns}) ended but does not leave; try again shortly")
        time.sleep(0.2)


def _start_or_attach(cfg, discovered: dict | None = None):
    """The run's coordinator: a new detached one, or the live one of a run of this name (a driver that died
    and was run again, a `ray job submit` again)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from elastic.coordinator import CoordinatorActor, coordinator_name

    name, ns = coordinator_name(cfg), cfg.cluster.namespace
    live = _live_coordinator(name, ns)
    if live is not None:
        coord, info = live
        log.warning("run %s is live (step %s/%s, %s): following it instead of starting a second one",
                    cfg.run.name, info.get("step"), info.get("total"), info.get("state"))
        coord.driver_attached.remote()
        return coord
    # the coordinator outlives its driver (detached; restarted by Ray if its process dies) and stays on the
    # head node, never on a worker node that a spot reclaim or scale-down can take away
    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})),
                ray.get_runtime_context().get_node_id())
    try:  # the GCS registers the name synchronously: a name taken meanwhile raises here
        coord = CoordinatorActor.options(
            name=name, namespace=ns, lifetime="detached", max_restarts=cfg.train.coordinator_restarts,
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
        ).remote(cfg)
    except ValueError as e:
        if "already taken" in str(e):
            return _start_or_attach(cfg, discovered)
        raise
    coord.start.remote(discovered)
    return coord


TERMINAL = ("FINISHED", "STOPPED", "ERRORED")


def _follow(cfg, coord, view, node_chaos) -> tuple[dict | None, str]:
    """Show the run's progress until it ends; returns (its summary, "") or (None, why it failed). A coordinator
    that is restarting does not answer for a while: keep asking, as long as its name lives."""
    import ray

    from elastic.coordinator import coordinator_name

    silent_since = None
    while True:
        try:
            progress = ray.get(coord.progress.remote(), timeout=10)
            silent_since = None
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            silent_since = silent_since or time.time()
            try:
                ray.get_actor(coordinator_name(cfg), namespace=cfg.cluster.namespace)
            except ValueError:
                return None, f"the coordinator is gone ({type(e).__name__})"
            if time.time() - silent_since > 600:
                return None, "the coordinator did not answer for 600 s"
            time.sleep(0.5)
            continue
        view.update(progress)
        if "node_chaos_step" in progress:  # the coordinator holds that step for us
            node_chaos.poll(progress["node_chaos_step"], progress.get("member_nodes"))
            coord.node_chaos_done.remote(progress["node_chaos_step"])
        if progress.get("state") in TERMINAL:
            try:
                summary = ray.get(coord.result.remote(60), timeout=90)
            except Exception as e:
                cause = getattr(e, "cause", None) or e
                error = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                log.error("run failed: %s", error)
                return None, error
            return summary, ""
        time.sleep(0.25)


def train(cfg, progress_stream=None, discovered: dict | None = None) -> dict:
    """Run (or resume) a training run to completion; returns summary.json's content.

    `progress_stream`: where progress goes (stdout by default; benchmarks that print JSON pass stderr).
    `discovered`: shard lists `preflight` already read ({"data.source": [...], ...}), else the coordinator
    reads the footers itself."""
    plain = not (progress_stream or sys.stdout).isatty()
    if plain:  # job logs and the dashboard's log viewer: no color control codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    import ray  # noqa: F401 - first, so Ray's vendored colorama is importable below

    if plain:
        for logger in (logging.getLogger("ray"), logging.getLogger()):
            for handler in logger.handlers:
                handler.addFilter(_strip_ansi)
        import colorama  # vendored by Ray, importable after `import ray`

        # Ray colors "[repeated Nx across cluster]" whatever RAY_COLOR_PREFIX says: strip on write
        if not isinstance(sys.stdout, colorama.ansitowin32.StreamWrapper):
            colorama.init(strip=True)

    from elastic.progress import ProgressView

    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    with RayRuntime(cfg, log_to_driver=progress_stream is not sys.stderr) as runtime:
        coord = _start_or_attach(cfg, discovered)
        started_at = time.time()
        stopping = {"n": 0}

        def on_signal(signum, frame):
            stopping["n"] += 1
            if stopping["n"] == 1:
                log.warning("signal %d: asking the run to checkpoint and stop (again to abort)", signum)
                coord.stop.remote()
            else:
                raise KeyboardInterrupt

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        node_chaos = NodeChaos(runtime, cfg)
        view = ProgressView(cfg, progress_stream)
        try:
            with view:
                summary, error = _follow(cfg, coord, view, node_chaos)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if summary is None:  # the run failed: summary.json counts only if this run wrote it
            path = out / "summary.json"
            fresh = path.exists() and path.stat().st_mtime >= started_at
            summary = json.loads(path.read_text()) if fresh else {"error": error}
            summary["state"] = "ERRORED"
    view.final(summary, out)
    return summary
