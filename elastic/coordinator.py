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
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from compression.sync import joiners_need_peer_state
from datasets import DataPlan, discover
from datasets.plan import read_margin, rebalance, windows_for
from datasets.sources import check_text_column
from elastic.chaos import ChaosSchedule
from elastic.checkpoint import CheckpointStore, to_bytes
from elastic.config import (RunConfig, checkpoint_uri, collective_timeout_s, max_workers,
                            periodic_checkpoint_due, run_dir, to_dict)
from elastic.membership import Member, MembershipGeneration, compute_shares, watchdog_timeout
from elastic.schedule import lr_at
from elastic.summary import RunSummary
from elastic import tracking
from elastic.worker import Worker

log = logging.getLogger("raydistro.coordinator")

GLOO_KV_KEY = "collective_group_master_address_default"
# rows of each neighbour's read-ahead a worker reads too, so a re-split (train.balance_rows) that moves up to
# this many documents across a cut is a read-ahead hit (on the sample corpus at 64k tokens per rank it moved
# 1-4 of ~46 documents)
READ_MARGIN_ROWS = 4


def _autoscaler_has_gpus() -> bool:
    """Whether the cluster's autoscaler can add nodes with GPUs (Ray's reported cluster config; None where the
    autoscaler does not report one, e.g. the v1 cluster launcher: then only train.device or
    train.accelerators asks for GPUs)."""
    try:
        from ray._private import state as ray_state

        most = ray_state.state.get_max_resources_from_cluster_config() or {}
    except Exception:
        return False
    return (most.get("GPU") or 0) > 0


class WorkerHandle:
    def __init__(self, worker_id: str, actor, info: dict | None = None):
        self.worker_id = worker_id
        self.actor = actor
        self.info = info or {}
        self.ready_ref = actor.prepare.remote()  # info, after the worker's one-time preparation
        self.tokens_per_s = 0.0


