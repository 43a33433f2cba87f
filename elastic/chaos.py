"""Fault injection as a feature: the `chaos` config section turned into events at given steps.

Users rehearse failures on their own cluster with it; the tests use the same path. The schedule is
pure (which event, at which step, which victim); the coordinator carries events out with real
actions: `ray.kill` mid-step, a worker that stops answering, a real garbage payload on the wire.
Node faults (`remove_node_at`, `add_node_at`) act on simulated nodes only the driver owns: the coordinator
holds the step and asks for them with a `NodeFaults` request (`Coordinator.node_faults`), the driver's
`NodeChaos` (installed only when the config schedules node faults) carries it out and acknowledges
(`Coordinator.node_faults_done`).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("raydistro")

KINDS = ("kill", "add", "drain", "hang", "corrupt_payload", "comm_error", "window_mismatch", "commit_error", "diverge",
         "remove_node", "add_node")


@dataclass(frozen=True)
class ChaosEvent:
    step: int
    kind: str


class ChaosSchedule:
    def __init__(self, chaos_cfg):
        self.events: list[ChaosEvent] = []
        for kind in KINDS:
            for step in getattr(chaos_cfg, f"{kind}_at"):
                self.events.append(ChaosEvent(int(step), kind))
        self.events.sort(key=lambda e: (e.step, KINDS.index(e.kind)))
        self.rng = random.Random(chaos_cfg.seed)
        self.done: set[ChaosEvent] = set()

    def due(self, step: int) -> list[ChaosEvent]:
        """Events at or before `step` not yet carried out. Each fires once, even if the step is retried;
        one that needs a peer (a kill with one worker left) waits for the first step it can act on."""
        return [e for e in self.events if e.step <= step and e not in self.done]

    def mark_done(self, event: ChaosEvent) -> None:
        self.done.add(event)

    def pick_victim(self, world_size: int, avoid_rank0: bool = True) -> int:
        """A victim rank; rank 0 is spared when possible so the oldest replica keeps serving joiners."""
        if world_size <= 1 or not avoid_rank0:
            return self.rng.randrange(world_size)
        return self.rng.randrange(1, world_size)

    def state_dict(self) -> dict:
        return {"done": [[e.step, e.kind] for e in self.done]}

    def load_state_dict(self, sd: dict) -> None:
        self.done = {ChaosEvent(int(s), k) for s, k in sd.get("done", [])}


NODE_KINDS = ("remove_node", "add_node")


@dataclass(frozen=True)
class NodeFaults:
    """The coordinator's request to the driver: carry out `kinds` (in this order: a removal before an addition
    at the same step, KINDS' order, so "remove then add" rehearses a replaced spot node) at `step`, which the
    coordinator holds until the driver acknowledges. `member_nodes`: the node ids the group's members run on."""
    step: int
    kinds: tuple[str, ...]
    member_nodes: tuple[str, ...] = ()


def node_chaos_for(chaos_cfg, runtime) -> NodeChaos | None:
    """The driver's node-fault injector when the `chaos` section schedules node faults, else None (the driver
    then never asks the coordinator for them)."""
    if chaos_cfg.remove_node_at or chaos_cfg.add_node_at:
        return NodeChaos(runtime)
    return None


class NodeChaos:
    """Carries out `NodeFaults` on the nodes the driver's `RayRuntime` simulates (it owns the Cluster).

    Called from the driver's main thread: Ray starts node processes with signal handlers, which only the main
    thread may install."""

    def __init__(self, runtime):
        self.runtime = runtime

    def apply(self, faults: NodeFaults) -> None:
        for kind in faults.kinds:
            if kind == "remove_node" and self.runtime.sim_nodes:
                # the newest simulated node that runs a member of the group: losing capacity in use is
                # the rehearsal; an idle node (e.g. one already drained) would test nothing
                busy = set(faults.member_nodes)
                index = max((i for i, n in enumerate(self.runtime.sim_nodes) if n.node_id in busy), default=-1)
                log.warning("chaos: removing a simulated node at step %d", faults.step)
                self.runtime.remove_sim_node(index)
            elif kind == "add_node":
                sim = self.runtime.cfg.cluster.simulate
                acc = sim[len(self.runtime.sim_nodes) % len(sim)]
                log.warning("chaos: adding a simulated %s node at step %d", acc, faults.step)
                self.runtime.add_sim_node(acc)


STEP_FAULTS = ("hang_at", "corrupt_payload_at", "comm_error_at", "commit_error_at", "diverge_at")


