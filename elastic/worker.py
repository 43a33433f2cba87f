"""The worker actor: one model replica, its sync state, and its data (`datasets.StepLoader`, one call a step).

Thin by design: the math is in `compression`, the data in `datasets`, decisions in the coordinator.
A step is two-phase (`step` computes and exchanges, `commit`/`abort` applies or drops), so the
coordinator can make every survivor apply a step or none. Control calls (`ping`, `info`, `phase`) run
in their own concurrency group so they answer even while the compute thread is stuck in a collective.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import os
import socket
import time
import traceback
import typing

import ray
import torch

from compression import PayloadError, RayCollectiveCommunicator, build_sync
from datasets import Carry, DataSourceError, DocRange, StepLoader, Window, WindowMismatch, get_tokenizer
from elastic import rendezvous
from elastic.chaos import step_faults_for, wrap_for_chaos
from elastic.checkpoint import (BackgroundWrites, HostSnapshot, checkpoint_layout, load_file, load_tensors,
                                state_trees)
from elastic.config import RunConfig, collective_timeout_s, sync_boundary
from elastic.attention import AttentionShapes
from elastic.fingerprint import PendingFingerprint, params_fingerprint, params_fingerprint_async
from elastic.messages import StepCall, StepReport, WorkerStatus
from elastic.model import CompiledLoss, build_model, compile_enabled
from elastic.profiling import StepProfiler
from elastic.topology import abort_node_groups, node_communicators, release_node_groups
from elastic.state_transfer import PackedState, pack_state, unpack_state

log = logging.getLogger("raydistro.worker")
DATA_ERRORS = (DataSourceError,)


def detect_accelerator(device: str) -> str:
    """The accelerator type Ray advertises for this node (accelerator_type:X), else the CUDA name."""
    try:
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                for key in node.get("Resources", {}):
                    if key.startswith("accelerator_type:"):
                        return key.split(":", 1)[1]
    except Exception:  # outside Ray (unit tests): fall through
        pass
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for short in ("H200", "H100", "A100", "A10G", "L40S", "L4", "T4", "V100"):
            if short in name:
                return short
        return name.replace(" ", "_")
    return "CPU"


class _Computed(typing.NamedTuple):
    """A step's forward/backward and what its batch answers for."""
    tokens: int
    loss_sum: float
    docs: int
    dropped: list
    read_s: float
    fwd_bwd_s: float
    doc_slots: int
    rows: int
    carry_out: list | None  # datasets.Carry.to_list() of the tail left for the next step (train.carry_tail)


class _Cancelled(Exception):
    """A step computed ahead was told to stop between micro-batches: its call brought other rows."""


@dataclasses.dataclass
class _Ahead:
    """The next step's forward/backward, started on its read-ahead rows as soon as this step's update was
    applied ahead (`train.compute_ahead`), before the coordinator's call for it arrives. Its gradients are the
    step's only if the call brings exactly these rows (no window) and the parameters are still the ones it ran
    on (`version`): a call that commits otherwise, a re-sync, a restore or a fault discards it."""
    step: int
    ranges: tuple
    carry: list | None                 # the carried tail it starts with (its previous step's carry_out)
    cut: bool                          # whether it may leave its own tail to the step after it
    version: int                       # WorkerReplica._params_version it computed on
    started: float                     # time.time() at its start: the step's compute starts here
    future: concurrent.futures.Future | None = None  # on the compute thread
    loaded: threading.Event = dataclasses.field(default_factory=threading.Event)  # its rows are read: the
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)  # loader is free again
    result: _Computed | None = None
    error: BaseException | None = None


