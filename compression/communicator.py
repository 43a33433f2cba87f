"""The only way `compression` talks to peers: a Communicator (all-reduce, all-gather, broadcast of tensors).

Owns: the `Communicator` protocol and three adapters. Promises for every adapter:
- `allreduce_(t)` sums in place; `allgather(t)` returns `[world_size, *t.shape]` in rank order;
  `broadcast_(t, src)` overwrites `t` with rank `src`'s tensor;
- tensors stay on their device (gloo: CPU tensors, nccl: CUDA tensors).
`ThreadCommunicator` is a real rendezvous of N threads in one process (tensors really cross threads),
so unit tests exercise the same exchange code as a cluster without processes or sockets.
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol, TypeVar, runtime_checkable

import torch

T = TypeVar("T")


@runtime_checkable
class Communicator(Protocol):
    rank: int
    world_size: int

    def allreduce_(self, t: torch.Tensor) -> None: ...
    def allgather(self, t: torch.Tensor) -> torch.Tensor: ...
    def broadcast_(self, t: torch.Tensor, src: int) -> None: ...


class RayCollectiveCommunicator:
    """`ray.util.collective` (gloo: CPU tensors, nccl: CUDA tensors); call inside a Ray actor of the group.

    The group must already exist (`init_collective_group` in the actor, or `create_collective_group` from
    the driver). With gloo, a group re-formed with another world size needs torch's default process
    group destroyed first in every member (see docs/compression.md).
    """

    def __init__(self, group_name: str = "default", rank: int | None = None, world_size: int | None = None):
        import ray.util.collective as col  # lazy: compression itself does not need Ray

        self._col = col
        self.group_name = group_name
        if rank is None or world_size is None:
            if col.get_rank(group_name) < 0:
                col.get_group_handle(group_name)  # groups declared from the driver form lazily
            rank, world_size = col.get_rank(group_name), col.get_collective_group_size(group_name)
        if rank < 0 or world_size <= 0:
            raise RuntimeError(f"collective group '{group_name}' is not initialized in this actor: call "
                               "ray.util.collective.init_collective_group(...) first")
        self.rank, self.world_size = rank, world_size

    def allreduce_(self, t: torch.Tensor) -> None:
        self._col.allreduce(t, group_name=self.group_name)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._col.allgather(out, t, group_name=self.group_name)
        return torch.stack(out)

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        self._col.broadcast(t, src_rank=src, group_name=self.group_name)


class TorchDistributedCommunicator:
    """`torch.distributed` (any backend; the process group must be initialized, e.g. by Ray Train)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
        self._dist, self.group = dist, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def allreduce_(self, t: torch.Tensor) -> None:
        self._dist.all_reduce(t, group=self.group)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        # the flat [W * n] output layout is the one every backend accepts (gloo rejects [W, n])
        flat = t.contiguous().reshape(-1)
        out = flat.new_empty(self.world_size * flat.numel())
        self._dist.all_gather_into_tensor(out, flat, group=self.group)
        return out.view(self.world_size, *t.shape)

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        self._dist.broadcast(t, src=src, group=self.group)


class _Rendezvous:
    def __init__(self, world_size: int, timeout: float):
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()  # everyone has written
        got = [s for s in self.slots]  # type: ignore[misc]
        self.barrier.wait()  # everyone has read: slots may be reused
        return got  # type: ignore[return-value]


class ThreadCommunicator:
    """A real in-process group of N threads (one communicator per thread), for tests and single-host runs.

    Collectives block until every rank enters them (or `timeout` seconds pass -> BrokenBarrierError).
    Reductions sum in rank order, so results are deterministic.
    """

    def __init__(self, rank: int, world_size: int, rendezvous: _Rendezvous):
        self.rank, self.world_size, self._rv = rank, world_size, rendezvous

    @classmethod
    def group(cls, world_size: int, timeout: float = 60.0) -> list["ThreadCommunicator"]:
        rv = _Rendezvous(world_size, timeout)
        return [cls(r, world_size, rv) for r in range(world_size)]

    def abort(self) -> None:
        """Break the group: peers blocked in a collective raise instead of waiting for the timeout."""
        self._rv.barrier.abort()

    def allreduce_(self, t: torch.Tensor) -> None:
        parts = self._rv.exchange(self.rank, t)
        acc = parts[0].clone()
        for p in parts[1:]:
            acc += p
        t.copy_(acc)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._rv.exchange(self.rank, t)
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"allgather: ranks passed different shapes {[tuple(p.shape) for p in parts]}")
        return torch.stack(parts)

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        t.copy_(self._rv.exchange(self.rank, t)[src])


def run_threads(world_size: int, fn: Callable[[ThreadCommunicator], T], timeout: float = 60.0) -> list[T]:
    """Run `fn(comm)` on `world_size` threads joined by a ThreadCommunicator group; results in rank order.

    An exception on any rank breaks the group (so peers do not hang) and is re-raised here (lowest rank).
    """
    comms = ThreadCommunicator.group(world_size, timeout)
    return run_rank_threads(world_size, lambda r: fn(comms[r]), lambda r: comms[r].abort())


def run_rank_threads(world_size: int, fn: Callable[[int], T], on_error: Callable[[int], None]) -> list[T]:
    """Run `fn(rank)` on `world_size` threads; results in rank order. A rank that raises calls `on_error(rank)`
    (which breaks its groups, so peers do not hang); the lowest rank's own error (not a peer's broken barrier,
    if there is one) is re-raised here."""
    results: list = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def body(r: int) -> None:
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors[r] = e
            on_error(r)

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    primary = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if primary or any(errors):
        raise (primary or [e for e in errors if e is not None])[0]
    return results