def step_faults_for(chaos_cfg, worker_id: str) -> StepFaults | None:
    """The injector a worker's steps call, or None when the run's `chaos` section schedules no fault that acts
    inside a worker's step (then the step has no chaos code on its path at all)."""
    return StepFaults(worker_id) if any(getattr(chaos_cfg, k) for k in STEP_FAULTS) else None


class StepFaults:
    """Injects the faults a step's `StepChaos` flags name into this worker, where a real one would strike.

    - `at_commit`: applying the previous step runs out of memory (`commit_error`), or the replica drifts from
      its peers right after applying it (`diverge`: bad memory, a nondeterministic kernel);
    - `before_exchange`: the step gets stuck on its way into the collective (`hang`: a deadlocked kernel or
      collective; the process still answers liveness pings, unlike the frozen VM that `bench-recovery`
      makes with SIGSTOP), or this rank's payload is garbage on the wire (`corrupt_payload`), or the
      collective fails on every rank (`comm_error`)."""

    def __init__(self, worker_id: str):
        self.worker_id = worker_id

    def before_commit(self, flags, step: int) -> None:
        if flags.commit_error:
            raise torch.OutOfMemoryError("chaos.commit_error_at: applying the step ran out of memory")

    def after_commit(self, flags, step: int, params: list[torch.Tensor]) -> bool:
        """Whether the replica was made to drift (its fingerprint must be taken again)."""
        if not flags.diverge:
            return False
        log.warning("%s: chaos diverge after step %d", self.worker_id, step)
        with torch.no_grad():
            params[0].view(-1)[0] += 1e-3
        return True

    def before_exchange(self, flags, step: int, comm, on_hang) -> None:
        if flags.hang:
            on_hang()
            log.warning("%s: chaos hang at step %d (stops answering until killed)", self.worker_id, step)
            while True:
                time.sleep(3600)
        if flags.corrupt_payload:
            log.warning("%s: chaos corrupt payload at step %d", self.worker_id, step)
            wire_injector(comm).armed = True
        if flags.comm_error:
            log.warning("%s: chaos collective error at step %d", self.worker_id, step)
            wire_injector(comm).fail_next = True


def wrap_for_chaos(comm, chaos_cfg, seed: int):
    """`comm` in a `CorruptingCommunicator` when the run's `chaos` section schedules a corrupt payload or a
    collective error (the only events that act on the wire); else `comm` itself, so a run without them keeps
    the wrapper off every collective."""
    if chaos_cfg.corrupt_payload_at or chaos_cfg.comm_error_at:
        return CorruptingCommunicator(comm, seed=seed)
    return comm


def wire_injector(comm) -> CorruptingCommunicator:
    """The communicator a step's `corrupt_payload` / `comm_error` flag arms; a clear error for one that
    `wrap_for_chaos` left unwrapped (the worker's config schedules neither event)."""
    if not isinstance(comm, CorruptingCommunicator):
        raise RuntimeError("chaos: a corrupt_payload/comm_error event reached a worker whose config has no "
                           "chaos.corrupt_payload_at or chaos.comm_error_at; give the workers the run's config")
    return comm


class CorruptingCommunicator:
    """Wraps a Communicator; when armed, the next all-gather sends garbage instead of our payload.

    The bytes on the wire really are corrupt, so the receivers' validation is what gets exercised.
    With `fail_next`, the next collective raises instead, as a transient NCCL/gloo error would.
    """

    def __init__(self, inner, seed: int = 0):
        self.inner = inner
        self.armed = False
        self.fail_next = False
        self.seed = seed

    def _maybe_fail(self) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("chaos: the collective failed on every rank (chaos.comm_error_at)")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        self._maybe_fail()
        if self.armed:
            self.armed = False
            g = torch.Generator().manual_seed(self.seed)
            noise = torch.randint(0, 256, (t.numel() * t.element_size(),), generator=g, dtype=torch.uint8)
            bad = noise.view(t.dtype).view(t.shape).to(t.device) if t.dtype != torch.uint8 else noise.view(t.shape).to(t.device)
            return self.inner.allgather(bad)
        return self.inner.allgather(t)

    def allreduce_(self, t: torch.Tensor) -> None:
        self._maybe_fail()
        if self.armed:
            self.armed = False
            t.fill_(float("nan"))
        self.inner.allreduce_(t)

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        self._maybe_fail()
        self.inner.broadcast_(t, src)
