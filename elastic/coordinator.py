"""The coordinator: owns time (steps), membership generations, the data cursor and checkpoints.

States: FORMING -> RUNNING -> (RESIZING -> RUNNING)* -> FINISHED | PAUSED | STOPPED | ERRORED.

One step of generation g (see docs/DESIGN.md): assign rows, every worker computes and exchanges,
then the step commits on every worker only if every rank reported ok; otherwise survivors abort it
(parameters untouched), the step's rows return to the plan, the group re-forms without the failed
members, a checkpoint is written, and the same step is retried. So every survivor applies a step or
none does, and every document is delivered exactly once.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from compression.sync import joiners_need_peer_state, sync_state_identical
from datasets import Carry, DataPlan, discover_usable, read_margin, rebalance, windows_for
from elastic import rendezvous
from elastic.chaos import NODE_KINDS, ChaosSchedule, NodeFaults
from elastic.checkpoint import (CheckpointFailed, CheckpointStore, CheckpointWriter, files_by_rank, first_line,
                                sync_file_for)
from elastic.config import (RunConfig, checkpoint_uri, collective_timeout_s, max_workers,
                            periodic_checkpoint_due, run_dir, to_dict)
from elastic.group import (WorkerHandle, call_all, coordinator_name, drain_node, free_nodes, kill_quietly, sigkill,
                           worker_resources)
from elastic.journal import Journal, RayKV
from elastic.membership import Member, MembershipGeneration, compute_shares, watchdog_timeout
from elastic.messages import StepCall, StepChaos, StepReport, WorkerStatus, tokens_per_s
from elastic.policy import (CoordinatorState, Liveness, PeerObservation, ScalingObservation, StepOutcome,
                            capped_scale_target, decide_failure, decide_scaling, fault_time, liveness,
                            resolve_fingerprints, silent_peer_limit, spawn_backoff_s)
from elastic.schedule import lr_at
from elastic.state_transfer import state_transfer_text
from elastic.summary import RunSummary
from elastic.topology import hierarchy_layout
from elastic import tracking
from elastic.worker import Worker

log = logging.getLogger("raydistro.coordinator")

# rows of each neighbour's read-ahead a worker reads too, so a re-split (train.balance_rows) that moves up to
# this many documents across a cut is a read-ahead hit (on the sample corpus at 64k tokens per rank it moved
# 1-4 of ~46 documents)
READ_MARGIN_ROWS = 4
PING_EVERY_S = 0.5  # while a step is out, the workers not yet reported are pinged this often (liveness)


class Coordinator:
    """Plain class driven by the actor shell `CoordinatorActor`; every Ray call it makes is here."""

    def __init__(self, cfg: RunConfig, discovered: dict | None = None):
        self.cfg = cfg
        self.discovered = dict(discovered or {})  # shard lists the driver's preflight already read
        self.state = CoordinatorState.FORMING
        self.lock = threading.Lock()
        self.stop_requested = False
        self.target_workers = cfg.train.workers
        self.next_worker_num = 0
        self.members: list[WorkerHandle] = []
        self.pending: list[WorkerHandle] = []
        self.generation = MembershipGeneration(-1)
        self.step = 0
        self.chaos = ChaosSchedule(cfg.chaos)
        self.recent_step_s: list[float] = []
        self.summary = RunSummary(cfg)
        self.progress_info: dict[str, Any] = {}
        self.store = CheckpointStore(checkpoint_uri(cfg), cfg.checkpoint.keep, cfg.checkpoint.storage_options)
        self.ckpt_writer = CheckpointWriter(self.store, self.cfg.checkpoint.write_timeout_s)  # checkpoints being written (`checkpoint`)
        self.backend = "gloo"
        self.draining: set[str] = set()
        self.open_changes: list[dict] = []
        self._options: dict | None = None
        self._next_cluster_poll = 0.0  # GCS queries (nodes, drains) at most once a second, not per step
        self._draining_nodes: dict = {}
        self.failed_step, self.failures_at_step = -1, 0
        self.scaled_explicitly = False
        self.scale_leaving: set[str] = set()
        self.pending_commit: int | None = None  # decided, applied by workers at their next call
        # train.compute_ahead: ((step, generation, world size), shares) the last call fixed that step's rows with
        self._fixed: tuple | None = None
        self._ahead_counts: dict[tuple[int, int, int], int] = {}  # next step's tokens per row (`_balance`)
        self.node_first_seen: dict[str, float] = {}
        self.started_at = time.time()
        self.node_faults_asked: NodeFaults | None = None  # held step's request to the driver (`node_faults`)
        self.node_faults_ack = threading.Event()
        # what a restarted coordinator (or one a new driver starts) needs to adopt the live group
        self.journal = Journal(RayKV(), cfg.cluster.namespace, cfg.run.name)
        self.took_over_by = ""           # "" for a fresh start; else who adopted the live group
        self.strikes: dict[str, int] = {}  # replica fingerprint disagreements per worker
        self.spawn_failures, self.last_spawn_failure_at = 0, 0.0
        self.commit_failed: list[WorkerHandle] = []  # their commit raised outside a step: they must leave
        self._joining: list[WorkerHandle] = []  # ready, being added by a membership change
        # what people watch (tracking sinks, metrics gauges, progress) for the last committed step: with GPU
        # workers done after the next step's calls leave, while they compute, not between their reports and
        # that dispatch (the host's cores are free then); with CPU workers at once
        self._observe: list[Callable[[], None]] = []
        from elastic.metrics import RunMetrics

        self.metrics = RunMetrics(cfg.run.name)

    # ---- setup -----------------------------------------------------------------------------
    def _load_data(self, known: tuple | None = None) -> None:
        """The shard lists (`known`: the ones an adopted run's journal holds; else the driver's preflight's,
        else read here) and the data plan over them."""
        if known is not None:
            self.discovered = {"data.source": known[0], "data.val_source": known[1]}
        d, found = self.cfg.data, self.discovered
        # bad data stops the run here, with the file named, not later inside a worker
        self.shards = discover_usable(d.source, d, known=found.get("data.source"))
        self.plan = DataPlan(self.shards, seed=d.seed, epoch=0)
        self.val_shards = discover_usable(d.val_source, d, known=found.get("data.val_source")) if d.val_source else []
        # one copy in the object store, referenced by every worker spawned (a FineWeb shard list is MBs)
        self.shards_ref, self.val_shards_ref = ray.put(self.shards), ray.put(self.val_shards)
        self.discovered = {}

    def _worker_options(self) -> dict:
        if self._options is None:
            self._options, backend = worker_resources(self.cfg)
            self.backend = backend or self.backend
        return self._options

    def spawn_worker(self, node: dict | None = None) -> WorkerHandle:
        opts = self._worker_options()
        self.next_worker_num += 1
        wid = f"w{self.next_worker_num}"
        label = node["accelerator"] if node else "any"
        name = f"raydistro/{self.cfg.run.name}/worker-{self.next_worker_num}[{label}]"
        extra: dict[str, Any] = {}
        if node is not None and node["accelerator"] not in ("CPU", "GPU"):
            # Ray's convention for "any node of this type": a sliver of its accelerator_type resource.
            # Not pinned to the node id: that node may already be gone by the time we are scheduled.
            extra["resources"] = {f"accelerator_type:{node['accelerator']}": 0.001}
        env = dict(self.cfg.cluster.ray_worker_env)  # Ray's settings for the worker's process (slow links)
        if self.cfg.cluster.gloo_socket_ifname:  # gloo must bind the interface peers can reach
            env["GLOO_SOCKET_IFNAME"] = self.cfg.cluster.gloo_socket_ifname
        if env:
            extra["runtime_env"] = {"env_vars": {k: str(v) for k, v in env.items()}}
        # detached: workers outlive a coordinator (or driver) that dies, so a new one adopts them mid-run;
        # each watches for its coordinator and exits if it is gone for good (train.orphan_timeout_s)
        actor = Worker.options(
            name=name, namespace=self.cfg.cluster.namespace, max_concurrency=1, max_restarts=0,
            lifetime="detached", **{**opts, **extra},  # a free node's type replaces train.accelerators' first
        ).remote(self.cfg, wid, self.shards_ref, self.cfg.run.seed, self.val_shards_ref)
        actor.set_coordinator.remote(coordinator_name(self.cfg.run.name), self.cfg.cluster.namespace)
        handle = WorkerHandle(wid, actor)
        handle.info["name"] = name
        handle.info["spawned_at"] = time.time()

        return handle

    def _spawn_up_to(self, n: int, on_hand: int = 0) -> None:
        """Ask for workers until members + pending + `on_hand` (ready workers not yet in the group) reach n;
        free nodes first, then plain demand."""
        want = n - len(self.members) - len(self.pending) - on_hand
        if want <= 0 or time.time() - self.last_spawn_failure_at < spawn_backoff_s(self.spawn_failures):
            return
        opts = self._worker_options()
        used_nodes = {h.info.get("node_id") for h in self.members}
        # one entry per worker a node can still take, spread across nodes first: every worker we can
        # place is named for its accelerator (worker-2[A100]), not "any"
        slots = []
        for f in free_nodes(opts, self.cfg.train.accelerators):
            fits = [(f["free"].get(r, 0) + 1e-9) // opts[k] for r, k in (("CPU", "num_cpus"), ("GPU", "num_gpus"))
                    if opts[k] > 0]
            slots += [(i, f) for i in range(int(min(fits)) if fits else want)]
        slots.sort(key=lambda s: (s[0], s[1]["node_id"] in used_nodes, s[1]["accelerator"]))
        free = [f for _, f in slots]
        for i in range(want):
            node = free[i] if i < len(free) else None
            self.pending.append(self.spawn_worker(node))
        if hasattr(self, "plan"):
            self._journal()  # a coordinator that takes over must know them, to clean them up

    def _ready_pending(self, timeout: float = 0.0) -> list[WorkerHandle]:
        if not self.pending:
            return []
        refs = [h.ready_ref for h in self.pending]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out = []
        for h in list(self.pending):
            if h.ready_ref in ready:
                self.pending.remove(h)
                try:
                    h.info.update(ray.get(h.ready_ref))
                    h.info["ready_at"] = h.last_seen = time.time()
                    out.append(h)
                    self.spawn_failures = 0
                except Exception as e:  # died starting (RayActorError) or its prepare() raised (RayTaskError)
                    cause = getattr(e, "cause", None) or e
                    why = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                    log.warning("worker %s failed to start (%s); asking for another after a back-off",
                                h.worker_id, why)
                    self.summary.event(self.step, f"worker-start-failed {h.worker_id}: {why}")
                    kill_quietly(h.actor)
                    self.spawn_failures += 1
                    self.last_spawn_failure_at = time.time()
        return out

    # ---- membership changes ----------------------------------------------------------------
    def _form_group(self, joiners: list[WorkerHandle], source: WorkerHandle | None,
                    ckpt=None) -> None:
        """Re-form the collective group over members (+joiners); give joiners state from `source`."""
        self._set_members(self.members + joiners)  # a new generation
        self._join_all()
        joiners = [j for j in joiners if j in self.members]  # some may have died while forming
        if source is not None and source not in self.members:
            source = next((h for h in self.members if h not in joiners), None)
            if source is None and joiners:  # nobody with the current state survived: use the checkpoint
                ckpt = ckpt or self.store.load_latest()
        world, g = len(self.members), self.generation.generation
        if ckpt is not None:
            # every member reads its own part straight from storage, checked against the manifest
            loads = [h.actor.load_checkpoint.remote(ckpt.uri, ckpt.records,
                                                    sync_file_for(r, ckpt.records, self._replicated_sync()), self.step)
                     for r, h in enumerate(self.members)]
            prints = ray.get(loads)
            self._check_agree(prints, "after loading the checkpoint")
            self.summary.event(self.step, f"state-from-checkpoint {ckpt.uri}")
        elif joiners and source is not None:
            self._give_state(joiners, source)
        self.summary.world_size(self.step, world, g, [m.accelerator for m in self.generation.members])
        self.metrics.world_size.set(world)
        self.metrics.generation.set(g)

    def _give_state(self, joiners: list[WorkerHandle], source: WorkerHandle) -> None:
        """Joiners get the parameters (and replicated optimizer state) from a live peer through the object
        store, never from storage. Everything is bounded by train.state_transfer_timeout_s: a joiner that fails
        or stalls is dropped, a source that does is replaced by another survivor, and the group re-forms
        without whoever was dropped (a membership change inside a membership change)."""
        limit = self.cfg.train.state_transfer_timeout_s
        for _ in range(4):
            t0 = time.time()
            costs_ref, model_ref = source.actor.model_state.remote()  # packed: elastic.state_transfer
            sync_costs_ref, sync_ref = source.actor.sync_state.remote() if self._replicated_sync() else (None, None)
            # only the small cost records come here: the states stay on the source's node until the joiners'
            # nodes fetch them (the coordinator's node and link never carry them)
            costs_refs = [r for r in (costs_ref, sync_costs_ref) if r is not None]
            ready, _ = ray.wait(costs_refs, num_returns=len(costs_refs), timeout=limit)
            try:
                costs = ray.get(ready, timeout=0)
                if len(ready) != len(costs_refs):
                    raise GetTimeoutError(f"no state within train.state_transfer_timeout_s={limit:.0f}s")
            except Exception as e:
                log.warning("state source %s failed: %s", source.worker_id, str(e).splitlines()[0])
                self.summary.event(self.step, f"state-source-lost {source.worker_id}")
                self._remove([source], kill=True)
                source = next((h for h in self.members if h not in joiners), None)
                if source is None:
                    raise StateSourceLost("every replica holding the run's state was lost during a join") from e
                continue
            t1 = time.time()
            _, failed = call_all(joiners, lambda h: h.actor.load_state.remote(model_ref, sync_ref, self.step),
                                       limit)
            load_s = time.time() - t1  # the joiners' fetch over the source's link, unpack and load
            joiners = [h for h in joiners if h not in failed]
            prints, silent = call_all(self.members, lambda h: h.actor.fingerprint.remote(), limit)
            failed += [h for h in silent if h not in failed and h is not source]
            if failed:
                self.summary.event(self.step, f"joiners-dropped {[h.worker_id for h in failed]}")
                self._remove(failed, kill=True)
                self._set_members(list(self.members))
                self._join_all()
            if joiners:  # what the join cost on the wire (elastic.bench.slowlink reads this line)
                self.summary.event(self.step, f"state-from-peer {source.worker_id} -> "
                                              f"{','.join(h.worker_id for h in joiners)}: "
                                              + state_transfer_text(costs, t1 - t0, load_s))
            self._check_agree([p for h, p in prints.items() if h in self.members], "after a join")
            return
        raise StateSourceLost("state transfer to the joiners kept failing")

    def _join_all(self, attempts: int = 4) -> None:
        """Form the collective group of the current members; members that die meanwhile are dropped
        and the group is formed again without them (a membership change inside a membership change)."""
        for attempt in range(attempts):
            g = self.generation.generation
            # the run's own name per generation (elastic.rendezvous): concurrent runs on one cluster never meet
            group = rendezvous.group_name(self.cfg.run.name, g)
            # a rank 0 that died during a previous rendezvous can leave its address behind: this run's only
            rendezvous.forget_rendezvous(self.cfg.run.name, g, subgroups=max_workers(self.cfg)
                                         if self.cfg.sync.hierarchy == "node" else 0)
            alive = []
            for h in self.members:
                try:
                    ray.get(h.actor.ping.remote(), timeout=10)
                    alive.append(h)
                except Exception:
                    log.warning("%s is gone before the group formed; dropping it", h.worker_id)
            if len(alive) != len(self.members):
                self._remove([h for h in self.members if h not in alive], kill=True)
                self._set_members(alive)
            world = len(self.members)
            # sync.hierarchy=node: the node groups and cross-node groups of this generation, from the members'
            # Ray nodes (re-computed at every membership change: a worker or a node left, a node joined)
            layout = (hierarchy_layout(group, [h.info.get("node_id", "") for h in self.members])
                      if self.cfg.sync.hierarchy == "node" else [None] * world)
            refs = [h.actor.join_group.remote(world, r, self.generation.generation, self.backend, group, layout[r])
                    for r, h in enumerate(self.members)]
            limit = collective_timeout_s(self.cfg)
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=limit + 30)
            failed = list(pending)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as e:
                    log.warning("joining the group failed: %s", str(e).splitlines()[0])
                    failed.append(ref)
            if not failed:
                return
            gone = []
            for h, ref in zip(self.members, refs):
                try:
                    ray.get(h.actor.ping.remote(), timeout=5)
                except Exception:
                    gone.append(h)
            if not gone:  # everyone is alive but the rendezvous failed: kill those that never returned
                gone = [h for h, ref in zip(self.members, refs) if ref in pending]
            self._remove(gone, kill=True)
            self._set_members([h for h in self.members if h not in gone])
            self.summary.event(self.step, f"group formation retry {attempt + 1}: dropped "
                                          f"{[h.worker_id for h in gone]}")
            if len(self.members) < 1:
                break
        raise RuntimeError(f"could not form the collective group after {attempts} attempts")

    def _set_members(self, handles: list[WorkerHandle]) -> None:
        self.members = list(handles)
        self.generation = MembershipGeneration(
            self.generation.generation + 1,
            [Member(h.worker_id, h.info.get("accelerator", "CPU"), h.info.get("node_id", ""),
                    h.info.get("device", "cpu"), h.tokens_per_s) for h in self.members],
        )

    def _replicated_sync(self) -> bool:
        return joiners_need_peer_state(self.cfg.sync.name)

    def _check_agree(self, prints: list[str], when: str) -> bool:
        agree = len(set(prints)) == 1
        if not agree:
            self.summary.replicas_disagree(self.step, when, prints)
            log.error("replica fingerprints disagree %s at step %d: %s", when, self.step, prints)
        return agree

    def _remove(self, handles: list[WorkerHandle], kill: bool) -> None:
        for h in handles:
            if h in self.members:
                self.members.remove(h)
            if kill:
                kill_quietly(h.actor)

    def membership_change(self, kind: str, leaving: list[WorkerHandle], joiners: list[WorkerHandle],
                          fault_at: float, capacity_at: float | None = None, detected_at: float | None = None) -> None:
        """Stop the generation, checkpoint, re-form with new ranks. seconds_to_resume runs from `fault_at` (the
        last sign of life of who left, a kill, the joiner ready) to the next committed step; `detected_at`
        (when the coordinator noticed) says how much of that was detection. For joins, `capacity_at` (node
        appeared / worker requested) gives seconds_from_capacity as well."""
        self.state = CoordinatorState.RESIZING
        self._observe_now()
        self._flush_commit()
        leaving = list(leaving) + [h for h in self.commit_failed if h not in leaving]
        self.commit_failed = []
        survivors = [h for h in self.members if h not in leaving]
        self._remove(leaving, kill=True)
        source = survivors[0] if survivors else None
        self.metrics.membership_changes.inc()
        if len(survivors) + len(joiners) < self.cfg.train.min_workers:
            self._pause(kind, joiners, fault_at)
            return
        if source is not None:
            self.checkpoint(reason=kind)
            self._form_group(joiners, source)
        else:  # everyone left: rebuild from the latest checkpoint, its step and data cursor included
            self.members = []
            ckpt = self.restore(mid_run=True)
            self._form_group(joiners, None, ckpt)
        self.open_changes.append({"step": self.step, "kind": kind, "fault_at": fault_at,
                                  "detected_at": detected_at or fault_at, "world_size": len(self.members),
                                  "capacity_at": capacity_at})
        self._journal()
        self.state = CoordinatorState.RUNNING

    def _pause(self, kind: str, joiners: list[WorkerHandle], fault_at: float) -> None:
        """Below train.min_workers: checkpoint what survives, wait for capacity, then resume."""
        self.state = CoordinatorState.PAUSED
        if self.members:
            self.checkpoint(reason=f"{kind}-pause")
        log.warning("only %d workers (< train.min_workers=%d): paused, waiting for capacity",
                    len(self.members) + len(joiners), self.cfg.train.min_workers)
        deadline = time.time() + self.cfg.train.pause_timeout_s
        while len(self.members) + len(joiners) < self.cfg.train.min_workers:
            if time.time() > deadline or self.stop_requested:
                raise PausedTooLong(
                    f"paused for {self.cfg.train.pause_timeout_s:.0f}s below train.min_workers="
                    f"{self.cfg.train.min_workers}; the run is checkpointed, resubmit to resume")
            self._spawn_up_to(self.cfg.train.min_workers, on_hand=len(joiners))
            joiners += self._ready_pending(timeout=1.0)
        ckpt = None if self.members else self.restore(mid_run=True)
        source = self.members[0] if self.members else None
        if source is not None:
            self._form_group(joiners, source)
        else:
            self._form_group(joiners, None, ckpt)
        self.open_changes.append({"step": self.step, "kind": f"{kind}-resume", "fault_at": fault_at,
                                  "detected_at": fault_at, "world_size": len(self.members)})
        self._journal()
        self.state = CoordinatorState.RUNNING

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint(self, reason: str) -> str | None:
        """Start a checkpoint of the committed state; training goes on while it is written.

        Each member copies its own part to host memory (one quick call) and writes it in the background:
        rank 0 the parameters, the sync state once if it is replicated, else every rank its own
        (`files_by_rank`). Once every writer has reported its files' checksums, meta.json and COMMIT are
        written (`_poll_checkpoints`, after every step). Returns the checkpoint's URI (None: not started)."""
        self._flush_commit()
        w = self.ckpt_writer
        if not self.members:
            return None
        if not w.should_start(reason):
            log.info("periodic checkpoint at step %d skipped: %s is still being written", self.step,
                     w.in_flight[-1].uri)
            return None
        meta = {
            "step": self.step, "reason": reason, "generation": self.generation.generation,
            "members": [asdict(m) for m in self.generation.members],
            "ranks": [h.worker_id for h in self.members],  # sync-rank{r}.pt was written by ranks[r]
            "plan": self.plan.state_dict(), "chaos": self.chaos.state_dict(),
            "summary": self.summary.state_dict(), "config": to_dict(self.cfg, redact=True),
            "next_worker_num": self.next_worker_num,
            # the next step's split depends on them: a resumed run splits it the same way
            "ahead_counts": [[*k, t] for k, t in sorted(self._ahead_counts.items())],
        }
        try:
            ck = w.begin(self.step, reason, meta)
        except Exception as e:  # the store cannot even be listed or its directory made
            w.last_error = f"{type(e).__name__}: {first_line(e)}"
            log.warning("checkpoint at step %d (%s) not started: %s; the previous one stays", self.step, reason,
                        w.last_error)
            self.summary.event(self.step, f"checkpoint-failed {self.store.uri} ({reason}): {w.last_error}")
            return None
        for h, files in zip(self.members, files_by_rank(len(self.members), sync_state_identical(self.cfg.sync.name))):
            if not files:  # a replica of what another rank writes: nothing of its own
                continue
            ck.snapshots[h.actor.snapshot.remote(self.step, ck.uri, files)] = h.worker_id
            ck.writers[h.actor.snapshot_written.remote(ck.uri)] = (h.worker_id, files)
        self._poll_checkpoints()
        return ck.uri

    def _poll_checkpoints(self, wait_s: float = 0.0) -> list:
        """Take what the in-flight checkpoints' writers reported (without blocking, unless `wait_s`),
        commit those complete (in the writer's thread), report those finished; returns them."""
        w, deadline, finished = self.ckpt_writer, time.time() + wait_s, []
        while True:
            refs = {ref: ck for ck in w.in_flight for ref in [*ck.pending, *ck.snapshots]}
            wait = max(0.0, min(0.2, deadline - time.time()))
            if refs:
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait)
                for ref in ready:
                    ck = refs[ref]
                    if ref in ck.snapshots:
                        ck.snapshots.pop(ref)
                        try:
                            ck.snapshot_s = max(ck.snapshot_s, ray.get(ref))
                        except Exception:
                            pass  # the same error reaches its writer's report
                    elif ref in ck.writers:
                        try:
                            ck.deliver(ref, ray.get(ref))
                        except Exception as e:
                            cause = getattr(e, "cause", None) or e  # a RayTaskError wraps the worker's own
                            ck.fail(ck.writers[ref][0], f"{type(cause).__name__}: {first_line(cause)}")
            finished += w.advance(0.0 if refs else wait)
            if not w.in_flight or time.time() >= deadline:
                break
        for ck in finished:
            if ck.error is None:
                self.summary.checkpoint(ck.uri, ck.step, ck.reason, time.time() - ck.started)
                log.info("checkpoint %s (%s) committed %.2fs after it started; the snapshot held training %.3fs",
                         ck.uri, ck.reason, time.time() - ck.started, ck.snapshot_s)
            else:
                log.warning(w.failure(ck))
                self.summary.event(ck.step, f"checkpoint-failed {ck.uri} ({ck.reason}): {ck.error}")
        return finished

    def _checkpoint_now(self, reason: str) -> None:
        """A checkpoint the run ends on (stop, end, error), waited for: CheckpointFailed if it was not
        written (the previous one stays)."""
        if reason == "error" and self.ckpt_writer.final_failed:
            log.warning("no error checkpoint: the store just failed the final one (%s)", self.ckpt_writer.last_error)
            return  # the run already ends on that failure; another attempt would only wait for the store again
        uri = self.checkpoint(reason)
        if uri is None and not self.members:
            return
        limit = self.cfg.checkpoint.write_timeout_s + 30
        finished = self._poll_checkpoints(wait_s=limit)
        if self.ckpt_writer.in_flight:
            self.ckpt_writer.abandon(f"not written within {limit:.0f}s (checkpoint.write_timeout_s)")
            finished += self._poll_checkpoints(wait_s=30)
        ours = [ck for ck in finished if ck.uri == uri]
        if uri is None or not ours or ours[0].error is not None:
            self.ckpt_writer.final_failed = True
            why = ours[0].error if ours else (self.ckpt_writer.last_error if uri is None else
                                              f"not committed within {limit + 30:.0f}s")
            raise CheckpointFailed(f"the {reason} checkpoint at step {self.step} could not be written "
                                   f"({uri or self.store.uri}): {why}; the last committed checkpoint is "
                                   f"{self.ckpt_writer.last_committed or 'one written before this run, if any'}")

    def restore(self, mid_run: bool = False):
        """Load the latest valid checkpoint's step and data cursor (and, at start, its history).

        `mid_run`: every replica was lost; the model and cursor go back to the checkpoint together (so
        documents after it are delivered again, once, to the model that did not see them), while this
        run's own record of events stays."""
        if mid_run:  # a checkpoint whose files are written may be committing right now
            self._poll_checkpoints(wait_s=self.cfg.checkpoint.write_timeout_s)
        ckpt = self.store.load_latest()  # checked against its manifest; the files themselves stay in storage
        if ckpt is None:
            return None
        meta = ckpt.meta
        self.step = int(meta["step"])
        self.plan.load_state_dict(meta["plan"])
        self._ahead_counts = {(s, g, x): t for s, g, x, t in meta.get("ahead_counts", [])}
        if not mid_run:
            self.chaos.load_state_dict(meta.get("chaos", {}))
            self.summary.load_state_dict(meta.get("summary", {}))
            self.next_worker_num = int(meta.get("next_worker_num", 0))
        self.ckpt_writer.last_committed = ckpt.uri
        log.info("resuming from %s at step %d", ckpt.uri, self.step)
        self.summary.resumed_from(ckpt.uri, self.step)
        return ckpt

    # ---- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        """The run, as states: FORMING (or ADOPTING a live group) -> RUNNING, with RESIZING and PAUSED at
        membership changes -> STOPPING (final checkpoint, evaluation) -> FINISHED | STOPPED; ERRORED with the
        run checkpointed when a decision says stop or something unforeseen raises."""
        t_start = time.time()
        self._watch_nodes()
        self.started_at = time.time()
        try:
            if not self._adopt():
                self._form_first_group()
            self.state = CoordinatorState.RUNNING
            while not self.stop_requested and self.step < self.cfg.train.steps:
                self._one_step()
                if self.cfg.train.stop_at and self.step >= self.cfg.train.stop_at:
                    self.summary.event(self.step, "stop_at reached")
                    self.stop_requested = True
            self._observe_now()
            self.state = CoordinatorState.STOPPING
            self._checkpoint_now(reason="stop" if self.stop_requested else "end")  # waits; raises if not written
            if not self.stop_requested or self.step >= self.cfg.train.steps:
                self._final_eval()
            self.state = CoordinatorState.STOPPED if self.stop_requested else CoordinatorState.FINISHED
        except Exception as e:
            self.state = CoordinatorState.ERRORED
            cause = getattr(e, "cause", None) or e  # a RayTaskError wraps the worker's own exception
            self.summary.error(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
            try:
                self._checkpoint_now(reason="error")  # and waits for any still being written
            except Exception:
                log.exception("could not checkpoint after the error")
            self._finish(t_start)
            raise
        return self._finish(t_start)

    def _form_first_group(self) -> None:
        """FORMING: the data, the latest checkpoint if any, the first workers, the first group."""
        self.state = CoordinatorState.FORMING
        self._load_data()
        ckpt = self.restore()
        self.journal.start((self.shards, self.val_shards), self.summary.journal_rows())
        self._spawn_up_to(self.cfg.train.workers)
        # wait for every initial worker for a while, then start with those ready (at least min_workers)
        t = self.cfg.train
        start = time.time()
        give_up = start + t.start_wait_s + t.pause_timeout_s
        joiners: list[WorkerHandle] = []
        while len(joiners) < t.workers:
            joiners += self._ready_pending(timeout=1.0)
            if len(joiners) >= t.min_workers and (not self.pending or time.time() > start + t.start_wait_s):
                break
            if time.time() > give_up:
                raise PausedTooLong("no capacity for train.min_workers workers; check the cluster's resources")
            # replaces workers that failed to start (with a back-off); those ready are counted
            self._spawn_up_to(self.cfg.train.workers, on_hand=len(joiners))
        # initial replicas are built from the same seed; a checkpoint overrides them
        self._form_group(joiners, None, ckpt)
        if ckpt is None:
            prints, _ = call_all(self.members, lambda h: h.actor.fingerprint.remote(),
                                       self.cfg.train.state_transfer_timeout_s)
            self._check_agree(list(prints.values()), "at start")
        self.summary.started(self.step)
        self._journal()

    # ---- a new coordinator takes over ----------------------------------------------------------------
    def _journal(self) -> None:
        """Record the control state (elastic/journal.py) before any decision in it reaches a worker."""
        joining = [h for h in self.pending + self._joining if h not in self.members]
        head = {
            "step": self.step, "pending_commit": self.pending_commit, "generation": self.generation.generation,
            "members": [{"worker_id": h.worker_id, "info": h.info, "tokens_per_s": h.tokens_per_s}
                        for h in self.members],
            "others": [h.info.get("name") for h in joining if h.info.get("name")],
            "plan": self.plan.state_dict(), "chaos": self.chaos.state_dict(), "next_worker_num": self.next_worker_num,
            "ahead_counts": [[*k, t] for k, t in sorted(self._ahead_counts.items())],
            "target_workers": self.target_workers, "scaled_explicitly": self.scaled_explicitly,
            "backend": self.backend, "recent_step_s": self.recent_step_s, "open_changes": self.open_changes,
            "summary": self.summary.journal_state(), "started_at": self.started_at, "t": time.time(),
        }
        self.journal.record(head, self.summary.journal_row())

    def _adopt(self) -> bool:
        """ADOPTING: if this run's journal says it is live, take over the workers that are still alive (they
        are detached: they outlived the coordinator or the driver that died), finish or drop the one step
        that may have been in flight, and go on from the last committed step. Returns False when there is
        nothing to adopt (then the run starts from its latest checkpoint, as a fresh one would)."""
        rec = self.journal.load()
        if rec is None:
            return False
        head, rows, shards = rec
        self.state = CoordinatorState.ADOPTING
        ns = self.cfg.cluster.namespace
        for name in head.get("others", []):  # spawned or joining, not members yet: their setup died with us
            kill_quietly(name, namespace=ns)
        handles = []
        for m in head["members"]:
            try:
                actor = ray.get_actor(m["info"]["name"], namespace=ns)
            except ValueError:
                continue
            h = WorkerHandle(m["worker_id"], actor, dict(m["info"]), adopted=True)
            h.tokens_per_s = m.get("tokens_per_s", 0.0)
            handles.append(h)
        t0 = time.time()
        limit = max(30.0, silent_peer_limit(self.cfg.train.silent_peer_s, head.get("recent_step_s", [])))
        # each worker finishes the old coordinator's step call first (it runs on the same lane), then applies
        # the step the journal says is committed, or drops the one it never committed
        states, lost = call_all(handles, lambda h: h.actor.adopt.remote(head["pending_commit"]), limit)
        step = int(head["step"])
        lost += [h for h, (count, _) in states.items() if count != step]
        alive = [h for h in handles if h not in lost]
        for h in lost:
            kill_quietly(h.actor)
        if not alive:
            log.warning("adopting run %s: no live worker holds step %d; starting from the latest checkpoint",
                        self.cfg.run.name, step)
            self.journal.finish()
            return False
        self._load_data(shards)
        self.plan.load_state_dict(head["plan"])
        self.step = step
        self.chaos.load_state_dict(head["chaos"])
        self.next_worker_num = int(head["next_worker_num"])
        self._ahead_counts = {(s_, g, x): t for s_, g, x, t in head["ahead_counts"]}
        self.target_workers, self.scaled_explicitly = head["target_workers"], head["scaled_explicitly"]
        self.backend, self.recent_step_s = head["backend"], list(head["recent_step_s"])
        self.summary.load_journal(head["summary"], rows)
        self.journal.start(shards, self.summary.journal_rows())
        self.generation = MembershipGeneration(int(head["generation"]))
        self.members = alive
        self.took_over_by = "a restarted coordinator" if restarted_by_ray() else "a new coordinator"
        self.summary.took_over(step, f"{self.took_over_by}: {len(alive)} live workers"
                                     + (f", {len(lost)} lost" if lost else ""))
        log.warning("took over run %s at step %d with %d live workers (%s)", self.cfg.run.name, step, len(alive),
                    self.took_over_by)
        self._check_agree([p for _, p in states.values()], "after the take-over")
        # the old collective group may have lost a member or be mid-failure: re-form it (a new generation),
        # with a checkpoint as at any membership change
        self.open_changes = list(head.get("open_changes", []))
        # seconds_to_resume from the last record the old coordinator made (it died after that)
        self.membership_change("takeover" if not lost else "takeover-lost", lost, [], head.get("t", t0),
                               detected_at=t0)
        return True

    def _finish(self, t_start: float) -> dict:
        self._observe_now()
        accounting = self.plan.accounting() if hasattr(self, "plan") else {}  # no plan: bad data before it
        self.summary.finish(self.step, accounting, time.time() - t_start, self.state.value)
        path = self.summary.write(run_dir(self.cfg))
        tracking.on_finish(self)
        self.progress_info["summary_path"] = str(path)
        self.progress_info["state"] = self.state.value
        self.journal.finish()  # ended (checkpointed): a later run with this name resumes from storage
        for h in self.members + self.pending:
            kill_quietly(h.actor)
        return self.summary.data

    def _final_eval(self) -> None:
        if not self.val_shards or not self.members:
            return
        val_plan = DataPlan(self.val_shards, seed=self.cfg.data.seed, epoch=0)
        ranges = val_plan.assign(0, {0: self.cfg.train.eval_tokens})[0]
        result = ray.get(self.members[0].actor.evaluate.remote(ranges))
        self.summary.val(self.step, result["val_loss"], result["val_tokens"])
        self.metrics.val_loss.set(result["val_loss"])

    def _control(self) -> list[WorkerHandle]:
        """Between steps: scale requests, chaos joins, drains, new capacity. Returns ready joiners."""
        poll_cluster = time.time() >= self._next_cluster_poll
        if poll_cluster:
            self._next_cluster_poll = time.time() + 1.0
            self._watch_nodes()
        due = self.chaos.due(self.step)
        node_events = [e for e in due if e.kind in NODE_KINDS]
        if node_events:
            self._await_node_chaos(node_events)
        for e in due:
            if e.kind == "add":
                self.chaos.mark_done(e)
                self.target_workers += 1
                self.summary.event(self.step, "chaos-add")
            elif e.kind == "drain" and len(self.members) > 1:
                self.chaos.mark_done(e)
                victim = self.members[self.chaos.pick_victim(len(self.members))]
                if drain_node(victim.info.get("node_id")):
                    self.summary.event(self.step, f"chaos-drain node of {victim.worker_id}")
                    poll_cluster = True  # see our own drain notice now
                else:  # the head node is never drained: give the worker the notice directly
                    self.draining.add(victim.worker_id)
                    self.summary.event(self.step, f"chaos-drain {victim.worker_id}")
        # real drain notices from the GCS (node drain, preemption): leave gracefully, before the deadline
        if poll_cluster:
            try:
                self._draining_nodes = ray._private.state.state.get_draining_nodes()
            except Exception:
                self._draining_nodes = {}
        for h in self.members:
            if h.info.get("node_id") in self._draining_nodes and h.worker_id not in self.draining:
                self.draining.add(h.worker_id)
                self.summary.event(self.step, f"node-drain {h.worker_id}")
        mx = max_workers(self.cfg)
        with self.lock:  # `request_scale` adds to these from another thread
            draining, self.draining = self.draining, set()
            scale_leaving = list(self.scale_leaving) if draining else []
            if draining:
                self.scale_leaving.clear()
            decision = decide_scaling(ScalingObservation(
                members=[h.worker_id for h in self.members], pending=len(self.pending), ready=[],
                target=self.target_workers, min_workers=self.cfg.train.min_workers, max_workers=mx,
                # keep demand for up to train.max_workers outstanding (an autoscaler sees it and adds nodes),
                # unless `scale N` set the size
                grow=mx > self.cfg.train.workers and not self.scaled_explicitly,
                draining=sorted(draining), scale_leaving=scale_leaving, spawn_failures=self.spawn_failures,
                now=time.time(), last_spawn_failure_at=self.last_spawn_failure_at))
            self.target_workers = decision.target
        if decision.leave:
            leaving = [h for h in self.members if h.worker_id in decision.leave]
            self.membership_change(decision.leave_kind, leaving, [], time.time())
        for _ in range(decision.cancel):  # asked for more than the run wants now: withdraw the newest requests
            kill_quietly(self.pending.pop().actor)
        if decision.spawn:
            self._spawn_up_to(len(self.members) + len(self.pending) + decision.spawn)
        return self._ready_pending(timeout=0.0)

    def _one_step(self) -> None:
        """RUNNING: one step: membership first (joiners, drains, failed commits), then the step call to every
        rank, the reports under the liveness watch, and the failure policy's decision carried out."""
        joiners = self._control()
        if joiners or self.commit_failed:
            self._joining = joiners
            ready = min((j.info["ready_at"] for j in joiners), default=time.time())
            self.membership_change("join" if joiners else "commit_error", [], joiners, ready,
                                   capacity_at=min(self._join_time(j) for j in joiners) if joiners else None)
            self._joining = []
        step = self.step
        members = list(self.members)
        gen = self.generation
        for m, h in zip(gen.members, members):
            m.tokens_per_s = h.tokens_per_s
        shares = compute_shares(gen.members, self.cfg.train.batch_tokens, self.cfg.train.balance,
                                self.cfg.train.batch_tokens_by_accelerator, self.cfg.train.seq_len)
        by_rank = {r: s for r, s in enumerate(shares)}
        fixed, self._fixed = self._fixed, None
        if fixed is not None and fixed[0] == (step, gen.generation, len(members)):
            by_rank = fixed[1]  # the previous call fixed this step's rows with these shares: keep them
        # train.carry_tail: the step starts with the last step's carried tail (rank 0's), and may leave its own:
        # one rank cuts its own stream (`cut_tail`); a group's windows are cut here (`_balance`)
        carry = self.plan.carry
        assignment, windows, cut_carry = self._balance(step, self.plan.assign(step, by_rank), by_rank,
                                                       self._may_cut(step))
        lr = lr_at(step, self.cfg.train.lr, self.cfg.train.warmup_steps, self.cfg.train.steps,
                   self.cfg.train.min_lr_ratio)
        # the decision to commit the previous step rides on this step's call: one RPC per step
        commit_first, self.pending_commit = self.pending_commit, None
        cut = self._may_cut(step) and len(members) == 1
        chaos, kill_victim, sent_carry = self._chaos_for(step, members, windows, commit_first,
                                                         carry if not windows else None)
        t0 = time.time()
        # what the next step will likely bring, read by the workers while this one computes (a hint: the
        # plan is unchanged; an abort or a new share split only makes the workers read again)
        hint = (self.plan.peek(by_rank)
                if self.cfg.train.prefetch and step + 1 < self.cfg.train.steps else {})
        margin = read_margin(hint, READ_MARGIN_ROWS) if hint and self.cfg.train.balance_rows else {}
        if cut_carry is not None and hint and len(members) > 1:  # rank 0's next window borrows it: read it ahead
            margin[0] = [*margin.get(0, []), cut_carry.doc]
        next_fixed = bool(hint) and self._can_fix_next(len(members))
        if next_fixed:  # if this step commits and the group stays, the next one trains exactly `hint`
            self._fixed = ((step + 1, gen.generation, len(members)), by_rank)
        refs = {h.actor.step.remote(StepCall(step, assignment.get(r, []), lr, chaos[r], commit_first, hint.get(r),
                                             margin.get(r), windows.get(r), next_fixed,
                                             sent_carry if r == 0 and not windows else None, cut,
                                             self._may_cut(step + 1) and len(members) == 1)): h
                for r, h in enumerate(members)}
        killed_at = None
        if kill_victim is not None:  # mid-step, before anything else delays it
            time.sleep(min(0.2, 0.3 * (statistics.median(self.recent_step_s) if self.recent_step_s else 0.1)))
            self.summary.event(step, f"chaos-kill {kill_victim.worker_id}")
            killed_at = time.time()
            kill_quietly(kill_victim.actor)
        self._observe_now()  # the last commit's metrics and progress, while the workers compute this step
        reports, dead, lv, observed = self._collect(refs, t0)
        detected = lv.noticed_at or time.time()
        outcome = StepOutcome(step, [h.worker_id for h in members], reports, [h.worker_id for h in dead],
                              lv.silent, lv.stuck, lv.collective_stuck,
                              attempts=self.failures_at_step + 1 if self.failed_step == step else 1)
        verdict = None
        if commit_first is not None:
            prints = {w: r.fingerprint for w, r in reports.items()
                      if r.committed_step == commit_first and r.fingerprint and not r.commit_failed}
            verdict = resolve_fingerprints(prints, outcome.members, self.strikes)
        decision = decide_failure(outcome)
        if decision.commits and (verdict is None or verdict.agree):
            # the tail this step leaves: its windows' (a group), or what its one rank reports having left
            carry_out = (cut_carry.to_list() if cut_carry is not None
                         else reports[members[0].worker_id].carry_out if cut else None)
            self._finish_commit(step, members, reports, time.time() - t0, carry_out)
            return
        # ---- the step failed: nobody applies it; survivors drop it; its rows go back to the plan ---------
        by_id = {h.worker_id: h for h in members}
        leaving = [by_id[w] for w in decision.leaving]
        if verdict is not None and not verdict.agree:
            self.summary.replicas_disagree(step, f"after step {commit_first}", sorted(set(prints.values())))
            leaving += [by_id[w] for w in verdict.evict if by_id[w] not in leaving]
        survivors = [h for h in members if h not in leaving]
        _, cannot_abort = call_all(survivors, lambda h: h.actor.abort.remote(step), 30.0)
        leaving += cannot_abort  # a survivor that cannot even abort leaves too
        self.plan.abort(step)
        if verdict is not None and not verdict.agree:
            self._resync([by_id[w] for w in verdict.resync if by_id[w] not in leaving], by_id[verdict.source])
        if decision.action == "stop":
            self.summary.event(step, f"step-aborted {decision.kind}")
            self.checkpoint(reason=decision.kind.replace("_", "-"))
            if decision.kind == "data_error":
                # the data source is down for everyone: stop with the run checkpointed, nothing lost
                raise DataUnavailable(f"step {step}: {decision.reason} (run checkpointed at step {self.step}; "
                                      "resubmit to resume once the source is back)")
            raise StepKeepsFailing(f"{decision.reason}; run checkpointed at step {self.step}")
        self.failures_at_step, self.failed_step = outcome.attempts, step
        log.warning("step %d failed (%s): leaving=%s errors=%s", step, decision.kind or "replica_mismatch",
                    [h.worker_id for h in leaving], decision.reason)
        self.summary.event(step, f"step-aborted {decision.kind or 'replica-mismatch'} "
                                 f"leaving={[h.worker_id for h in leaving]}")
        if leaving:
            fault_at = killed_at or fault_time(observed, [h.worker_id for h in leaving], detected)
            self.membership_change(decision.kind if decision.action == "evict" else "replica_mismatch", leaving, [],
                                   fault_at, detected_at=detected)
        elif decision.action == "regroup":  # same members, a new generation
            self.membership_change("regroup", [], [], detected)
        elif decision.action == "retry":
            self.summary.rejected_step(step, {w: r.error for w, r in reports.items() if not r.ok})
        if decision.kind == "window_mismatch" and carry is not None and not windows:
            # the carried tail does not fit its document as read now: drop it rather than fail the step forever;
            # less than a row of one document goes untrained, and says so. (A window that did not fit retries
            # in whole documents first, where rank 0 reads the carry itself.)
            self.plan.carry = None
            self.summary.event(step, f"carry-dropped {carry}")
            log.warning("step %d: the carried tail %s does not fit its document; dropped (not trained)", step, carry)

    def _may_cut(self, step: int) -> bool:
        """Whether step `step` may end after its last full row and leave its last document's tail to the next
        step (`train.carry_tail`; never the run's last step). One rank cuts its own stream (`StepCall.cut_tail`);
        a group's step is cut with its windows (`_balance`), so a step in whole documents does not cut."""
        return self.cfg.train.carry_tail and step + 1 < self.cfg.train.steps

    def _can_fix_next(self, world_size: int) -> bool:
        """Whether the next step's rows can be fixed now, at this step's call (`train.compute_ahead`): the
        next step then trains exactly this call's read-ahead hint, drawn with this step's shares, if this step
        commits and the group stays, so the workers start it before its call. Not with `train.balance_rows`
        at more than one rank: that split waits for the token counts this step's read-ahead reports."""
        t = self.cfg.train
        return t.compute_ahead and t.apply_ahead and t.prefetch and (world_size == 1 or not t.balance_rows)

    def _chaos_for(self, step: int, members: list[WorkerHandle], windows: dict, commit_first: int | None,
                   carry: list | None) -> tuple[dict[int, StepChaos], WorkerHandle | None, list | None]:
        """This step's injected faults (`chaos` config), per rank, a worker to kill mid-step, and the carried
        tail to send (`window_mismatch` on a step that carries one: a skip past its document's end)."""
        chaos = {r: StepChaos() for r in range(len(members))}
        kill_victim = None
        for e in self.chaos.due(step):
            if e.kind in ("hang", "corrupt_payload") and len(members) > 1:
                setattr(chaos[self.chaos.pick_victim(len(members))], e.kind, True)
                self.chaos.mark_done(e)
            elif e.kind in ("commit_error", "diverge") and len(members) > 1 and commit_first is not None:
                setattr(chaos[self.chaos.pick_victim(len(members))], e.kind, True)
                self.chaos.mark_done(e)
            elif e.kind == "comm_error":
                for c in chaos.values():
                    c.comm_error = True
                self.chaos.mark_done(e)
            elif e.kind == "window_mismatch" and windows:  # waits for a step cut at token level
                victim = self.chaos.pick_victim(len(members))
                windows[victim] = {**windows[victim], "slots": windows[victim]["slots"] + 1}
                self.chaos.mark_done(e)
            elif e.kind == "window_mismatch" and carry is not None:  # ... or one that starts with a carried tail
                carry = [*carry[:3], 1 << 30]
                self.chaos.mark_done(e)
            elif e.kind == "kill" and len(members) > 1:
                kill_victim = members[self.chaos.pick_victim(len(members))]
                self.chaos.mark_done(e)
        return chaos, kill_victim, carry

    def _resync(self, targets: list[WorkerHandle], source: WorkerHandle) -> None:
        """Replicas whose fingerprint disagreed with the majority get the majority's parameters (and replicated
        sync state) from `source`, through the object store; their own per-rank sync state stays."""
        if not targets:
            return
        _, model_ref = source.actor.model_state.remote()  # (its cost record, the packed state)
        sync_ref = source.actor.sync_state.remote()[1] if self._replicated_sync() else None
        _, failed = call_all(targets, lambda h: h.actor.load_state.remote(model_ref, sync_ref, self.step),
                                   self.cfg.train.state_transfer_timeout_s)
        self.commit_failed += failed  # could not be repaired: they leave at the next membership check
        self.summary.event(self.step, f"resync {[h.worker_id for h in targets]} from {source.worker_id}")

    def _balance(self, step: int, assignment: dict, shares: dict[int, int], cut: bool = False
                 ) -> tuple[dict, dict, Carry | None]:
        """Re-split `step`'s documents over the ranks by their real token counts (read ahead by the workers
        during the previous step), so nobody waits for a peer that drew longer documents. With
        `train.split_docs` the step's stream is cut at token level (`split_windows`: every rank trains
        whole rows in proportion to its share; a document at a cut is trained in part by each neighbour);
        otherwise whole documents move at the cuts between neighbouring ranks. The step's documents stay the
        same. Without counts for every row (the first step, after a failure or a membership change, a read
        ahead that failed) the plan's split stands. The windows start with the plan's carried tail (rank 0
        borrows it) and with `cut` may leave the step's own (`datasets.cut_step`). Returns (rank -> ranges,
        rank -> window JSON or nothing, the carry the windows leave or None)."""
        counts, self._ahead_counts = self._ahead_counts, {}
        if not (self.cfg.train.prefetch and self.cfg.train.balance_rows) or not counts:
            return assignment, {}, None
        carry = Carry.from_list(self.plan.carry) if self.plan.carry else None
        if carry is not None and not carry.slots:  # recorded without its length: rank 0 reads it, whole documents
            return assignment, {}, None
        got = (windows_for(assignment, counts, shares, self.cfg.train.seq_len, carry=carry, cut=cut)
               if self.cfg.train.split_docs else None)
        owned = {k: list(w.owned) for k, w in got[0].items()} if got is not None else None
        if owned is not None and self.plan.resplit(step, owned):
            self.summary.data["rebalanced_steps"] += 1
            self.summary.data["split_steps"] += 1
            return owned, {k: w.to_json() for k, w in got[0].items()}, got[1]
        if carry is not None:  # rank 0 starts with the carried tail: whole documents as drawn
            return assignment, {}, None
        new = rebalance(assignment, counts, shares, self.cfg.train.seq_len)
        if new is None or not self.plan.resplit(step, new):
            return assignment, {}, None
        self.summary.data["rebalanced_steps"] += 1
        return new, {}, None

    def _join_time(self, h: WorkerHandle) -> float:
        """When the capacity a joiner uses appeared: its node's first sighting, else its spawn."""
        node_seen = self.node_first_seen.get(h.info.get("node_id", ""), None)
        if node_seen is not None and node_seen <= self.started_at:
            node_seen = None  # the node was there from the start: the join began at the spawn
        return min(t for t in (node_seen, h.info.get("spawned_at"), h.info.get("ready_at", time.time()))
                   if t is not None)

    def _await_node_chaos(self, events) -> None:
        """Node removal/addition is done by the driver that owns the simulated cluster: ask it (`node_faults`)
        and hold the step until it acknowledges, so the event lands exactly at its step however fast steps are."""
        self.node_faults_ack.clear()
        with self.lock:
            self.node_faults_asked = NodeFaults(self.step, tuple(e.kind for e in events),
                                                tuple(h.info.get("node_id", "") for h in self.members))
        if not self.node_faults_ack.wait(timeout=120):
            log.warning("node chaos at step %d: the driver did not act within 120 s; going on", self.step)
        with self.lock:
            self.node_faults_asked = None
        for e in events:
            self.chaos.mark_done(e)
            self.summary.event(self.step, f"chaos-{e.kind.replace('_', '-')}")

    def node_faults(self) -> NodeFaults | None:
        """The node faults the driver is to carry out now (the step is held until `node_faults_done`), or None."""
        with self.lock:
            return self.node_faults_asked

    def node_faults_done(self, step: int) -> None:
        """The driver carried out the node faults of `step`; an acknowledgement of another step is ignored."""
        with self.lock:
            if self.node_faults_asked is not None and self.node_faults_asked.step == step:
                self.node_faults_ack.set()

    def _watch_nodes(self) -> None:
        now = time.time()
        for node in ray.nodes():
            if node.get("Alive") and node["NodeID"] not in self.node_first_seen:
                self.node_first_seen[node["NodeID"]] = now

    def _collect(self, refs: dict, t0: float) -> tuple[dict[str, StepReport], list[WorkerHandle], Liveness,
                                                          dict[str, PeerObservation]]:
        """Wait for every report of a step, watching the workers still out: every PING_EVERY_S they are asked
        for their status on their control lane, which answers even while the step thread is blocked in a
        collective. A worker with no sign of life for `train.silent_peer_s` (a frozen VM, a partition) is
        silent; one that answers but makes no progress where it must is stuck; everybody waiting inside the
        collective with nobody to blame is a stuck collective. Silent and stuck workers are killed (SIGKILL
        ends a frozen process too), which closes their connections; the survivors' collectives are then
        aborted if they do not fail on their own, so no survivor is ever killed for a peer's fault.
        Returns (reports, dead, liveness verdict, each worker's last sign of life)."""
        limit = silent_peer_limit(self.cfg.train.silent_peer_s, self.recent_step_s)
        watchdog = watchdog_timeout(self.recent_step_s, self.cfg.train.step_timeout_s, self.cfg.train.hang_factor)
        out = dict(refs)  # step ref -> handle, not reported yet
        reports: dict[str, StepReport] = {}
        dead: list[WorkerHandle] = []
        # for the verdict, nobody is older than the dispatch (the coordinator may have been busy before it)
        obs = {h.worker_id: PeerObservation(last_seen=max(h.last_seen, t0), progress_at=t0) for h in out.values()}
        pings: dict = {}  # status ref -> handle
        # a healthy step reports before its first ping: pings (each an actor call over the worker's link) start
        # once the step runs late, at 1.5x the median recent step (at most a quarter of the silent limit), then
        # come every PING_EVERY_S, and at once after a failed report. No verdict is delayed: silence and lack of
        # progress both need `limit`, the watchdog more
        median = statistics.median(self.recent_step_s[-20:]) if len(self.recent_step_s) >= 3 else 0.0
        next_ping, failed_at, lv = t0 + max(PING_EVERY_S, min(1.5 * median, limit / 4)), None, Liveness()
        while out:
            ready, _ = ray.wait(list(out) + list(pings), num_returns=1, timeout=max(0.0, next_ping - time.time()))
            now = time.time()
            for ref in ready:
                if ref in out:
                    report = self._take_report(ref, out.pop(ref), reports, dead)
                    if report is None or not report.ok:
                        failed_at = failed_at or now
                        next_ping = min(next_ping, now + PING_EVERY_S)
                else:
                    h = pings.pop(ref)
                    try:
                        st: WorkerStatus = ray.get(ref)
                    except Exception:
                        continue  # a dead worker shows on its step call
                    o = obs[h.worker_id]
                    h.last_seen = o.last_seen = now
                    if st.progress != o.progress or st.phase != o.phase:
                        o.progress, o.phase, o.progress_at = st.progress, st.phase, now
            if not out or now < next_ping:
                continue
            next_ping = now + PING_EVERY_S
            asked = set(pings.values())
            for h in out.values():
                if h not in asked:
                    pings[h.actor.status.remote()] = h
            lv = liveness({h.worker_id: obs[h.worker_id] for h in out.values()}, now, limit, now - t0, watchdog)
            # once one rank failed, the others fail fast on gloo (a closed peer: ~30 ms); NCCL has no timeout
            if lv.anyone or (failed_at is not None and now - failed_at > 2.0):
                break
        lv.noticed_at = failed_at or (time.time() if lv.anyone else 0.0)
        if out:
            self._unblock(out, lv, limit, reports, dead)
        seen = {h.worker_id: PeerObservation(last_seen=h.last_seen) for h in refs.values()}
        return reports, dead, lv, seen

    def _take_report(self, ref, h: WorkerHandle, reports: dict, dead: list) -> StepReport | None:
        """Record a finished step call: its report (a sign of life), or the worker as dead (None)."""
        report = self._report_of(ref, h)
        if report is None:
            dead.append(h)
        else:
            reports[h.worker_id] = report
            h.last_seen = time.time()
        return report

    def _report_of(self, ref, h: WorkerHandle) -> StepReport | None:
        """A worker's step report; None if the worker died (its process or node is gone)."""
        try:
            return ray.get(ref)
        except RayActorError:
            return None
        except Exception as e:  # the call itself raised (not the step, which reports its own errors)
            report = StepReport(h.worker_id, -1, -1, ok=False)
            report.update_error(getattr(e, "cause", None) or e, pre_exchange=True)
            return report

    def _unblock(self, out: dict, lv: Liveness, limit: float, reports: dict, dead: list) -> None:
        """Release the survivors of a failed step: kill who is silent or stuck, abort the collectives the
        others are blocked in, and collect their reports. Only a survivor that stays blocked after its
        communicator was aborted (a backend that cannot abort) is killed, as a last resort, and named."""
        by_id = {h.worker_id: h for h in out.values()}
        for w in lv.silent + lv.stuck:
            log.warning("%s is %s (no %s for %.0f s): evicting it", w, "silent" if w in lv.silent else "stuck",
                        "sign of life" if w in lv.silent else "progress", limit)
            sigkill(by_id[w])
        rest = {ref: h for ref, h in out.items() if h.worker_id not in lv.silent + lv.stuck}
        for attempt in range(2):
            if not rest:
                return
            ready, _ = ray.wait(list(rest), num_returns=len(rest), timeout=2.0 if attempt == 0 else max(5.0, limit))
            for ref in ready:
                self._take_report(ref, rest.pop(ref), reports, dead)
            if rest and attempt == 0:
                g = self.generation.generation
                for h in rest.values():
                    h.actor.abort_collective.remote(g)
        for h in rest.values():
            log.error("%s stays blocked in the collective after its communicator was aborted: killing it", h.worker_id)
            self.summary.event(self.step, f"unblock-failed {h.worker_id}")
            lv.stuck.append(h.worker_id)
            kill_quietly(h.actor)

    def _flush_commit(self) -> None:
        """Apply a decided-but-not-yet-sent commit on every member now (before a checkpoint, a membership
        change or the end). Members that cannot be reached are left to the failure handling."""
        step, self.pending_commit = self.pending_commit, None
        if step is None:
            return
        prints, failed = call_all(self.members, lambda h: h.actor.commit.remote(step),
                                        self.cfg.train.state_transfer_timeout_s)
        # the step stays committed (the others applied it); who failed to apply it must leave: its parameters
        # may be half-updated. The next membership check (or the one under way) evicts them.
        self.commit_failed += [h for h in failed if h not in self.commit_failed]
        if failed:
            self.summary.event(step, f"commit-failed {[h.worker_id for h in failed]}")
        if prints:
            verdict = resolve_fingerprints({h.worker_id: p for h, p in prints.items()},
                                           [h.worker_id for h in self.members], self.strikes)
            if not verdict.agree:
                self.summary.replicas_disagree(step, f"after step {step}", sorted(set(prints.values())))
                by_id = {h.worker_id: h for h in self.members}
                self.commit_failed += [by_id[w] for w in verdict.evict]
                self._resync([by_id[w] for w in verdict.resync], by_id[verdict.source])

    def _finish_commit(self, step, members, reports, wall, carry: list | None = None) -> None:
        """Every rank exchanged step `step`: it is committed (workers apply it at their next call). `carry`: the
        tail of its last document it leaves to the next step (`train.carry_tail`)."""
        agree = True  # fingerprints arrive with the next call; a disagreement is recorded then
        self.plan.commit(step, dropped=[d for r in reports.values() for d in r.dropped], carry=carry)
        # what the workers read ahead for the next step, per row: `_balance` splits that step with it
        self._ahead_counts = {(s, g, x): t for r in reports.values() for s, g, x, t in r.ahead_tokens or []}
        self.pending_commit = step
        self.step = step + 1
        self.recent_step_s.append(wall)
        self.recent_step_s = self.recent_step_s[-50:]
        for h in members:
            rep = reports.get(h.worker_id)
            if rep and rep.ok:
                h.tokens_per_s = rep.tokens_per_s()
        ok_reports = [r for r in reports.values() if r.ok]
        if ok_reports and all(r.ahead_s > 0 for r in ok_reports):
            self.summary.data["computed_ahead_steps"] += 1
        for r in ok_reports:  # train.profile_at: each worker's profiler summary, once
            if r.profile:
                self.summary.data["profiles"][r.worker_id] = {"last_step": step, **r.profile}
        tokens = sum(r.tokens for r in ok_reports)
        loss = sum(r.loss * r.tokens for r in ok_reports) / max(1, tokens)
        self.summary.step(step, loss, tokens, ok_reports, agree, wall,
                          nodes={h.worker_id: h.info.get("node_id", "") for h in members})
        now = time.time()
        for c in self.open_changes:
            self.summary.membership_change(c["step"], c["kind"], now - c["fault_at"], c["world_size"],
                                           now - c["capacity_at"] if c.get("capacity_at") else None,
                                           detection_s=c["detected_at"] - c["fault_at"])
        self.open_changes = []
        self._journal()  # durable before the decision leaves with the next call (or a flush)
        self._observe.append(lambda: self._observe_commit(step, members, loss, tokens, ok_reports, wall))
        if all(m.accelerator == "CPU" for m in self.generation.members):
            # CPU workers compute on the cores this work would take from them: do it now, while they wait
            # (measured: docs/BENCHMARKS.md, the coordinator's turn on CPU)
            self._observe_now()
        every = self.cfg.train.eval_every
        if every and self.step % every == 0 and self.step < self.cfg.train.steps:  # the last: _final_eval
            self._flush_commit()  # score the committed parameters
            try:
                self._final_eval()
            except Exception as e:  # a member lost meanwhile is the next step's failure to handle, not this
                log.warning("held-out evaluation at step %d failed: %s", self.step, str(e).splitlines()[0])
        self._poll_checkpoints()  # the writes of earlier checkpoints: commit those done, never wait
        if periodic_checkpoint_due(self.cfg, self.step):
            self.checkpoint(reason="periodic")

    def _observe_commit(self, step, members, loss, tokens, ok_reports, wall) -> None:
        """Committed step `step` for the people watching: metrics.jsonl, TensorBoard, W&B, MLflow, the
        Prometheus gauges, the driver's progress line."""
        tracking.on_commit(self, step, loss, tokens, ok_reports, wall)
        sent = self.summary.sent_per_step_mean()  # over the run: diloco sends only at outer steps
        dense = statistics.mean(r.dense_equivalent_bytes for r in ok_reports) if ok_reports else 0
        self.metrics.loss.set(loss)
        self.metrics.step.set(step + 1)
        self.metrics.tokens_per_s.set(tokens_per_s(tokens, wall))
        if sent:
            self.metrics.compression_ratio.set(dense / sent)
        self.metrics.data_lag_s.set(max((r.read_s for r in ok_reports), default=0.0))
        with self.lock:
            self.progress_info.update(
                step=step + 1, total=self.cfg.train.steps, loss=loss, tokens_per_s=tokens_per_s(tokens, wall),
                bytes_sent=sent, dense_bytes=dense, world_size=len(members),
                generation=self.generation.generation, state=self.state.value,
                accelerators=[m.accelerator for m in self.generation.members],
                changes=len(self.summary.data["membership_changes"]),
            )

    def _observe_now(self) -> None:
        """Do the watching work of committed steps still owed (`_observe`), oldest first: at the commit (CPU
        workers), after the next dispatch (GPU workers), before a membership change and at the end. A failure
        is logged, never raised into a step."""
        while self._observe:
            try:
                self._observe.pop(0)()
            except Exception:
                log.exception("recording a committed step for tracking, metrics or progress failed")

    # ---- control from outside ---------------------------------------------------------------
    def progress(self) -> dict:
        with self.lock:
            info = dict(self.progress_info)
        info.setdefault("step", self.step)
        info.setdefault("total", self.cfg.train.steps)
        info["state"] = self.state.value
        info["resumed_from_step"] = self.summary.data.get("resumed_from_step")
        info["members"] = [{"worker_id": h.worker_id, "pid": h.info.get("pid"), "node_id": h.info.get("node_id"),
                            "accelerator": h.info.get("accelerator")} for h in list(self.members)]
        info["recent_events"] = self.summary.data["events"][-5:]
        info["change_kinds"] = dict(Counter(c["kind"] for c in self.summary.data["membership_changes"]))
        return info

    def request_scale(self, n: int) -> int:
        """`python -m elastic scale RUN N` (another thread than the loop's): the target, within
        [train.min_workers, train.max_workers]; returns the target set."""
        lo, hi = self.cfg.train.min_workers, max_workers(self.cfg)
        target = capped_scale_target(n, lo, hi)
        note = ""
        if target != int(n):
            bound = "train.max_workers" if target == hi and int(n) > hi else "train.min_workers"
            note = (f" capped at {bound}={target}" if bound == "train.max_workers" else f" raised to {bound}={target}")
            log.warning("scale request for %d workers%s (rerun with a larger %s to go beyond it)", int(n), note, bound)
        with self.lock:  # the loop reads and clears these between steps (`_control`)
            self.scaled_explicitly = True
            self.target_workers = target
            if self.target_workers < len(self.members):
                extra = len(self.members) - self.target_workers
                for h in self.members[-extra:]:
                    self.draining.add(h.worker_id)
                    self.scale_leaving.add(h.worker_id)
        self.summary.event(self.step, f"scale-request {n}{note}")
        return target

    def request_stop(self) -> None:
        self.stop_requested = True


