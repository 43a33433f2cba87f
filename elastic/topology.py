"""`sync.hierarchy=node` in a Ray group: which collective groups a generation has, and a worker's communicators.

Owns: `hierarchy_layout` (the coordinator's side, pure: the members' Ray node ids -> per rank, the node's dense
group and the shard's cross-node group, named after the generation's group) and `node_communicators` (the
worker's side: forms them after the generation's flat group, returns `compression.hierarchy.NodeGroups`).
Promises:
- every member gets the same layout (all local and cross groups, in the same order): gloo subgroups are formed
  by every rank of the flat group in that order (`torch.distributed.new_group`), nccl ones by their members
  (`ray.util.collective`, one named group each);
- the groups are re-formed with every generation (a worker or a whole node leaving, a node of another size
  joining): their names carry the generation's group name, and leaving the generation's group
  (`elastic.rendezvous.leave`) destroys them with it (torch's default process group takes its subgroups along;
  ray.util.collective's named nccl groups are all destroyed); gloo subgroups are held only by name here
  (`NamedGlooGroup`), so `release_node_groups` frees them and a peer blocked on a rank that left fails at once.
"""
from __future__ import annotations

import datetime

from compression.communicator import RayCollectiveCommunicator
from compression.hierarchy import NodeGroups, node_topology
from elastic.rendezvous import node_group_name, shard_group_name


def hierarchy_layout(group: str, node_ids: list[str]) -> list[dict]:
    """Per rank (the order of `node_ids`, one per member), what `node_communicators` needs: its node, its shard
    (-1: dense-only), the shard count, every local and cross group as global ranks, and their names."""
    topo = node_topology(node_ids)
    local = [list(g) for g in topo.local_groups]
    cross = [list(g) for g in topo.cross_groups]
    names = {"local_names": [node_group_name(group, n) for n in range(topo.nodes)],
             "cross_names": [shard_group_name(group, s) for s in range(topo.shards)]}
    return [{"node": p.node, "shard": p.shard, "shards": topo.shards, "local_groups": local, "cross_groups": cross,
             **names} for p in topo.placements]


# torch.distributed subgroups (gloo) of this process, by name: the only references to them, so releasing one
# frees it, which is what closes its sockets and tells a peer blocked on this rank (destroying or aborting a
# gloo group whose object is still referenced leaves the peer waiting for the timeout; measured on torch 2.13)
_GLOO_GROUPS: dict[str, object] = {}


class NamedGlooGroup:
    """A Communicator over one of this process's torch.distributed subgroups, reached by name like
    ray.util.collective's groups, so neither it nor a traceback holding it keeps the group alive."""

    def __init__(self, name: str):
        import torch.distributed as dist

        self._dist, self.name = dist, name
        pg = self._group()
        self.rank, self.world_size = dist.get_rank(pg), dist.get_world_size(pg)

    def _group(self):
        pg = _GLOO_GROUPS.get(self.name)
        if pg is None:
            raise RuntimeError(f"collective group {self.name} was released (this rank left its generation)")
        return pg

    def allreduce_(self, t) -> None:
        self._dist.all_reduce(t, group=self._group())

    def allgather(self, t):
        flat = t.contiguous().reshape(-1)  # the flat [W * n] output layout gloo accepts
        out = flat.new_empty(self.world_size * flat.numel())
        self._dist.all_gather_into_tensor(out, flat, group=self._group())
        return out.view(self.world_size, *t.shape)

    def broadcast_(self, t, src: int) -> None:
        self._dist.broadcast(t, src=src, group=self._group())


def release_node_groups() -> None:
    """Drop this process's node and cross gloo groups (before `elastic.rendezvous.leave`/`join` destroy torch's
    process groups): freed, their sockets close and peers blocked on this rank fail at once."""
    _GLOO_GROUPS.clear()


def node_communicators(layout: dict, rank: int, backend: str, timeout_s: float) -> tuple[NodeGroups, list]:
    """This rank's `NodeGroups` from its `hierarchy_layout` entry, formed after the flat group (gloo: torch's
    default process group is the flat group's, so every rank forms every subgroup in layout order; nccl: one
    named ray.util.collective group per subgroup, formed by its members). Returns (groups, the names of its
    groups, for `abort_node_groups`)."""
    node, shard = layout["node"], layout["shard"]
    local_ranks = layout["local_groups"][node]
    cross_ranks = layout["cross_groups"][shard] if shard >= 0 else []
    names = [layout["local_names"][node]] + ([layout["cross_names"][shard]] if shard >= 0 else [])
    if backend == "nccl":
        import ray.util.collective as col

        def form(ranks: list[int], name: str) -> RayCollectiveCommunicator:
            col.init_collective_group(len(ranks), ranks.index(rank), backend="nccl", group_name=name)
            return RayCollectiveCommunicator(name, rank=ranks.index(rank), world_size=len(ranks))

        local = form(local_ranks, names[0])
        cross = form(cross_ranks, names[1]) if shard >= 0 else None
    else:
        import torch.distributed as dist

        release_node_groups()
        timeout = datetime.timedelta(seconds=timeout_s)
        for ranks, name in zip(layout["local_groups"] + layout["cross_groups"],
                               layout["local_names"] + layout["cross_names"]):
            pg = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)  # every rank, in layout order
            if rank in ranks:
                _GLOO_GROUPS[name] = pg
        local = NamedGlooGroup(names[0])
        cross = NamedGlooGroup(names[1]) if shard >= 0 else None
    return NodeGroups(local, cross, shard, layout["shards"], tuple(cross_ranks)), names


def abort_node_groups(names: list[str], abort_named) -> bool:
    """Abort the node and cross groups (`node_communicators`' names) so a collective blocked on a silent peer
    raises; `abort_named(name)` aborts a ray.util.collective group (`elastic.worker.abort_communicators`).
    Best effort: whether anything was aborted."""
    done = False
    for name in names:
        pg = _GLOO_GROUPS.get(name)
        if pg is None:
            done = abort_named(name) or done
            continue
        try:
            pg.abort()
            done = True
        except Exception:  # already destroyed, or the backend cannot
            pass
    return done