class WorkerReplica:
    """Everything a worker does, without Ray: usable in one process for tests."""

    def __init__(self, cfg: RunConfig, worker_id: str, shards: list, seed: int, val_shards: list | None = None):
        self.cfg = cfg
        self.worker_id = worker_id
        torch.set_num_threads(max(1, cfg.train.threads_per_worker))
        want = cfg.train.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but this worker sees no CUDA device; use train.device=auto")
        self.device = torch.device("cuda", 0) if want == "cuda" else torch.device("cpu")
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)
        self.model = build_model(cfg.model, self.tokenizer.vocab_size, seed).to(self.device)
        self.params = [p for p in self.model.parameters()]
        # train.compile: the steps' forward+loss through torch.compile (compiled in `prepare`), else eager
        # (a compile mid-step keeps bumping `progress`: the liveness watch sees a busy worker, not a stuck one)
        self.compiled = (CompiledLoss(self.model, name=cfg.model.hf or f"GPT {cfg.model.n_layer}x{cfg.model.n_embd}",
                                      heartbeat=self._compile_beat)
                         if compile_enabled(cfg.train.compile, self.device) else None)
        # replica fingerprints every N committed steps (and at every commit the coordinator waits on)
        self.fingerprint_every = cfg.train.fingerprint_every or (10 if self.device.type == "cuda" else 1)
        # the step's data, read ahead in a child process on CUDA workers, where a thread's share of the GIL
        # would slow the kernel launches (`train.prefetch_in`)
        where = cfg.train.prefetch_in
        self.data = StepLoader(shards, cfg.data, cfg.train.seq_len, tokenizer=self.tokenizer, name=worker_id,
                               read_ahead_in=("process" if self.device.type == "cuda" else "thread")
                               if where == "auto" else where)
        # held-out documents have their own shard list: DocRange.shard indexes the reader's list
        self.val_shards = list(val_shards or [])
        self._val_data: StepLoader | None = None  # built at the first `evaluate`
        self.sync = None
        self.comm = None
        self.group_name = ""
        self.rank = -1
        self.world_size = 0
        self.generation = -1
        self.step_count = 0  # committed steps applied to these parameters
        self.phase = "idle"
        self.progress = 0  # bumped at every phase change and micro-batch: what liveness pings look at
        self.pending_step: int | None = None
        self.last_fingerprint = ""
        self._pending_fingerprint: PendingFingerprint | None = None
        # train.apply_ahead: the step applied (undo kept) in a thread while the coordinator decides
        self._applied_ahead: int | None = None
        self._apply_thread: threading.Thread | None = None
        self._apply_error: BaseException | None = None
        self._apply_ahead_on = cfg.train.apply_ahead
        # train.compute_ahead: the next step's fwd/bwd started before its call; `_params_version` changes with
        # anything that changes the parameters or the gradients other than the applied-ahead step's commit
        self._ahead: _Ahead | None = None
        self._params_version = 0
        # every forward/backward runs on this one thread: cuDNN caches its attention graphs per thread
        # (`elastic.attention`), so the warm-up in `prepare`, the steps and the steps computed ahead share them
        self._compute_ident: int | None = None
        self._compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{worker_id}-compute",
                                                              initializer=self._compute_thread_start)
        self.tokens_per_s = 0.0
        self.micro_rows = max(1, cfg.train.micro_batch_tokens // cfg.train.seq_len)
        self.use_bf16 = cfg.train.dtype == "bfloat16" and self.device.type == "cuda"
        self.attention = AttentionShapes(self.device, self.micro_rows, cfg.train.attention_warm_rows)
        self.profiler = StepProfiler(cfg.train.profile_at, cfg.train.profile_steps, self.device.type == "cuda")
        self.faults = step_faults_for(cfg.chaos, worker_id)  # None unless the chaos section schedules step faults
        self.checkpoint_writes = BackgroundWrites(worker_id)  # this worker's part of checkpoints, written in a thread
        self.pinned_ahead = False  # checkpoint buffers pinned (once, in `prepare`)

    def prepare(self) -> float:
        """One-time work before the first step, in the thread that will run the steps: cuDNN attention
        graphs for every micro-batch row count (see `elastic.attention`; skipped for models that name no layer
        for it, e.g. Hugging Face models), then with `train.compile` the compiled forward+loss, on a dummy batch
        whose gradients are dropped (`CompiledLoss.warm_up`: parameters, sync state and RNG untouched, so
        replicas stay bit-identical), before the worker counts as ready: no step waits for the compiler.
        Returns the seconds it took. Runs on the compute thread (`on_compute_thread`)."""
        return self.on_compute_thread(self._prepare)

    def on_compute_thread(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on the thread every forward/backward runs on, waiting for it."""
        if self._on_compute_thread():
            return fn(*args, **kwargs)
        return self._compute.submit(fn, *args, **kwargs).result()

    def _compute_thread_start(self) -> None:
        self._compute_ident = threading.get_ident()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _on_compute_thread(self) -> bool:
        return threading.get_ident() == self._compute_ident

    def _prepare(self) -> float:
        self._pin_checkpoint_buffers()
        attn = self.model.warmup_attention()
        took = 0.0
        if attn is not None:
            took += self.attention.prepare(attn, self.cfg.train.seq_len, self.model.shape.n_embd, self.use_bf16)
        if self.compiled is not None:
            took += self.compiled.warm_up(self.micro_rows, self.cfg.train.seq_len, self.model.shape.vocab_size,
                                          self.device, self.use_bf16)
        return took

    def _pin_checkpoint_buffers(self) -> None:
        """On CUDA (`checkpoint.pin_ahead`): build the sync strategy now (its group comes at `join_group`) and
        pin host buffers for the parameters and its state, so no checkpoint pins memory while steps run."""
        if self.pinned_ahead or self.device.type != "cuda" or not self.cfg.checkpoint.pin_ahead:
            return
        self.pinned_ahead = True  # `prepare` runs before every step too (a no-op once done): pin only once
        if self.sync is None:
            self.sync = build_sync(self.cfg.sync, self.params, None)  # bound to its group at join_group
        t0 = time.perf_counter()
        n = self.checkpoint_writes.pinned.reserve(checkpoint_layout(self.model, self.sync))
        log.info("%s pinned %.2f GB of host memory for checkpoints in %.2fs (checkpoint.pin_ahead)",
                 self.worker_id, n / 1e9, time.perf_counter() - t0)

    # ---- membership ----------------------------------------------------------------------
    def join_group(self, world_size: int, rank: int, generation: int, backend: str, group_name: str,
                   hierarchy: dict | None = None) -> None:
        """Join generation `generation`'s group as `rank`. `hierarchy` (sync.hierarchy=node): this rank's entry of
        `elastic.topology.hierarchy_layout`; the node's group and the shard's cross-node group are formed too."""
        self._settle()
        t0 = time.time()
        if backend == "gloo":
            # torch's default is 30 minutes: a member that dies during the rendezvous would hold the
            # survivors that long. Bounded, they fail and the coordinator re-forms without it.
            import datetime

            import torch.distributed.distributed_c10d as c10d

            c10d.default_pg_timeout = datetime.timedelta(seconds=collective_timeout_s(self.cfg))
        # the previous generation's group goes first, with its communicators and NCCL store actor
        release_node_groups()  # sync.hierarchy=node's gloo subgroups of it (if any) with it
        rendezvous.join(world_size, rank, backend, group_name, previous=self.group_name)
        comm = RayCollectiveCommunicator(group_name)
        self.node_group_handles = []
        if hierarchy is None:
            comm = wire = wrap_for_chaos(comm, self.cfg.chaos, seed=generation * 131 + rank)
        else:  # payloads cross nodes on the cross group only (a dense-only rank has the node's): chaos acts there
            comm, self.node_group_handles = node_communicators(hierarchy, rank, backend, collective_timeout_s(self.cfg))
            on = "cross" if comm.cross is not None else "local"
            wire = wrap_for_chaos(getattr(comm, on), self.cfg.chaos, seed=generation * 131 + rank)
            comm = dataclasses.replace(comm, **{on: wire})
        self._bind_sync(comm)
        self.comm = wire  # what a step's chaos.corrupt_payload / comm_error arms (`wire_injector`)
        self.group_name = group_name
        self.rank, self.world_size, self.generation = rank, world_size, generation
        self.phase = "idle"
        log.info("%s joined generation %d as rank %d/%d in %.2fs", self.worker_id, generation, rank,
                 world_size, time.time() - t0)

    def join_local(self, comm, rank: int = 0, world_size: int = 1) -> None:
        """Train in a group formed inside this process (`compression.communicator.ThreadCommunicator`: tests,
        `bench-gpu`'s one-worker profile) instead of a Ray collective group: the sync is built on (or rebound
        to) `comm`. Steps then run as in `join_group`'s groups."""
        self._settle()
        self._bind_sync(comm)
        self.comm, self.rank, self.world_size = comm, rank, world_size
        self.phase = "idle"

    def _bind_sync(self, comm) -> None:
        """The sync on `comm`: built at the first group, rebound (its state kept) at every later one."""
        if self.sync is None:
            self.sync = build_sync(self.cfg.sync, self.params, comm)
        else:
            self.sync.rebind(comm)

    # ---- one step ------------------------------------------------------------------------
    def step(self, call: StepCall) -> StepReport:
        """Commit step `call.commit_first` if given (the coordinator's decision rides on the next step's call:
        one RPC per step), then compute and exchange step `call.step`. `call.prefetch`: the documents the next
        step will likely bring (`DataPlan.peek`), read and tokenized in the background while this step
        computes; `call.prefetch_margin`: neighbours' rows next to them, read too, which a re-split may move to
        this rank. `call.window` (`datasets.Window.to_json`): this step is cut between the ranks at token
        level; train on that window of the stream of its rows (`call.ranges` are its owned rows).
        `call.next_fixed` (`train.compute_ahead`): the next call will bring exactly `call.prefetch` if this
        step commits, so its forward/backward starts as soon as this step is applied ahead (`_compute_ahead`),
        and that call finds its gradients computed.

        Whatever fails here, the worker still takes part in the step's collective (abstaining with a NaN
        weight), so its peers reject the step at once instead of blocking on it."""
        t_call = time.time()
        ahead = self._take_ahead(call)  # joined: nothing else computes on the parameters from here
        # the rest on the compute thread, where the forward/backward runs: a profiled step (train.profile_at)
        # sees its phases in one thread
        return self.on_compute_thread(self._step, call, ahead, t_call)

    def _step(self, call: StepCall, ahead: "_Ahead | None", t_call: float) -> StepReport:
        step, chaos = call.step, call.chaos
        t0 = time.time()
        self.profiler.start(step)
        report = StepReport(self.worker_id, self.rank, step, ok=False)
        self._settle(keep_step=call.commit_first)  # what was applied ahead stays only if this call commits it
        self._bump("compute")
        boundary = sync_boundary(self.cfg, step)
        if call.commit_first is not None:
            report.committed_step = call.commit_first
            try:
                if self.faults:
                    self.faults.before_commit(chaos, call.commit_first)
                with self.profiler.phase("commit"):
                    self.commit(call.commit_first, wait=False)  # the fingerprint is read after the fwd/bwd
                if self.faults and self.faults.after_commit(chaos, call.commit_first, self.params):
                    self._params_version += 1
                    self._start_fingerprint(call.commit_first + 1)
            except Exception as e:
                # the parameters may be half-updated: this replica must not train on, nor be anyone's source.
                # Its peers applied the step: it is committed; this rank takes part in the collective only to
                # release them, and the coordinator evicts it.
                self.pending_step = step
                self._abstain(call.lr, boundary)
                self._bump("failed")
                report.update_error(e, commit_failed=True, pre_exchange=True)
                report.traceback = traceback.format_exc()
                return report
        report.commit_s = time.time() - t0
        self.pending_step = step
        self._bump("compute")
        if ahead is not None and ahead.version != self._params_version:
            log.info("%s: step %d was computed ahead on parameters since changed; computing it again",
                     self.worker_id, step)
            ahead = None
        started = ahead.started if ahead is not None else t_call  # the step's compute began here
        try:
            if ahead is not None:
                done = ahead.result
                report.ahead_s = t_call - ahead.started
            else:
                done = self.on_compute_thread(
                    self._forward_backward, call.ranges, call.prefetch, call.prefetch_margin,
                    Window.from_json(call.window) if call.window else None, carry=call.carry, cut=call.cut_tail)
        except Exception as e:
            self._abstain(call.lr, boundary)
            self._bump("failed")
            if call.commit_first is not None:
                report.fingerprint = self.fingerprint_result()
            error = None
            if isinstance(e, torch.OutOfMemoryError):
                error = (f"{type(e).__name__} with micro-batches of {self.micro_rows} rows: lower "
                         f"train.micro_batch_tokens (now {self.cfg.train.micro_batch_tokens}). {e}")
            report.update_error(e, error=error, pre_exchange=True, window_mismatch=isinstance(e, WindowMismatch),
                                data_error=isinstance(e, DATA_ERRORS))
            report.traceback = traceback.format_exc()
            return report
        report.compute_s = time.time() - started
        if call.commit_first is not None:
            report.fingerprint = self.fingerprint_result()  # long done: the loss read synced the device
        if self.faults:
            self.faults.before_exchange(chaos, step, self.comm, on_hang=lambda: setattr(self, "phase", "hung"))
        self._bump("exchange")
        report.tokens, report.docs, report.loss = done.tokens, done.docs, done.loss_sum / max(1, done.tokens)
        report.read_s, report.fwd_bwd_s, report.dropped = done.read_s, done.fwd_bwd_s, done.dropped
        report.doc_slots, report.rows, report.carry_out = done.doc_slots, done.rows, done.carry_out
        try:
            with self.profiler.phase("exchange"):
                stats = self.sync.exchange(lr=call.lr, weight=float(done.tokens), weight_decay=self.cfg.train.weight_decay,
                                           boundary=boundary, step=step)  # the header's step: replays are refused
        except PayloadError as e:
            self._bump("failed")
            report.error, report.bad_sender = f"payload: {e}", e.sender_rank
            return report
        except Exception as e:  # a peer died mid-collective: gloo raises "Connection closed by peer"
            self._bump("failed")
            self._leave_group()
            report.update_error(e, left_group=True)
            return report
        self._bump("exchanged")
        report.ok = True
        if self.cfg.train.balance_rows:
            report.ahead_tokens = self.data.ahead_tokens()
        report.profile = self.profiler.finish(step)
        if self._apply_ahead_on and self.sync.supports_undo:
            self._apply_ahead(step)
            if call.next_fixed and call.prefetch and self.cfg.train.compute_ahead \
                    and not self.profiler.active_at(step + 1):
                self._compute_ahead(step + 1, call.prefetch, done.carry_out, call.next_cut_tail)
        report.step_s = time.time() - started
        report.bytes_sent, report.bytes_received = stats.bytes_sent, stats.bytes_received
        report.local_bytes_sent = stats.local_bytes_sent  # sync.hierarchy=node: the in-node traffic
        report.dense_equivalent_bytes, report.codec_ms, report.comm_ms = (
            stats.dense_equivalent_bytes, stats.codec_ms, stats.comm_ms)
        return report

    def _bump(self, phase: str) -> None:
        """A sign of progress the coordinator's pings see (`WorkerStatus.progress`)."""
        self.phase = phase
        self.progress += 1

    def _forward_backward(self, ranges: list[DocRange], prefetch: list[DocRange] | None = None,
                          margin: list[DocRange] | None = None, window: Window | None = None,
                          loaded: threading.Event | None = None, cancel: threading.Event | None = None,
                          carry: list | None = None, cut: bool = False) -> _Computed:
        """The step's batch from `datasets` (one call: read, packed, counted; the next step's documents read
        ahead while this one computes), then its gradients. `carry`/`cut`: the tail carried in from the
        previous step, and whether this step may leave its own to the next (`train.carry_tail`). `loaded` is
        set once the rows are read (the loader is free); `cancel`, checked before each micro-batch, stops it
        (`_Cancelled`)."""
        self._bump("read")  # bounded by data.read_timeout_s, not by the liveness limit
        with self.profiler.phase("read"):
            try:
                batch = self.data.load(ranges, window, prefetch, margin,
                                       carry=Carry.from_list(carry) if carry else None, cut=cut)
            finally:
                if loaded is not None:
                    loaded.set()
            t0 = time.time()
            inputs, targets = self._pinned(batch.inputs, batch.targets)
            read_s = batch.read_s + time.time() - t0  # the pinned copy is part of having the rows
        self._bump("compute")
        t1 = time.time()
        with self.profiler.phase("fwd_bwd"):
            loss_acc = self._fwd_bwd(inputs, targets, batch.tokens, cancel)
        loss_sum = float(loss_acc)  # the one host sync of the step
        return _Computed(batch.tokens, loss_sum, batch.docs, batch.dropped, read_s, time.time() - t1, batch.doc_slots,
                         int(inputs.size(0)), batch.carry_out.to_list() if batch.carry_out else None)

    def _pinned(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def _compile_beat(self) -> None:
        self.progress += 1  # from CompileHeartbeat's thread, while torch.compile works

    def _eager_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y)[1]  # not the logits: they would stay alive through the next forward

    def _fwd_bwd(self, inputs: torch.Tensor, targets: torch.Tensor, tokens: int,
                 cancel: threading.Event | None = None) -> torch.Tensor:
        """Gradients of the mean loss over `tokens` target tokens, in micro-batches; returns the summed loss
        on the device (read once by the caller: the step's one host sync)."""
        micro = self.micro_rows
        self.prepare()  # no-op once done (normally by Worker.prepare, before the group formed)
        self.model.train()
        for p in self.params:
            p.grad = None
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        # one copy of the whole step up front: a copy per micro-batch from pageable memory would wait for
        # the previous micro-batch's kernels
        xs = inputs.to(self.device, non_blocking=True)
        ys = targets.to(self.device, non_blocking=True)
        for i in range(0, inputs.size(0), micro):
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            n = int((targets[i:i + micro] >= 0).sum())  # on the host copy: no device sync per micro-batch
            if n == 0:
                continue
            x, y = xs[i:i + micro], ys[i:i + micro]
            # compiled unless this row count must keep off cuDNN (a compiled graph picks its kernel once)
            forward = self.compiled if self.compiled is not None and not self.attention.restricted(x.size(0)) \
                else self._eager_loss
            with self.attention.kernels(x.size(0)), \
                    torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                loss = forward(x, y)
            (loss * (n / max(1, tokens))).backward()
            loss_acc += loss.detach().double() * n
            self.progress += 1
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        return loss_acc

    def _leave_group(self) -> None:
        """Close our side of the failed collective now: a peer still blocked reading from us (alive
        but no longer sending) then gets "connection closed" at once instead of waiting for a timeout."""
        release_node_groups()  # sync.hierarchy=node: the last references to its gloo subgroups (closes them)
        rendezvous.leave(self.group_name)

    def _abstain(self, lr: float, boundary: bool) -> None:
        self._params_version += 1  # the gradients are zeroed
        if self.sync is None:
            return
        for p in self.params:
            p.grad = torch.zeros_like(p)
        try:
            self.sync.exchange(lr=lr, weight=float("nan"), weight_decay=0.0, boundary=boundary,
                               step=self.pending_step)
        except Exception:
            pass  # expected: our own NaN weight is rejected too
        try:
            self.sync.abort()
        except Exception:
            pass

    def commit(self, step: int, wait: bool = True) -> str | None:
        """Apply step `step`; returns the new fingerprint, or with `wait=False` leaves it computing on the
        device (`fingerprint_result` reads it)."""
        self._settle(keep_step=step)
        assert self.pending_step == step, f"commit of step {step} but pending is {self.pending_step}"
        if self._applied_ahead == step:  # applied while the coordinator decided: keep it
            self._applied_ahead = None
            self.sync.forget_undo()
            if wait and not self._fingerprint_due(step + 1):
                self._start_fingerprint(step + 1, force=True)
        else:
            self.sync.commit()
            self._params_version += 1
            self._start_fingerprint(step + 1, force=wait)
        self.pending_step = None
        self.step_count = step + 1
        self.phase = "idle"
        return self.fingerprint_result() if wait else None

    def _apply_ahead(self, step: int) -> None:
        """Apply the exchanged step in a thread while the report travels and the coordinator decides
        (`train.apply_ahead`): the next call's commit then only confirms it, and an abort undoes it exactly
        (`Sync.undo`). The device work queues before the next step's, on the same stream."""
        def run():
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                self.sync.commit(keep_undo=True)
                self._applied_ahead = step
                self._start_fingerprint(step + 1)
            except BaseException as e:  # raised where the step is confirmed or dropped
                self._apply_error = e

        self._apply_thread = threading.Thread(target=run, name=f"{self.worker_id}-apply-ahead", daemon=True)
        self._apply_thread.start()

    def _compute_ahead(self, step: int, ranges: list[DocRange], carry: list | None, cut: bool) -> None:
        """Start step `step`'s read and forward/backward on `ranges` (the hint of the call just answered, which
        the coordinator fixed as that step's rows: `StepCall.next_fixed`) in a thread, on the parameters with
        step `step - 1` applied ahead. The call for `step` takes it (`_take_ahead`) where it still holds; a
        report's compute time then starts here. Nothing is lost if it does not: the call computes again."""
        apply_thread = self._apply_thread
        ahead = _Ahead(step, tuple(ranges), carry, cut, self._params_version, time.time())

        def run():
            try:
                if apply_thread is not None:
                    apply_thread.join()
                if self._apply_error is not None or self._applied_ahead != step - 1:
                    return  # the previous step is not applied: its call settles that, then computes
                ahead.result = self._forward_backward(list(ranges), loaded=ahead.loaded, cancel=ahead.cancel,
                                                      carry=carry, cut=cut)
            except BaseException as e:  # the call computes again and meets the error itself
                ahead.error = e
            finally:
                ahead.loaded.set()

        self._ahead = ahead
        ahead.future = self._compute.submit(run)

    def _take_ahead(self, call: StepCall) -> _Ahead | None:
        """The step computed ahead, if `call` is the one it was computed for: the same step, rows and carried
        tail, whole documents. It is joined either way (stopped at its next micro-batch if it
        does not fit). Where it fits, the read-ahead of `call.prefetch` starts as soon as its rows are read.
        The parameters are checked after the commit (`_params_version`)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.future is None:
            return None
        fits = (ahead.step == call.step and ahead.ranges == tuple(call.ranges) and not call.window
                and ahead.carry == (list(call.carry) if call.carry else None) and ahead.cut == call.cut_tail)
        if fits:
            ahead.loaded.wait()
            if call.prefetch:
                self.data.read_ahead(call.prefetch, call.prefetch_margin)
        else:
            ahead.cancel.set()
        concurrent.futures.wait([ahead.future])
        if ahead.error is not None and not isinstance(ahead.error, _Cancelled):
            log.info("%s: computing step %d ahead failed (%s); computing it in its call", self.worker_id,
                     ahead.step, str(ahead.error).splitlines()[0] if str(ahead.error) else type(ahead.error).__name__)
        return ahead if fits and ahead.result is not None else None

    def _settle(self, keep_step: int | None = None) -> None:
        """Wait for a step computed ahead and for an apply-ahead; unless the apply-ahead applied `keep_step`,
        undo it (its step is not committed: parameters, state and the pending update are back as the
        exchange left them). Everything that reads or changes the parameters or the sync state calls this
        first."""
        if self._ahead is not None and self._ahead.future is not None and not self._on_compute_thread():
            concurrent.futures.wait([self._ahead.future])  # kept: the next call may still use it (`_params_version` decides)
        thread, self._apply_thread = self._apply_thread, None
        if thread is not None:
            thread.join()
        if self._apply_error is not None:
            # applying in a thread failed (before or during the commit): put the state back as the exchange
            # left it and apply at the commit from now on, as with train.apply_ahead=false
            error, self._apply_error = self._apply_error, None
            log.warning("%s: applying step %s ahead failed (%s: %s); applying at the commit from now on",
                        self.worker_id, self.pending_step, type(error).__name__, error)
            self._apply_ahead_on = False
            if self.sync.can_undo:
                self.sync.undo()
            self._params_version += 1
            self._applied_ahead = None
            self._pending_fingerprint = None
        if self._applied_ahead is not None and self._applied_ahead != keep_step:
            self._applied_ahead = None
            self._pending_fingerprint = None
            self.sync.undo()
            self._params_version += 1

    def _fingerprint_due(self, committed: int) -> bool:
        return committed % self.fingerprint_every == 0

    def _start_fingerprint(self, committed: int, force: bool = False) -> None:
        """Start the fingerprint of the parameters after `committed` steps if one is due
        (`train.fingerprint_every`) or `force`d (a commit the coordinator waits on: before a checkpoint, a
        membership change, the end); otherwise the step reports none ("": the coordinator compares nothing).
        Every replica has committed the same steps, so all of them fingerprint the same steps."""
        if force or self._fingerprint_due(committed):
            self._pending_fingerprint = params_fingerprint_async(self._replica_tensors())
        else:
            self._pending_fingerprint = PendingFingerprint.ready("")

    def fingerprint_result(self) -> str:
        """The fingerprint the last commit started (waits for the device only if it is not done yet); "" if
        that commit had none due."""
        if self._pending_fingerprint is not None:
            self.last_fingerprint = self._pending_fingerprint.result()
            self._pending_fingerprint = None
        return self.last_fingerprint

    def abort(self, step: int) -> str:
        self._settle()
        self._params_version += 1
        if self.pending_step is not None and self.sync is not None:
            try:
                self.sync.abort()
            except Exception:
                log.exception("abort failed")
        self.pending_step = None
        self.phase = "idle"
        return self.fingerprint()

    def fingerprint(self) -> str:
        """Of what every replica must hold bit for bit: the parameters, or the sync's global state
        (DiLoCo's local parameters drift between outer steps by design)."""
        self._settle()
        return params_fingerprint(self._replica_tensors())

    def _replica_tensors(self) -> list[torch.Tensor]:
        return self.sync.replica_tensors() if self.sync is not None else self.params

    # ---- state ----------------------------------------------------------------------------
    def model_state(self) -> PackedState:
        """The committed parameters and buffers, packed for a joiner (`elastic.state_transfer`: lossless, tied
        weights once, `train.state_codec`); a copy, so training may go on."""
        self._settle()  # the committed parameters only
        return pack_state(self.model.state_dict(), self.cfg.train.state_codec)

    def sync_state(self) -> dict:
        self._settle()
        return self.sync.state_dict() if self.sync is not None else {}

    def load_model_state(self, state: dict) -> None:
        self._settle()
        self._params_version += 1
        self.model.load_state_dict(state)

    def load_sync_state(self, state: dict) -> None:
        self._settle()
        self._params_version += 1
        if state:
            self.sync.load_state_dict(state)

    def snapshot(self, step: int, dir_uri: str, files: dict[str, str]) -> float:
        """Start writing this worker's part of the checkpoint at `step` to `dir_uri`: `files` maps a file name
        to what it holds ("model": the parameters, "sync": this rank's sync state). The committed state is
        copied to host memory (on CUDA: pinned buffers, copies queued on the training stream, no wait) and
        the files are serialized and written by a thread; `snapshot_written` returns their records. Returns
        the seconds this call held the worker."""
        t0 = time.perf_counter()
        try:
            self._settle()  # the committed state only
            if self.step_count != step:
                raise RuntimeError(f"{self.worker_id}: checkpoint of step {step} asked, but {self.step_count} "
                                   "steps are committed here")
            # on a CPU worker the state dicts hold the live tensors: copy them before training goes on
            snap = HostSnapshot(state_trees(files, self.model, self.sync), clone_host=self.device.type != "cuda",
                                pool=self.checkpoint_writes.pinned)
            self.checkpoint_writes.start(dir_uri, snap, self.cfg.checkpoint.storage_options)
        except BaseException as e:
            self.checkpoint_writes.failed(dir_uri, e)
            raise
        return time.perf_counter() - t0

    def snapshot_written(self, dir_uri: str) -> dict:
        """{file name: {sha256, bytes}} once this worker's files for `dir_uri` are written; raises the
        storage's error (or TimeoutError after checkpoint.write_timeout_s)."""
        return self.checkpoint_writes.result(dir_uri, self.cfg.checkpoint.write_timeout_s)

    def load_checkpoint(self, dir_uri: str, records: dict, sync_name: str | None, step_count: int) -> str:
        """Load the parameters (and `sync_name`'s sync state) of the checkpoint at `dir_uri` straight from
        storage, each file checked against the manifest `records`; returns the new fingerprint."""
        so = self.cfg.checkpoint.storage_options
        self.load_model_state(load_tensors(load_file(dir_uri, "model.pt", records["model.pt"], so)))
        if sync_name is not None:
            self.load_sync_state(load_tensors(load_file(dir_uri, sync_name, records[sync_name], so)))
        self.step_count = step_count
        return self.fingerprint()

    def evaluate(self, ranges: list[DocRange]) -> dict:
        """Mean loss over the held-out documents `ranges` (every token scored once)."""
        if not self.val_shards:
            raise RuntimeError("evaluate: this worker was given no held-out shards (data.val_source)")
        self._settle()
        return self.on_compute_thread(self._evaluate, ranges)

    def _evaluate(self, ranges: list[DocRange]) -> dict:
        if self._val_data is None:
            self._val_data = StepLoader(self.val_shards, self.cfg.data, self.cfg.train.seq_len,
                                        tokenizer=self.tokenizer, name=f"{self.worker_id}-val")
        self.model.eval()
        batch = self._val_data.load(ranges)
        inputs, targets = batch.inputs, batch.targets
        micro = max(1, self.cfg.train.micro_batch_tokens // self.cfg.train.seq_len)
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, inputs.size(0), micro):
                x = inputs[i:i + micro].to(self.device)
                y = targets[i:i + micro].to(self.device)
                n = int((y >= 0).sum())
                if n == 0:
                    continue
                _, loss = self.model(x, y)
                total += float(loss) * n
                count += n
        self.model.train()
        return {"val_loss": total / max(1, count), "val_tokens": count}


def abort_communicators(group_name: str) -> bool:
    """Abort the communicator of a ray.util.collective group from another thread, so a collective blocked on
    a silent peer raises in the step thread. NCCL: `ncclCommAbort` on every communicator of the group; gloo:
    the torch process group's `abort`. Best effort: False if the backend offers no abort."""
    try:
        from ray.util.collective.collective import _group_mgr
    except Exception:
        return False
    group = _group_mgr.get_group_by_name(group_name) if group_name else None
    if group is None:
        return False
    done = False
    for comms in getattr(group, "_dev_comm_map", {}).values():  # NCCL: cupy communicators per device set
        for comm in comms:
            try:
                comm.abort()
                done = True
            except Exception:
                log.debug("NCCL abort failed", exc_info=True)
    pg = getattr(group, "_pg", None)  # gloo: torch.distributed's process group
    if pg is not None and hasattr(pg, "abort"):
        try:
            pg.abort()
            done = True
        except Exception:
            log.debug("gloo abort failed", exc_info=True)
    return done


@ray.remote(concurrency_groups={"control": 4})
class Worker:
    """Ray actor shell around WorkerReplica (named raydistro/<run>/worker-<n>[<accelerator>])."""

    def __init__(self, cfg: RunConfig, worker_id: str, shards: list, seed: int, val_shards: list | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # shapes change from step to step (whole documents): let the CUDA allocator grow segments instead of
        # fragmenting fixed ones, which can leave a large micro-batch out of memory with gigabytes reserved but free
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if cfg.cluster.gloo_socket_ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = cfg.cluster.gloo_socket_ifname
        self.r = WorkerReplica(cfg, worker_id, shards, seed, val_shards)
        self._coordinator: tuple[str, str] | None = None
        self._orphan_watch: threading.Thread | None = None
        self._status_generation: int | None = None  # the generation whose first status carried `info`
        self.accelerator = detect_accelerator(str(self.r.device))
        from elastic.metrics import WorkerMetrics

        self.metrics = WorkerMetrics(cfg.run.name, worker_id, self.accelerator)

    def __repr__(self) -> str:
        # Ray takes the repr once, right after __init__, for the dashboard's actor list and the log
        # prefix: say what is true for the actor's whole life there; the live fields once it has joined
        r = self.r
        who = f"Worker({r.worker_id}[{getattr(self, 'accelerator', '?')}] run={r.cfg.run.name}"
        if r.generation < 0:
            return who + ")"
        return (f"{who} gen={r.generation} rank={r.rank}/{r.world_size} step={r.step_count} "
                f"tok/s={r.tokens_per_s:.0f})")

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        return {"worker_id": self.r.worker_id, "accelerator": self.accelerator,
                "node_id": ray.get_runtime_context().get_node_id(), "device": str(self.r.device),
                "pid": os.getpid(), "host": socket.gethostname()}

    @ray.method(concurrency_group="control")
    def ping(self) -> str:
        return self.r.phase

    # a liveness ping, up to twice a second while a step is out: no task events to the GCS for it (they would
    # cross the node's link every second; the step calls keep theirs)
    @ray.method(concurrency_group="control", enable_task_events=False)
    def status(self) -> WorkerStatus:
        """Where this worker is, answered even while its step thread is blocked in a collective: the
        coordinator's liveness pings, and a restarted coordinator adopting the group. The static `info` comes
        with the first status of each generation only: the pings cross the users' links."""
        r = self.r
        first, self._status_generation = self._status_generation != r.generation, r.generation
        return WorkerStatus(r.worker_id, r.phase, r.progress, r.generation, r.rank, r.step_count, r.pending_step,
                            os.getpid(), self.info() if first else {})

    @ray.method(concurrency_group="control")
    def abort_collective(self, generation: int) -> bool:
        """Unblock this worker's step thread from a collective of `generation` whose peer went silent: abort
        the communicator (NCCL: ncclCommAbort; gloo: the process group's abort), so the blocked call raises and
        the step reports `left_group`. Returns whether there was anything to abort."""
        if generation != self.r.generation or self.r.phase != "exchange":
            return False
        nodes = abort_node_groups(getattr(self.r, "node_group_handles", []), abort_communicators)  # hierarchy=node
        return abort_communicators(self.r.group_name) or nodes

    @ray.method(concurrency_group="control")
    def set_coordinator(self, name: str, namespace: str) -> None:
        """The coordinator this worker serves: a detached worker whose coordinator is gone for good (not
        restarting) for `train.orphan_timeout_s` exits, so a lost control plane never strands GPUs."""
        self._coordinator = (name, namespace)
        if self._orphan_watch is None:
            self._orphan_watch = threading.Thread(target=self._watch_coordinator, name="orphan-watch", daemon=True)
            self._orphan_watch.start()

    def _watch_coordinator(self) -> None:
        limit = self.r.cfg.train.orphan_timeout_s
        gone_since = None
        while True:
            # each look-up fetches the coordinator's actor record from the GCS over this node's link: every
            # limit/8, at most every 15 s: this is clock-paced traffic on what may be a slow link
            time.sleep(min(15.0, max(0.5, limit / 8)))
            name, ns = self._coordinator
            try:
                ray.get_actor(name, namespace=ns)  # restarting counts as alive: its name stays registered
                gone_since = None
            except ValueError:
                gone_since = gone_since or time.time()
                if time.time() - gone_since > limit:
                    log.error("%s: coordinator %s is gone for %.0f s (train.orphan_timeout_s); exiting",
                              self.r.worker_id, name, limit)
                    os._exit(0)
            except Exception:  # the GCS is unreachable for a moment: not a verdict
                pass

    def prepare(self) -> dict:
        """What the coordinator waits for before a new worker counts as ready: one-time work that must run
        on the thread the steps' forward/backward runs on (`WorkerReplica.on_compute_thread`), then `info`.
        The group keeps training meanwhile."""
        if self.r.worker_id in self.r.cfg.chaos.prepare_error:
            raise RuntimeError(f"chaos.prepare_error: {self.r.worker_id}'s setup fails")
        prepare_s = self.r.prepare()
        return {**self.info(), "prepare_s": round(prepare_s, 3)}

    def join_group(self, world_size: int, rank: int, generation: int, backend: str, group_name: str,
                   hierarchy: dict | None = None) -> bool:
        self.r.join_group(world_size, rank, generation, backend, group_name, hierarchy)
        return True

    def step(self, call: StepCall) -> StepReport:
        try:
            report = self.r.step(call)
        except Exception as e:
            self.r.phase = "failed"
            report = StepReport(self.r.worker_id, self.r.rank, call.step, ok=False)
            report.update_error(e)
            report.traceback = traceback.format_exc()
            return report
        if report.ok:
            self.r.tokens_per_s = report.tokens_per_s()
            try:
                self.metrics.record_step(report)
            except Exception:  # metrics are for people watching; they never fail a step
                log.exception("recording metrics failed")
        return report

    def commit(self, step: int) -> str:
        return self.r.commit(step)

    def adopt(self, committed: int | None) -> tuple[int, str]:
        """A new coordinator takes this worker over. Runs on the step lane, so after whatever step call the
        old coordinator left in flight. `committed`: the step the journal says is committed but may not have
        been applied here yet. Any other exchanged step was never committed: it is dropped. Returns
        (committed steps applied, fingerprint)."""
        r = self.r
        if r.pending_step is not None:
            if committed is not None and r.pending_step == committed:
                r.commit(committed)
            else:
                r.abort(r.pending_step)
        r.phase = "idle"
        return r.step_count, r.fingerprint()

    def abort(self, step: int) -> str:
        return self.r.abort(step)

    @ray.method(num_returns=2)
    def model_state(self) -> tuple[dict, PackedState]:
        """(what the state costs on the wire, the packed state): the coordinator reads the first and hands the
        second's ref to the joiners, whose nodes fetch it from this one, never through the coordinator's."""
        packed = self.r.model_state()
        return packed.meta(), in_pieces(packed)

    @ray.method(num_returns=2)
    def sync_state(self) -> tuple[dict, PackedState]:
        packed = pack_state(self.r.sync_state(), self.r.cfg.train.state_codec)
        return packed.meta(), in_pieces(packed)

    def load_state(self, model_state: PackedState, sync_state: PackedState | None, step_count: int) -> str:
        """Take a live peer's state (`model_state`/`sync_state`, unpacked bit for bit); returns the fingerprint
        the coordinator checks against the group's."""
        self.r.load_model_state(unpack_state(fetch_pieces(model_state)))
        sync = unpack_state(fetch_pieces(sync_state)) if sync_state is not None else None
        if sync:
            self.r.load_sync_state(sync)
        self.r.step_count = step_count
        return self.r.fingerprint()

    def snapshot(self, step: int, dir_uri: str, files: dict) -> float:
        return self.r.snapshot(step, dir_uri, files)

    @ray.method(concurrency_group="control")  # waits for the write thread while steps go on
    def snapshot_written(self, dir_uri: str) -> dict:
        return self.r.snapshot_written(dir_uri)

    def load_checkpoint(self, dir_uri: str, records: dict, sync_name: str | None, step_count: int) -> str:
        return self.r.load_checkpoint(dir_uri, records, sync_name, step_count)

    def fingerprint(self) -> str:
        return self.r.fingerprint()

    def evaluate(self, ranges: list) -> dict:
        return self.r.evaluate(ranges)


# ---- a state on its way to a joiner, in pieces ----------------------------------------------------------------
# Ray's pull manager asks again for an object that has not arrived in 10 s (RAY_object_manager_pull_timeout_ms),
# and the sender then sends it again from its first chunk: on a slow link a large state crosses it more than once
# (docs/slowlink.md). Pieces of STATE_PIECE_BYTES, fetched one after the other, each arrive well within the 10 s
# (~2.7 s at 100 Mbit/s).
STATE_PIECE_BYTES = 32 << 20


def in_pieces(packed: PackedState) -> PackedState:
    """`packed` with its blob moved into objects of at most STATE_PIECE_BYTES each (owned by this worker, kept alive
    by the refs inside `packed`); `fetch_pieces` puts it back together on the receiving worker."""
    blob = memoryview(packed.blob)
    packed.blob = [ray.put(bytes(blob[i:i + STATE_PIECE_BYTES])) for i in range(0, len(blob), STATE_PIECE_BYTES)]
    return packed


def fetch_pieces(packed: PackedState) -> PackedState:
    """The blob of a state `in_pieces` sent, fetched piece by piece (so no pull waits on the others)."""
    if isinstance(packed.blob, list):
        packed.blob = b"".join(ray.get(ref) for ref in packed.blob)
    return packed