def restarted_by_ray() -> bool:
    """Whether this actor is a restart of one whose process died (Ray re-ran its constructor)."""
    import warnings

    with warnings.catch_warnings():  # the property reads a deprecated field inside Ray 2.60
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class PausedTooLong(RuntimeError):
    pass


class StateSourceLost(RuntimeError):
    pass


class DataUnavailable(RuntimeError):
    pass


class StepKeepsFailing(RuntimeError):
    pass


@ray.remote(num_cpus=0, max_concurrency=8)
class CoordinatorActor:
    """Actor shell, named raydistro/<run>/coordinator, detached and restartable (`train.coordinator_restarts`):
    the run lives in a thread of its own (`start`), so it goes on without its driver, and a coordinator that
    Ray restarts after its process died takes the live group over by itself (`Coordinator._adopt`). A driver,
    the first or one run again, calls `start` (idempotent), watches `progress`, and collects `result`."""

    LINGER_S = 600.0  # after the end, how long the result waits for a driver before the actor exits

    def __init__(self, cfg: RunConfig):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.c = Coordinator(cfg)
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._fetched = threading.Event()
        self._result: dict | None = None
        self._error: BaseException | None = None
        if restarted_by_ray():
            log.warning("coordinator of run %s restarted: taking over the live workers", cfg.run.name)
            self.start()

    def __repr__(self) -> str:
        # taken once by Ray after __init__ (dashboard actor list, log prefix): no stale live fields there
        if self.c.generation.generation < 0:
            return f"Coordinator({self.c.cfg.run.name} sync={self.c.cfg.sync.name} steps={self.c.cfg.train.steps})"
        p = self.c.progress_info
        return (f"Coordinator({self.c.cfg.run.name} {self.c.state.value} gen={self.c.generation.generation} "
                f"step={self.c.step}/{self.c.cfg.train.steps} world={len(self.c.members)} "
                f"tok/s={p.get('tokens_per_s', 0):.0f})")

    def start(self, discovered: dict | None = None) -> str:
        """Start the run if it is not running yet; returns its state. `discovered`: the driver's preflight."""
        if self._thread is None:
            if discovered:
                self.c.discovered = dict(discovered)
            self._thread = threading.Thread(target=self._run, name="coordinator-run", daemon=True)
            self._thread.start()
        return self.c.state.value

    def _run(self) -> None:
        try:
            self._result = self.c.run()
        except BaseException as e:  # noqa: BLE001 - handed to the driver by `result`
            self._error = e
            log.error("run %s ended with an error: %s", self.c.cfg.run.name, e)
        finally:
            self._done.set()
        # nobody may be watching (the driver died): leave the result a while, then free the name
        if not self._fetched.wait(self.LINGER_S):
            log.warning("no driver collected the result of run %s; exiting (summary.json has it)", self.c.cfg.run.name)
        time.sleep(5.0)  # the `result` reply leaves first, and every other driver following the run gets it too
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def result(self, timeout: float | None = None) -> dict:
        """The run's summary once it ended (raises what ended it); then the actor exits."""
        if not self._done.wait(timeout):
            raise GetTimeoutError(f"run {self.c.cfg.run.name} still going")
        self._fetched.set()
        if self._error is not None:
            raise self._error
        return self._result

    def progress(self) -> dict:
        # a run whose result a driver already took is over: its name is about to be free for the next run
        return {**self.c.progress(), "result_taken": self._fetched.is_set()}

    def driver_attached(self) -> None:
        """A driver run again (the first one died) follows this run from here on."""
        self.start()
        self.c.summary.took_over(self.c.step, "a new driver")

    def pid(self) -> int:
        return os.getpid()

    def scale(self, n: int) -> int:
        return self.c.request_scale(n)

    def stop(self) -> None:
        self.c.request_stop()

    def node_faults(self) -> NodeFaults | None:
        return self.c.node_faults()

    def node_faults_done(self, step: int) -> None:
        self.c.node_faults_done(step)