class Coordinator:
    """Plain class driven by the actor shell `CoordinatorActor`; every Ray call it makes is here."""

    def __init__(self, cfg: RunConfig, discovered: dict | None = None):
        self.cfg = cfg
        self.discovered = dict(discovered or {})  # shard lists the driver's preflight already read
        self.state = "FORMING"
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
        self._ahead_counts: dict[tuple[int, int, int], int] = {}  # next step's tokens per row (`_balance`)
        self.node_first_seen: dict[str, float] = {}
        self.started_at = time.time()
        self.node_chaos_ack = threading.Event()
        from elastic.metrics import RunMetrics

        self.metrics = RunMetrics(cfg.run.name)

    # ---- setup -----------------------------------------------------------------------------
    def _load_data(self) -> None:
        d, found = self.cfg.data, self.discovered
        # bad data stops the run here, with the file named, not later inside a worker
        self.shards = found.get("data.source") or discover(
            d.source, d.storage_options, text_column=d.text_column, retries=d.retries, backoff_s=d.retry_backoff_s)
        check_text_column(self.shards, d.text_column)
        self.plan = DataPlan(self.shards, seed=d.seed, epoch=0)
        self.val_shards = (found.get("data.val_source") or discover(
            d.val_source, d.storage_options, text_column=d.text_column, retries=d.retries,
            backoff_s=d.retry_backoff_s)) if d.val_source else []
        if self.val_shards:
            check_text_column(self.val_shards, d.text_column)
        # one copy in the object store, referenced by every worker spawned (a FineWeb shard list is MBs)
        self.shards_ref, self.val_shards_ref = ray.put(self.shards), ray.put(self.val_shards)
        self.discovered = {}

    def _worker_options(self) -> dict:
        if self._options is None:
            self._options = self._resolve_worker_options()
        return self._options

    def _resolve_worker_options(self) -> dict:
        """What each worker asks Ray for. It follows the config, not what the cluster has at this moment (an
        autoscaling cluster starts with no GPU node, and only demand makes it add one): `train.worker_gpus`
        if >= 0; else 1 GPU when `train.device=cuda` or `train.accelerators` names types, 0 when
        `train.device=cpu`, and with `auto` 1 GPU if the cluster has a GPU now or its autoscaler reports node
        types with GPUs (Ray's cluster config: KubeRay, autoscaler v2), else 0. `train.accelerators=[H100,A100]`
        restricts workers to nodes of those types (`accelerator_type:X`): free nodes of any listed type are used
        (`_free_nodes`), and demand for new capacity names the first type."""
        t = self.cfg.train
        self._accelerators = set(t.accelerators)
        gpus = t.worker_gpus
        if gpus < 0:
            if t.device == "cuda" or t.accelerators:
                gpus = 1.0
            elif t.device == "cpu":
                gpus = 0.0
            else:
                gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 or _autoscaler_has_gpus() else 0.0
        if gpus > 0:
            # simulated GPU nodes advertise logical GPUs: only train.device=cuda means real CUDA (nccl)
            self.backend = "nccl" if t.device == "cuda" else "gloo"
        opts: dict[str, Any] = {"num_cpus": t.worker_cpus, "num_gpus": gpus}
        if t.accelerators:
            opts["resources"] = {f"accelerator_type:{t.accelerators[0]}": 0.001}
        return opts

    def _free_nodes(self, opts: dict) -> list[dict]:
        """Alive nodes that can host one more worker right now, with their accelerator type."""
        from ray._private import state as ray_state

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
            if getattr(self, "_accelerators", None) and acc not in self._accelerators:  # train.accelerators
                continue
            out.append({"node_id": nid, "accelerator": acc, "free": free})
        return out

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
        if self.cfg.cluster.gloo_socket_ifname:  # gloo must bind the interface peers can reach
            extra["runtime_env"] = {"env_vars": {"GLOO_SOCKET_IFNAME": self.cfg.cluster.gloo_socket_ifname}}
        actor = Worker.options(
            name=name, namespace=self.cfg.cluster.namespace, max_concurrency=1, max_restarts=0,
            **{**opts, **extra},  # a free node's type replaces train.accelerators' first
        ).remote(self.cfg, wid, self.shards_ref, self.cfg.run.seed, self.val_shards_ref)
        handle = WorkerHandle(wid, actor)
        handle.info["name"] = name
        handle.info["spawned_at"] = time.time()

        return handle

    def _spawn_up_to(self, n: int) -> None:
        """Ask for workers until members + pending reach n; free nodes first, then plain demand."""
        want = n - len(self.members) - len(self.pending)
        if want <= 0:
            return
        opts = self._worker_options()
        used_nodes = {h.info.get("node_id") for h in self.members}
        # one entry per worker a node can still take, spread across nodes first: every worker we can
        # place is named for its accelerator (worker-2[A100]), not "any"
        slots = []
        for f in self._free_nodes(opts):
            fits = [(f["free"].get(r, 0) + 1e-9) // opts[k] for r, k in (("CPU", "num_cpus"), ("GPU", "num_gpus"))
                    if opts[k] > 0]
            slots += [(i, f) for i in range(int(min(fits)) if fits else want)]
        slots.sort(key=lambda s: (s[0], s[1]["node_id"] in used_nodes, s[1]["accelerator"]))
        free = [f for _, f in slots]
        for i in range(want):
            node = free[i] if i < len(free) else None
            self.pending.append(self.spawn_worker(node))

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
                    h.info["ready_at"] = time.time()
                    out.append(h)
                except RayActorError as e:
                    log.warning("worker %s failed to start: %s", h.worker_id, e)
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
            model = ckpt.tensor_file("model.pt")
            model_ref = ray.put(model)
            loads = []
            for r, h in enumerate(self.members):
                name = f"sync-rank{r}.pt"
                sync = ckpt.tensor_file(name) if name in ckpt.files else (
                    ckpt.tensor_file("sync-rank0.pt") if self._replicated_sync() and "sync-rank0.pt" in ckpt.files
                    else None)
                loads.append(h.actor.load_state.remote(model_ref, sync, self.step))
            prints = ray.get(loads)
            self._check_agree(prints, "after loading the checkpoint")
            self.summary.event(self.step, f"state-from-checkpoint {ckpt.uri}")
        elif joiners and source is not None:
            # joiners get parameters (and replicated optimizer state) from a live peer via the object store
            model_ref = source.actor.model_state.remote()
            sync_ref = source.actor.sync_state.remote() if self._replicated_sync() else None
            loads = [h.actor.load_state.remote(model_ref, sync_ref, self.step) for h in joiners]
            ray.get(loads)
            self.summary.event(self.step, f"state-from-peer {source.worker_id} -> "
                                          f"{','.join(h.worker_id for h in joiners)}")
            prints = ray.get([h.actor.fingerprint.remote() for h in self.members])
            self._check_agree(prints, "after a join")
        self.summary.world_size(self.step, world, g, [m.accelerator for m in self.generation.members])
        self.metrics.world_size.set(world)
        self.metrics.generation.set(g)

    def _join_all(self, attempts: int = 4) -> None:
        """Form the collective group of the current members; members that die meanwhile are dropped
        and the group is formed again without them (a membership change inside a membership change)."""
        from ray.experimental import internal_kv

        for attempt in range(attempts):
            g = self.generation.generation
            group = "default" if self.backend == "gloo" else f"raydistro-{self.cfg.run.name}-g{g}"
            try:  # a rank 0 that died during a previous rendezvous can leave its address behind
                internal_kv._internal_kv_del(GLOO_KV_KEY)
            except Exception:
                pass
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
            refs = [h.actor.join_group.remote(world, r, self.generation.generation, self.backend, group)
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
                try:
                    ray.kill(h.actor, no_restart=True)
                except Exception:
                    pass

    def membership_change(self, kind: str, leaving: list[WorkerHandle], joiners: list[WorkerHandle],
                          detected_at: float, capacity_at: float | None = None) -> None:
        """Stop the generation, checkpoint, re-form with new ranks; seconds_to_resume runs from
        `detected_at` (the death noticed, the joiner ready) to the next committed step. For joins,
        `capacity_at` (node appeared / worker requested) gives seconds_from_capacity as well."""
        self.state = "RESIZING"
        self._flush_commit()
        survivors = [h for h in self.members if h not in leaving]
        self._remove(leaving, kill=True)
        source = survivors[0] if survivors else None
        self.metrics.membership_changes.inc()
        if len(survivors) + len(joiners) < self.cfg.train.min_workers:
            self._pause(kind, joiners, detected_at)
            return
        if source is not None:
            self.checkpoint(reason=kind)
            self._form_group(joiners, source)
        else:  # everyone left: rebuild from the latest checkpoint, its step and data cursor included
            self.members = []
            ckpt = self.restore(mid_run=True)
            self._form_group(joiners, None, ckpt)
        self.open_changes.append({"step": self.step, "kind": kind, "detected_at": detected_at,
                                  "world_size": len(self.members), "capacity_at": capacity_at})
        self.state = "RUNNING"

    def _pause(self, kind: str, joiners: list[WorkerHandle], detected_at: float) -> None:
        """Below train.min_workers: checkpoint what survives, wait for capacity, then resume."""
        self.state = "PAUSED"
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
            self._spawn_up_to(self.cfg.train.min_workers)
            joiners += self._ready_pending(timeout=1.0)
        ckpt = None if self.members else self.restore(mid_run=True)
        source = self.members[0] if self.members else None
        if source is not None:
            self._form_group(joiners, source)
        else:
            self._form_group(joiners, None, ckpt)
        self.open_changes.append({"step": self.step, "kind": f"{kind}-resume", "detected_at": detected_at,
                                  "world_size": len(self.members)})
        self.state = "RUNNING"

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint(self, reason: str) -> str | None:
        self._flush_commit()
        if not self.members:
            return None
        t0 = time.time()
        model_ref = self.members[0].actor.model_state.remote()
        sync_refs = [h.actor.sync_state.remote() for h in self.members]
        try:
            model = ray.get(model_ref, timeout=120)
            syncs = ray.get(sync_refs, timeout=120)
        except (RayActorError, GetTimeoutError) as e:
            log.warning("checkpoint at step %d skipped: a worker did not answer (%s)", self.step, e)
            return None
        files = {"model.pt": to_bytes(model)}
        for r, s in enumerate(syncs):
            files[f"sync-rank{r}.pt"] = to_bytes(s)
        meta = {
            "step": self.step, "reason": reason, "generation": self.generation.generation,
            "members": [asdict(m) for m in self.generation.members],
            "plan": self.plan.state_dict(), "chaos": self.chaos.state_dict(),
            "summary": self.summary.state_dict(), "config": to_dict(self.cfg, redact=True),
            "next_worker_num": self.next_worker_num,
            # the next step's split depends on them: a resumed run splits it the same way
            "ahead_counts": [[*k, t] for k, t in sorted(self._ahead_counts.items())],
        }
        uri = self.store.write(self.step, meta, files)
        self.summary.checkpoint(uri, self.step, reason, time.time() - t0)
        log.info("checkpoint %s (%s) in %.2fs", uri, reason, time.time() - t0)
        return uri

    def restore(self, mid_run: bool = False):
        """Load the latest valid checkpoint's step and data cursor (and, at start, its history).

        `mid_run`: every replica was lost; the model and cursor go back to the checkpoint together (so
        documents after it are delivered again, once, to the model that did not see them), while this
        run's own record of events stays."""
        ckpt = self.store.load_latest()
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
        log.info("resuming from %s at step %d", ckpt.uri, self.step)
        self.summary.resumed_from(ckpt.uri, self.step)
        return ckpt

    # ---- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        t_start = time.time()
        self._watch_nodes()
        self.started_at = time.time()
        self._load_data()
        ckpt = self.restore()
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
        # initial replicas are built from the same seed; a checkpoint overrides them
        self._form_group(joiners, None, ckpt)
        if ckpt is None:
            prints = ray.get([h.actor.fingerprint.remote() for h in self.members])
            self._check_agree(prints, "at start")
        self.state = "RUNNING"
        self.summary.started(self.step)
        try:
            while self.step < self.cfg.train.steps and not self.stop_requested:
                self._one_step()
                if self.cfg.train.stop_at and self.step >= self.cfg.train.stop_at:
                    self.summary.event(self.step, "stop_at reached")
                    self.stop_requested = True
            self.state = "STOPPED" if self.stop_requested else "FINISHING"
            self.checkpoint(reason="stop" if self.stop_requested else "end")
            if not self.stop_requested or self.step >= self.cfg.train.steps:
                self._final_eval()
            self.state = "STOPPED" if self.stop_requested else "FINISHED"
        except Exception as e:
            self.state = "ERRORED"
            cause = getattr(e, "cause", None) or e  # a RayTaskError wraps the worker's own exception
            self.summary.error(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
            try:
                self.checkpoint(reason="error")
            except Exception:
                log.exception("could not checkpoint after the error")
            self._finish(t_start)
            raise
        return self._finish(t_start)

    def _finish(self, t_start: float) -> dict:
        self.summary.finish(self.step, self.plan.accounting(), time.time() - t_start, self.state)
        path = self.summary.write(run_dir(self.cfg))
        tracking.on_finish(self)
        self.progress_info["summary_path"] = str(path)
        self.progress_info["state"] = self.state
        for h in self.members + self.pending:
            try:
                ray.kill(h.actor, no_restart=True)
            except Exception:
                pass
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
        node_events = [e for e in due if e.kind in ("remove_node", "add_node")]
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
                if self._drain_node_of(victim):
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
        if self.draining:
            leaving = [h for h in self.members if h.worker_id in self.draining]
            self.draining.clear()
            # drained workers leave after their last committed step; the target shrinks with them
            # (a scale request already set the target it wants)
            shrink = len([h for h in leaving if h.worker_id not in self.scale_leaving])
            self.scale_leaving.clear()
            self.target_workers = max(self.cfg.train.min_workers, self.target_workers - shrink)
            self.membership_change("scale" if not shrink else "drain", leaving, [], time.time())
        # keep demand for up to train.max_workers outstanding: an autoscaler sees it and adds nodes
        mx = max_workers(self.cfg)
        grow = mx > self.cfg.train.workers and not self.scaled_explicitly  # `scale N` overrides growth
        want = max(self.target_workers, mx) if grow else self.target_workers
        while self.pending and len(self.members) + len(self.pending) > want:  # asked for fewer: cancel
            extra = self.pending.pop()
            ray.kill(extra.actor, no_restart=True)
        self._spawn_up_to(want)
        return self._ready_pending(timeout=0.0)

    def _one_step(self) -> None:
        joiners = self._control()
        if joiners:
            self.membership_change("join", [], joiners, min(j.info["ready_at"] for j in joiners),
                                   capacity_at=min(self._join_time(j) for j in joiners))
        step = self.step
        members = list(self.members)
        gen = self.generation
        for m, h in zip(gen.members, members):
            m.tokens_per_s = h.tokens_per_s
        shares = compute_shares(gen.members, self.cfg.train.batch_tokens, self.cfg.train.balance,
                                self.cfg.train.batch_tokens_by_accelerator, self.cfg.train.seq_len)
        by_rank = {r: s for r, s in enumerate(shares)}
        assignment, windows = self._balance(step, self.plan.assign(step, by_rank), by_rank)
        lr = lr_at(step, self.cfg.train.lr, self.cfg.train.warmup_steps, self.cfg.train.steps,
                   self.cfg.train.min_lr_ratio)
        due = self.chaos.due(step)
        flags: dict[int, dict] = {r: {} for r in range(len(members))}
        kill_victim = None
        for e in due:
            if e.kind in ("hang", "corrupt_payload") and len(members) > 1:
                flags[self.chaos.pick_victim(len(members))][e.kind] = True
                self.chaos.mark_done(e)
            elif e.kind == "comm_error":
                for r in flags:
                    flags[r]["comm_error"] = True
                self.chaos.mark_done(e)
            elif e.kind == "window_mismatch" and windows:  # waits for a step cut at token level
                victim = self.chaos.pick_victim(len(members))
                windows[victim] = {**windows[victim], "slots": windows[victim]["slots"] + 1}
                self.chaos.mark_done(e)
            elif e.kind == "kill" and len(members) > 1:
                kill_victim = members[self.chaos.pick_victim(len(members))]
                self.chaos.mark_done(e)
        t0 = time.time()
        # the decision to commit the previous step rides on this step's call: one RPC per step
        commit_first, self.pending_commit = self.pending_commit, None
        # what the next step will likely bring, read by the workers while this one computes (a hint: the
        # plan is unchanged; an abort or a new share split only makes the workers read again)
        hint = (self.plan.peek(by_rank)
                if self.cfg.train.prefetch and step + 1 < self.cfg.train.steps else {})
        margin = read_margin(hint, READ_MARGIN_ROWS) if hint and self.cfg.train.balance_rows else {}
        refs = {h.actor.step.remote(step, assignment.get(r, []), lr, flags[r], commit_first, hint.get(r),
                                    margin.get(r), windows.get(r)): h
                for r, h in enumerate(members)}
        if kill_victim is not None:
            time.sleep(min(0.2, 0.3 * (statistics.median(self.recent_step_s) if self.recent_step_s else 0.1)))
            self.summary.event(step, f"chaos-kill {kill_victim.worker_id}")
            ray.kill(kill_victim.actor, no_restart=True)
        reports, dead, hung = self._collect(refs, t0)
        if commit_first is not None:
            prints = [r["fingerprint"] for r in reports.values() if r.get("committed_step") == commit_first]
            if prints:
                self._check_agree(prints, f"after step {commit_first}")
        failed = dead or hung or any(not r.get("ok") for r in reports.values())
        if not failed:
            self._finish_commit(step, members, reports, time.time() - t0)
            return
        # ---- the step failed: nobody applies it; find who must leave; retry the step -----------
        detected = time.time()
        by_id = {h.worker_id: h for h in members}
        data_errors = [r for r in reports.values() if r.get("data_error")]
        # a worker that failed before the exchange abstained with a NaN weight, so peers name it as a bad
        # sender: it is the origin, not a garbage sender; its own report says why. A window cut for other
        # token counts than its documents have is the data's doing, not the worker's: retried in whole documents
        mismatch = any(r.get("window_mismatch") for r in reports.values())
        abstained = {by_id[r["worker_id"]] for r in reports.values() if r.get("pre_exchange")}
        origins = {h for h in abstained if not reports[h.worker_id].get("window_mismatch")}
        bad_senders = {r.get("bad_sender") for r in reports.values() if r.get("bad_sender") is not None}
        garbage = {members[rank] for rank in bad_senders
                   if rank is not None and 0 <= rank < len(members) and members[rank] not in abstained}
        leaving = set(dead) | set(hung) | garbage
        if not data_errors:
            leaving |= origins  # e.g. out of memory, a broken device: that worker leaves
        survivors = [h for h in members if h not in leaving]
        aborts = [h.actor.abort.remote(step) for h in survivors]
        try:
            ray.get(aborts, timeout=30)
        except Exception as e:  # a survivor that cannot even abort leaves too
            log.warning("abort failed on a survivor: %s", e)
            for h, ref in zip(survivors, aborts):
                try:
                    ray.get(ref, timeout=0)
                except Exception:
                    leaving.add(h)
        self.plan.abort(step)
        errors = {h.worker_id: reports.get(h.worker_id, {}).get("error") for h in members
                  if not reports.get(h.worker_id, {}).get("ok")}
        if data_errors:
            # the data source is down for everyone: stop with the run checkpointed, nothing lost
            self.summary.event(step, "step-aborted data-source-error")
            self.checkpoint(reason="data-error")
            raise DataUnavailable(f"step {step}: {data_errors[0]['error']} (run checkpointed at step {self.step}; "
                                  "resubmit to resume once the source is back)")
        self.failures_at_step = self.failures_at_step + 1 if self.failed_step == step else 1
        self.failed_step = step
        if self.failures_at_step > MAX_ATTEMPTS_PER_STEP:
            self.checkpoint(reason="step-failures")
            raise StepKeepsFailing(f"step {step} failed {self.failures_at_step} times in a row; last errors: "
                                   f"{errors}; run checkpointed at step {self.step}")
        # ranks whose collective failed closed their side of the group (worker `_leave_group`)
        group_closed = any(r.get("left_group") for r in reports.values())
        kind = ("corrupt_payload" if garbage and not origins else "hang" if hung
                else "death" if dead else "worker_error" if origins
                else "collective_error" if group_closed else "window_mismatch" if mismatch else "step_failed")
        log.warning("step %d failed (%s): leaving=%s errors=%s", step, kind,
                    [h.worker_id for h in leaving], errors)
        self.summary.event(step, f"step-aborted {kind} leaving={[h.worker_id for h in leaving]}")
        if not leaving:
            if group_closed:
                # the collective failed with nobody to blame (a transient NCCL/gloo error): the ranks it
                # failed on closed their side of the group, so re-form it (same members, new generation)
                # before the retry instead of retrying into a group that no longer exists
                self.membership_change("regroup", [], [], detected)
                return
            # nobody to blame (e.g. a non-finite dense all-reduce): drop the step and retry it
            self.summary.rejected_step(step, errors)
            return
        self.membership_change(kind, list(leaving), [], detected)

    def _balance(self, step: int, assignment: dict, shares: dict[int, int]) -> tuple[dict, dict]:
        """Re-split `step`'s documents over the ranks by their real token counts (read ahead by the workers
        during the previous step), so nobody waits for a peer that drew longer documents. With
        `train.split_docs` the step's stream is cut at token level (`split_windows`: every rank trains
        whole rows in proportion to its share; a document at a cut is trained in part by each neighbour);
        otherwise whole documents move at the cuts between neighbouring ranks. The step's documents stay the
        same. Without counts for every row (the first step, after a failure or a membership change, a read
        ahead that failed) the plan's split stands. Returns (rank -> ranges, rank -> window JSON or nothing)."""
        counts, self._ahead_counts = self._ahead_counts, {}
        if not (self.cfg.train.prefetch and self.cfg.train.balance_rows) or not counts:
            return assignment, {}
        wins = windows_for(assignment, counts, shares, self.cfg.train.seq_len) if self.cfg.train.split_docs else None
        owned = {k: list(w.owned) for k, w in wins.items()} if wins is not None else None
        if owned is not None and self.plan.resplit(step, owned):
            self.summary.data["rebalanced_steps"] += 1
            self.summary.data["split_steps"] += 1
            return owned, {k: w.to_json() for k, w in wins.items()}
        new = rebalance(assignment, counts, shares, self.cfg.train.seq_len)
        if new is None or not self.plan.resplit(step, new):
            return assignment, {}
        self.summary.data["rebalanced_steps"] += 1
        return new, {}

    def _join_time(self, h: WorkerHandle) -> float:
        """When the capacity a joiner uses appeared: its node's first sighting, else its spawn."""
        node_seen = self.node_first_seen.get(h.info.get("node_id", ""), None)
        if node_seen is not None and node_seen <= self.started_at:
            node_seen = None  # the node was there from the start: the join began at the spawn
        return min(t for t in (node_seen, h.info.get("spawned_at"), h.info.get("ready_at", time.time()))
                   if t is not None)

    def _await_node_chaos(self, events) -> None:
        """Node removal/addition is done by the driver that owns the simulated cluster: hold the step
        until it acknowledges, so the event lands exactly at its step however fast steps are."""
        self.node_chaos_ack.clear()
        with self.lock:
            self.progress_info["node_chaos_step"] = self.step
            self.progress_info["member_nodes"] = [h.info.get("node_id", "") for h in self.members]
        if not self.node_chaos_ack.wait(timeout=120):
            log.warning("node chaos at step %d: the driver did not act within 120 s; going on", self.step)
        with self.lock:
            self.progress_info.pop("node_chaos_step", None)
            self.progress_info.pop("member_nodes", None)
        for e in events:
            self.chaos.mark_done(e)
            self.summary.event(self.step, f"chaos-{e.kind.replace('_', '-')}")

    def node_chaos_done(self, step: int) -> None:
        self.node_chaos_ack.set()

    def _drain_node_of(self, victim: WorkerHandle, grace_s: float = 60.0) -> bool:
        """Drain the victim's node through the GCS, as a preemption notice would (not the head)."""
        node_id = victim.info.get("node_id")
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

    def _watch_nodes(self) -> None:
        now = time.time()
        for node in ray.nodes():
            if node.get("Alive") and node["NodeID"] not in self.node_first_seen:
                self.node_first_seen[node["NodeID"]] = now

    def _collect(self, refs: dict, t0: float) -> tuple[dict, list, list]:
        """Wait for every report under the watchdog; classify dead and hung workers."""
        timeout = watchdog_timeout(self.recent_step_s, self.cfg.train.step_timeout_s, self.cfg.train.hang_factor)
        pending = list(refs)
        reports: dict[str, dict] = {}
        dead: list[WorkerHandle] = []
        hung: list[WorkerHandle] = []
        deadline = t0 + timeout
        first_failure_at = None
        while pending:
            # once one worker failed, the others fail fast (gloo reports closed peers in ~30 ms)
            limit = deadline if first_failure_at is None else min(deadline, first_failure_at + 10.0)
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, limit - time.time()))
            if not ready:
                break
            for ref in ready:
                h = refs[ref]
                try:
                    rep = ray.get(ref)
                    reports[h.worker_id] = rep
                    if not rep.get("ok"):
                        first_failure_at = first_failure_at or time.time()
                except RayActorError:
                    dead.append(h)
                    first_failure_at = first_failure_at or time.time()
        if pending:
            # stragglers: alive but silent is a hang; a worker that does not answer a ping is gone
            phases = {}
            for ref in pending:
                h = refs[ref]
                try:
                    phases[h] = ray.get(h.actor.ping.remote(), timeout=5)
                except Exception:
                    dead.append(h)
            if dead:
                # a peer is gone: the others are blocked on it (or slow), not hung; gloo fails them when
                # it sees the closed connection, at the latest at the collective timeout
                grace = collective_timeout_s(self.cfg) + 5.0
                hung += [h for h, phase in phases.items() if phase == "hung"]
            else:
                grace = 15.0
                hung += [h for h, phase in phases.items() if phase in ("hung", "compute")]
                if not hung:  # all stuck in the exchange: nobody to blame but everybody waits
                    hung = list(phases)
            for h in hung:
                ray.kill(h.actor, no_restart=True)
            # the others were waiting for the hung or dead peer; they now fail fast, collect them
            rest = [r for r in pending if refs[r] not in hung and refs[r] not in dead]
            if rest:
                ready, still = ray.wait(rest, num_returns=len(rest), timeout=grace)
                for ref in ready:
                    try:
                        reports[refs[ref].worker_id] = ray.get(ref)
                    except RayActorError:
                        dead.append(refs[ref])
                for ref in still:
                    hung.append(refs[ref])
                    ray.kill(refs[ref].actor, no_restart=True)
        return reports, dead, hung

    def _flush_commit(self) -> None:
        """Apply a decided-but-not-yet-sent commit on every member now (before a checkpoint, a membership
        change or the end). Members that cannot be reached are left to the failure handling."""
        step, self.pending_commit = self.pending_commit, None
        if step is None:
            return
        refs = [(h, h.actor.commit.remote(step)) for h in self.members]
        prints = []
        for h, ref in refs:
            try:
                prints.append(ray.get(ref, timeout=60))
            except Exception as e:
                log.warning("commit of step %d on %s: %s", step, h.worker_id, str(e).splitlines()[0])
        if prints:
            self._check_agree(prints, f"after step {step}")

    def _finish_commit(self, step, members, reports, wall) -> None:
        """Every rank exchanged step `step`: it is committed (workers apply it at their next call)."""
        agree = True  # fingerprints arrive with the next call; a disagreement is recorded then
        self.plan.commit(step, dropped=[d for r in reports.values() for d in r.get("dropped", [])])
        # what the workers read ahead for the next step, per row: `_balance` splits that step with it
        self._ahead_counts = {(s, g, x): t for r in reports.values() for s, g, x, t in r.get("ahead_tokens", [])}
        self.pending_commit = step
        self.step = step + 1
        self.recent_step_s.append(wall)
        self.recent_step_s = self.recent_step_s[-50:]
        for h in members:
            rep = reports.get(h.worker_id)
            if rep and rep.get("ok"):
                h.tokens_per_s = rep.get("tokens", 0) / max(1e-9, rep.get("compute_s", 1e-9))
        ok_reports = [r for r in reports.values() if r.get("ok")]
        for r in ok_reports:  # train.profile_at: each worker's profiler summary, once
            if r.get("profile"):
                self.summary.data["profiles"][r["worker_id"]] = {"last_step": step, **r["profile"]}
        tokens = sum(r["tokens"] for r in ok_reports)
        loss = sum(r["loss"] * r["tokens"] for r in ok_reports) / max(1, tokens)
        self.summary.step(step, loss, tokens, ok_reports, agree, wall)
        now = time.time()
        for c in self.open_changes:
            self.summary.membership_change(c["step"], c["kind"], now - c["detected_at"], c["world_size"],
                                           now - c["capacity_at"] if c.get("capacity_at") else None)
        self.open_changes = []
        tracking.on_commit(self, step, loss, tokens, ok_reports, wall)  # metrics.jsonl, TensorBoard, W&B, MLflow
        sent = self.summary.sent_per_step_mean()  # over the run: diloco sends only at outer steps
        dense = statistics.mean(r.get("dense_equivalent_bytes", 0) for r in ok_reports) if ok_reports else 0
        self.metrics.loss.set(loss)
        self.metrics.step.set(self.step)
        self.metrics.tokens_per_s.set(tokens / max(1e-9, wall))
        if sent:
            self.metrics.compression_ratio.set(dense / sent)
        self.metrics.data_lag_s.set(max((r.get("read_s", 0.0) for r in ok_reports), default=0.0))
        with self.lock:
            self.progress_info.update(
                step=self.step, total=self.cfg.train.steps, loss=loss, tokens_per_s=tokens / max(1e-9, wall),
                bytes_sent=sent, dense_bytes=dense, world_size=len(members),
                generation=self.generation.generation, state=self.state,
                accelerators=[m.accelerator for m in self.generation.members],
                changes=len(self.summary.data["membership_changes"]),
            )
        if periodic_checkpoint_due(self.cfg, self.step):
            self.checkpoint(reason="periodic")

    # ---- control from outside ---------------------------------------------------------------
    def progress(self) -> dict:
        with self.lock:
            info = dict(self.progress_info)
        info.setdefault("step", self.step)
        info.setdefault("total", self.cfg.train.steps)
        info["state"] = self.state
        info["recent_events"] = self.summary.data["events"][-5:]
        info["change_kinds"] = dict(Counter(c["kind"] for c in self.summary.data["membership_changes"]))
        return info

    def request_scale(self, n: int) -> int:
        self.scaled_explicitly = True
        self.target_workers = max(self.cfg.train.min_workers, int(n))
        if self.target_workers < len(self.members):
            extra = len(self.members) - self.target_workers
            for h in self.members[-extra:]:
                self.draining.add(h.worker_id)
                self.scale_leaving.add(h.worker_id)
        self.summary.event(self.step, f"scale-request {n}")
        return self.target_workers

    def request_stop(self) -> None:
        self.stop_requested = True


