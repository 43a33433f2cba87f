"""The driver of a run: it connects to (or starts) Ray, starts the coordinator actor (or attaches to the live
one of a run of the same name), shows progress, and turns SIGTERM/SIGINT (`ray job stop`, Ctrl-C) into
"checkpoint, then exit" so a resubmitted run resumes where it stopped.

Deliberately thin: the run itself lives in the coordinator. `preflight` fails fast on unusable data before
any Ray process starts. `scale` and `status` are the commands on a live run: they find its coordinator by name.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time

from elastic.chaos import node_chaos_for
from elastic.config import run_dir, to_yaml
from elastic.progress import json_only_stdout
from elastic.runtime import RayRuntime

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

    name, ns = coordinator_name(cfg.run.name), cfg.cluster.namespace
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
    that is restarting does not answer for a while: keep asking, as long as its name lives. `node_chaos`
    (elastic/chaos.py, None unless the config schedules node faults) carries out the ones the coordinator asks."""
    import ray

    from elastic.coordinator import coordinator_name

    silent_since = None
    while True:
        try:
            progress = ray.get(coord.progress.remote(), timeout=10)
            faults = ray.get(coord.node_faults.remote(), timeout=10) if node_chaos is not None else None
            silent_since = None
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            silent_since = silent_since or time.time()
            try:
                ray.get_actor(coordinator_name(cfg.run.name), namespace=cfg.cluster.namespace)
            except ValueError:
                return None, f"the coordinator is gone ({type(e).__name__})"
            if time.time() - silent_since > 600:
                return None, "the coordinator did not answer for 600 s"
            time.sleep(0.5)
            continue
        view.update(progress)
        if faults is not None:  # the coordinator holds that step until we acknowledge
            node_chaos.apply(faults)
            coord.node_faults_done.remote(faults.step)
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
        node_chaos = node_chaos_for(cfg.chaos, runtime)
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


# ---- commands on a live run -----------------------------------------------------------------------------------
def _coordinator(run: str, address: str, namespace: str):
    """The live coordinator of run `run` (connected to Ray at `address`), or None after saying that there is none."""
    import ray

    from elastic.group import coordinator_name

    ray.init(address=address, namespace=namespace, log_to_driver=False)
    try:
        return ray.get_actor(coordinator_name(run), namespace=namespace)
    except ValueError:
        print(f"error: no running run named '{run}' in namespace '{namespace}' at {address}", file=sys.stderr)
        return None


def scale(run: str, workers: int, address: str, namespace: str) -> int:
    """`python -m elastic scale RUN N`: ask a live run for N workers (the coordinator caps it); exits 1 if it is
    not running."""
    import ray

    coord = _coordinator(run, address, namespace)
    if coord is None:
        return 1
    target = ray.get(coord.scale.remote(workers))
    print(f"run {run}: target workers {target}")
    return 0


def status(run: str, address: str, namespace: str, as_json: bool) -> int:
    """One look at a live run (the dashboard shows the same as metrics); exits 1 if it is not running."""
    import ray

    # Ray prints cluster notices (a node that died) to this process's stdout while connected: keep them
    # off the JSON, and disconnect before printing it
    with json_only_stdout(as_json):
        coord = _coordinator(run, address, namespace)
        if coord is None:
            return 1
        info = ray.get(coord.progress.remote(), timeout=30)
        ray.shutdown()
    if as_json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    accel = ",".join(sorted(set(info.get("accelerators", []))))
    print(f"run {run}: {info.get('state')} step {info.get('step')}/{info.get('total')} "
          f"world {info.get('world_size')} ({accel}) generation {info.get('generation')} loss {info.get('loss')}")
    kinds = info.get("change_kinds") or {}
    if kinds:
        print("  membership changes: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    for e in info.get("recent_events", []):
        print(f"  step {e['step']}: {e['what']}")
    return 0
