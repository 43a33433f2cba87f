"""Ray plumbing of the worker group: handles, placement, calls to every worker with a bound, ending workers.

The coordinator (elastic/coordinator.py) reads as the protocol; the Ray calls it needs to place, reach and end
workers live here, small and without decisions of their own (those are in elastic/policy.py).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger("raydistro.coordinator")


class WorkerHandle:
    """The coordinator's view of one worker actor."""

    def __init__(self, worker_id: str, actor, info: dict | None = None, adopted: bool = False):
        self.worker_id = worker_id
        self.actor = actor
        self.info = info or {}
        # info, after the worker's one-time preparation (an adopted worker did that for the old coordinator)
        self.ready_ref = None if adopted else actor.prepare.remote()
        self.tokens_per_s = 0.0
        self.last_seen = time.time()  # its last sign of life: a report or an answered ping

    def __repr__(self) -> str:
        return self.worker_id


def coordinator_name(run_name: str) -> str:
    """The named actor of run `run_name`'s coordinator (in the run's namespace, cluster.namespace)."""
    return f"raydistro/{run_name}/coordinator"


# ---- placement -----------------------------------------------------------------------------------------------
def autoscaler_has_gpus() -> bool:
    """Whether Ray's cluster config (the autoscaler's node types in the GCS) lists nodes with GPUs. Absent where
    nobody published one (Ray 2.60's own autoscalers do not): then only train.device=cuda or train.accelerators
    asks for GPUs."""
    try:
        from ray._private import state as ray_state

        most = ray_state.state.get_max_resources_from_cluster_config() or {}
    except Exception:
        return False
    return (most.get("GPU") or 0) > 0


def worker_resources(cfg) -> tuple[dict[str, Any], str | None]:
    """What each worker asks Ray for, and the collective backend that implies ("nccl", "gloo", or None: no
    GPU, gloo). It follows the config, not what the cluster has at this moment (an autoscaling cluster starts
    with no GPU node, and only demand makes it add one): `train.worker_gpus` if >= 0; else 1 GPU when
    `train.device=cuda` or `train.accelerators` names types, 0 when `train.device=cpu`, and with `auto` 1 GPU if
    the cluster has a GPU now or Ray's cluster config lists node types with GPUs (`python -m clusters local up`
    writes one; Ray 2.60's own autoscalers do not), else 0. `train.accelerators=[H100,A100]` restricts workers to
    nodes of those types (`accelerator_type:X`): free nodes of any listed type are used (`free_nodes`), and
    demand for new capacity names the first type."""
    t = cfg.train
    gpus = t.worker_gpus
    if gpus < 0:
        if t.device == "cuda" or t.accelerators:
            gpus = 1.0
        elif t.device == "cpu":
            gpus = 0.0
        else:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 or autoscaler_has_gpus() else 0.0
    # simulated GPU nodes advertise logical GPUs: only train.device=cuda means real CUDA (nccl)
    backend = ("nccl" if t.device == "cuda" else "gloo") if gpus > 0 else None
    opts: dict[str, Any] = {"num_cpus": t.worker_cpus, "num_gpus": gpus}
    if t.accelerators:
        opts["resources"] = {f"accelerator_type:{t.accelerators[0]}": 0.001}
    return opts, backend


def free_nodes(opts: dict, accelerators=()) -> list[dict]:
    """Alive nodes that can host one more worker right now, with their accelerator type (only the types in
    `accelerators`, `train.accelerators`, when it names any)."""
    from ray._private import state as ray_state

    allowed = set(accelerators or ())
    avail = ray_state.available_resources_per_node()
    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        nid = node["NodeID"]
        free = avail.get(nid, {})
        if free.get("CPU", 0) + 1e-9 < opts["num_cpus"] or free.get("GPU", 0) + 1e-9 < opts["num_gpus"]:
            continue
        acc = next((k.split(":", 1)[1] for k in node.get("Resources", {}) if k.startswith("accelerator_type:")),
                   "GPU" if node.get("Resources", {}).get("GPU") else "CPU")
        if allowed and acc not in allowed:
            continue
        out.append({"node_id": nid, "accelerator": acc, "free": free})
    return out


def drain_node(node_id: str | None, grace_s: float = 60.0) -> bool:
    """Drain a node through the GCS, as a preemption notice would (never the head). False if not drained."""
    for node in ray.nodes():
        if node["NodeID"] == node_id and "node:__internal_head__" in node.get("Resources", {}):
            return False
    try:
        from ray.core.generated import autoscaler_pb2

        gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
        accepted, why = gcs.drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "raydistro chaos.drain_at", int(time.time() * 1000 + grace_s * 1000))
        if not accepted:
            log.warning("drain of node %s refused: %s", node_id, why)
        return bool(accepted)
    except Exception as e:
        log.warning("could not drain node %s through the GCS (%s); notifying the worker", node_id, e)
        return False


# ---- reaching every worker -------------------------------------------------------------------------------------
def call_all(handles: list[WorkerHandle], call, timeout: float) -> tuple[dict, list[WorkerHandle]]:
    """`call(h)` (an ObjectRef) on every handle, waited for at most `timeout` in all. Returns (handle -> value,
    the handles whose call raised or did not answer in time). An answer is a sign of life (`last_seen`)."""
    refs = {call(h): h for h in handles}
    if not refs:
        return {}, []
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    out, failed = {}, [refs[r] for r in late]
    for ref in ready:
        try:
            out[refs[ref]] = ray.get(ref)
            refs[ref].last_seen = time.time()
        except Exception as e:
            log.warning("%s: %s", refs[ref].worker_id, str(getattr(e, "cause", None) or e).splitlines()[0])
            failed.append(refs[ref])
    return out, failed


# ---- ending workers ---------------------------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_retries=0)
def _sigkill_pid(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def sigkill(h: WorkerHandle) -> None:
    """End a worker now, even a frozen one: SIGKILL to its process from a task on its node (~0.4 s; Ray's own
    kill first asks a process to exit and waits `kill_worker_timeout_milliseconds`, 5 s, for a frozen one),
    then Ray's kill for its bookkeeping. The process dying closes its connections, which releases the peers
    blocked on it in a collective."""
    pid, node = h.info.get("pid"), h.info.get("node_id")
    if pid and node:
        try:
            _sigkill_pid.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pid)
        except Exception:
            log.debug("could not send SIGKILL to %s", h.worker_id, exc_info=True)
    kill_quietly(h.actor)


def kill_quietly(actor, namespace: str | None = None) -> None:
    """ray.kill (no restart) of an actor, given by handle or by name, that may be gone already; never raises."""
    try:
        if isinstance(actor, str):
            actor = ray.get_actor(actor, namespace=namespace)
        ray.kill(actor, no_restart=True)
    except Exception:  # gone already (a name nobody holds: ValueError), or its node is
        log.debug("killing actor %s failed", actor, exc_info=True)