MAX_ATTEMPTS_PER_STEP = 5


class PausedTooLong(RuntimeError):
    pass


class DataUnavailable(RuntimeError):
    pass


class StepKeepsFailing(RuntimeError):
    pass


@ray.remote(num_cpus=0, max_concurrency=8)
class CoordinatorActor:
    """Actor shell (named raydistro/<run>/coordinator); `run` blocks, the rest answer meanwhile."""

    def __init__(self, cfg: RunConfig, discovered: dict | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.c = Coordinator(cfg, discovered)

    def __repr__(self) -> str:
        # taken once by Ray after __init__ (dashboard actor list, log prefix): no stale live fields there
        if self.c.generation.generation < 0:
            return f"Coordinator({self.c.cfg.run.name} sync={self.c.cfg.sync.name} steps={self.c.cfg.train.steps})"
        p = self.c.progress_info
        return (f"Coordinator({self.c.cfg.run.name} {self.c.state} gen={self.c.generation.generation} "
                f"step={self.c.step}/{self.c.cfg.train.steps} world={len(self.c.members)} "
                f"tok/s={p.get('tokens_per_s', 0):.0f})")

    def run(self) -> dict:
        return self.c.run()

    def progress(self) -> dict:
        return self.c.progress()

    def scale(self, n: int) -> int:
        return self.c.request_scale(n)

    def stop(self) -> None:
        self.c.request_stop()

    def node_chaos_done(self, step: int) -> None:
        self.c.node_chaos_done(step)
