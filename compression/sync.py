"""The strategy interface every synchronization scheme implements (`compression.registry.build_sync` builds them).

Promises of every `Sync` (this is what lets the elastic coordinator guarantee "all apply step s or none"):
- `exchange(lr, weight, weight_decay, boundary=False)` reads `p.grad`, runs this step's collective(s),
  validates what peers sent and computes the pending update. It modifies neither the parameters nor the
  committed state; on a bad peer payload it raises `PayloadError(sender_rank, reason)` and nothing is
  pending. Every rank passes the same `boundary`: True asks for replicas whose parameters agree after this
  step (the last step, a checkpoint); strategies that agree after every step ignore it. `step` (every rank
  passes the same; default: the Sync's own `step_count`) goes into the payload's header, and a payload that
  carries another step (stale, replayed) is refused with `PayloadError` naming its sender.
- `replica_tensors()` are bitwise equal on every rank after every committed step (the parameters, for the
  strategies that apply one shared update each step; DiLoCo's global parameters and outer momentum).
- `commit()` applies the pending update to the parameters and the strategy state, and advances `step_count`.
- `abort()` drops the pending update: parameters and state stay exactly (bitwise) as before `exchange`.
- Optional (`supports_undo`): `commit(keep_undo=True)` commits so that `undo()` can put parameters, state
  and the pending update back exactly as they were before that commit (then `commit` or `abort` again);
  `forget_undo()` drops what undo needs. A worker uses it to apply a step while it waits for the
  coordinator's decision, instead of after it.
- `state_dict()` holds this rank's state with tensors on CPU; `load_state_dict` restores it.
- `rebind(comm)` switches to a new group after a membership change; local state is kept.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from compression.communicator import Communicator


T = TypeVar("T")

# held while a CUDA graph is captured (compression.demo) and around device-wide syncs, which would break it
CAPTURE_LOCK = threading.Lock()


def capture_graph(device, fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """`fn()` captured into a new CUDA graph: (the graph, fn's outputs, the graph's own tensors). One capture at a
    time in this process, each on its own stream (ranks run as threads in tests and benchmarks; torch's default
    capture stream is shared by all threads). Captured work has not run yet: replay the graph."""
    graph = torch.cuda.CUDAGraph()
    with CAPTURE_LOCK, torch.cuda.graph(graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
        out = fn()
    return graph, out


@dataclass
class ExchangeStats:
    bytes_sent: int                 # bytes this worker hands to the network in this step (see docs for all-reduce)
    bytes_received: int             # bytes this worker receives from peers in this step
    dense_equivalent_bytes: int     # numel * 2: the same update sent dense in bf16
    codec_ms: float                 # local compute of the exchange (encode + decode + validation), no comm
    comm_ms: float                  # time inside the collective(s)
    collective_input_bytes: int = 0  # size of the tensor handed to the collective by this worker
    # sync.hierarchy=node: bytes this worker sends to ranks of its own node (ring all-reduce of the gradients +
    # all-gather of the decoded shards); bytes_sent/received are then the cross-node (compressed) traffic only
    local_bytes_sent: int = 0


class Sync:
    """Base class of the strategies; see the module docstring for the contract."""

    step_count: int = 0
    supports_undo: bool = False
    _undo = None  # a strategy that supports undo keeps here what `undo()` restores (None: nothing to undo)

    def exchange(self, lr: float, weight: float, weight_decay: float = 0.0, boundary: bool = False,
                 step: int | None = None) -> ExchangeStats:
        raise NotImplementedError

    def replica_tensors(self) -> list[torch.Tensor]:
        return self.params

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def undo(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot undo a commit")

    def forget_undo(self) -> None:
        self._undo = None

    @property
    def can_undo(self) -> bool:
        return self._undo is not None

    def state_dict(self, on_device: bool = False) -> dict:
        """The strategy's state: what a checkpoint or a joining peer needs. Tensors are copied to the CPU,
        unless `on_device`: then they stay where they live (detached, possibly the live state itself) for a
        caller that queues its own copies before the next step changes them (a checkpoint's snapshot copies
        them into pinned host buffers without holding training)."""
        raise NotImplementedError

    def state_layout(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every tensor `state_dict(on_device=True)` holds once the strategy has stepped,
        state an optimizer creates lazily at its first step included: what host buffers reserved ahead of a
        first checkpoint must fit. This default reads the current state; strategies with lazy state say more."""
        return [(tuple(t.shape), t.dtype) for t in tensors_in(self.state_dict(on_device=True))]

    def load_state_dict(self, sd: dict) -> None:
        raise NotImplementedError

    def rebind(self, comm: Communicator) -> None:
        self.comm = comm

    # shared helpers -------------------------------------------------------------------------------
    def _timed(self, collective, *args):
        """Run `collective(*args)` between device syncs: (its result, perf_counter before, after)."""
        self._sync_device(self.device)
        t1 = time.perf_counter()
        out = collective(*args)
        self._sync_device(self.device)
        return out, t1, time.perf_counter()

    @staticmethod
    def _sync_device(device: torch.device) -> None:
        # timings on CUDA need the queued kernels to finish; the cost is one sync per timed phase.
        # Not while a CUDA graph is being captured in this process (ranks as threads): that fails the capture
        if device.type == "cuda":
            with CAPTURE_LOCK:
                torch.cuda.synchronize(device)


def tensors_in(tree) -> list[torch.Tensor]:
    """Every tensor in a state tree (nested dicts, lists and tuples), in a stable order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors_in(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors_in(v)]
    return []


def joiners_need_peer_state(name: str) -> bool:
    """Whether a rank that joins (or resumes without a checkpoint file of its own) must load a live peer's
    `state_dict` to agree with the group: dense (AdamW moments are replicated) and diloco (the global
    parameters and outer momentum), not demo (its momentum is each rank's own unsent residual)."""
    return name in ("dense", "diloco")


def sync_state_identical(name: str) -> bool:
    """Whether every rank's `state_dict` is the same at a commit (so a checkpoint needs it once): dense only.
    diloco's global state is shared, but each rank's local parameters and inner optimizer drift between outer
    steps; demo's momentum is each rank's own."""
    return name == "dense"
