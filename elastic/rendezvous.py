"""A run's collective groups on a shared Ray cluster: their names, their rendezvous keys, their teardown.

Owns: `group_name` (the group of a run's membership generation), `rendezvous_key` (where ray.util.collective's
gloo backend publishes rank 0's address), `join` and `leave` (a worker's side), `forget_rendezvous` (the
coordinator's side).
Promises:
- two runs on one Ray cluster never share a group name nor a rendezvous key: both carry the run's name and
  the generation (Ray's gloo backend keys its rendezvous `collective_group_master_address_<group name>`; with
  the group "default" every run on the cluster used the same key and one run's coordinator deleted the
  other's);
- a group a worker leaves leaves nothing behind in that process nor on the cluster: gloo's torch process
  groups (the default one too, so the next generation can have another world size: torch fixes a named
  group's world to the default group's) and NCCL's communicators and its detached unique-id store actor
  (Ray creates one per group on rank 0 and kills it only if rank 0 destroys the group itself);
- the coordinator deletes only its own run's rendezvous keys.
"""
from __future__ import annotations

import logging

log = logging.getLogger("raydistro.rendezvous")

KEY_PREFIX = "collective_group_master_address_"  # ray.util.collective's gloo backend (torch_gloo_collective_group)


def group_name(run_name: str, generation: int) -> str:
    """The collective group of `run_name`'s membership generation `generation` (gloo and NCCL alike)."""
    return f"raydistro-{run_name}-g{generation}"


def node_group_name(group: str, node: int) -> str:
    """`sync.hierarchy=node`: the collective group of node `node`'s ranks in the flat group `group`."""
    return f"{group}-node{node}"


def shard_group_name(group: str, shard: int) -> str:
    """`sync.hierarchy=node`: the cross-node group of the owners of shard `shard` in the flat group `group`."""
    return f"{group}-shard{shard}"


def rendezvous_key(group: str) -> str:
    """The internal-KV key under which Ray's gloo backend publishes rank 0's address for `group`."""
    return KEY_PREFIX + group


# NCCL store actors are named sha256("<devices>@<group>"); a worker with one GPU sees it as device 0
_NCCL_DEVICE_KEYS = tuple(str(d) for d in range(16))


SUBGROUP_GENERATIONS = 8  # how many earlier generations' node/shard groups `forget_rendezvous` looks for


def forget_rendezvous(run_name: str, generation: int | None = None, subgroups: int = 0) -> int:
    """Delete every rendezvous key this run left in the cluster's KV (a rank 0 that died during a rendezvous
    leaves its address behind) and, given the generation being formed, the NCCL store actors of this run's
    earlier generations that are still alive (one whose rank 0 died before destroying its group); other
    runs' keys and actors are untouched. Returns how many keys and actors were deleted.

    `subgroups` (the most nodes or shards a generation can have: the run's largest world size) also looks
    for the stores of `sync.hierarchy=node`'s node and shard groups (nccl: one named group each) of the last
    `SUBGROUP_GENERATIONS` generations: every generation's call removes what the ones before it left, so a
    wider window only matters after calls that failed (each name is a sha256 to compute)."""
    from ray.experimental import internal_kv

    deleted = _forget_nccl_stores(run_name, generation, subgroups) if generation else 0

    prefix = rendezvous_key(group_name(run_name, 0))[:-1]  # "...raydistro-<run>-g"
    try:
        keys = internal_kv._internal_kv_list(prefix)
    except Exception:
        log.debug("listing rendezvous keys failed", exc_info=True)
        return 0
    for key in keys:
        name = key.decode() if isinstance(key, bytes) else key
        if name[len(prefix):].isdigit():  # this run's generations only, not run "<run>-g..." of another
            try:
                internal_kv._internal_kv_del(name)
                deleted += 1
            except Exception:
                log.debug("deleting rendezvous key %s failed", name, exc_info=True)
    return deleted


def _forget_nccl_stores(run_name: str, generation: int, subgroups: int = 0) -> int:
    import ray
    from ray.util.collective.const import get_store_name

    from elastic.group import kill_quietly

    try:
        alive = set(ray.util.list_named_actors())  # this namespace: where the run's workers made them
    except Exception:
        log.debug("listing named actors failed", exc_info=True)
        return 0
    groups = [group_name(run_name, g) for g in range(generation)]
    groups += [name(group_name(run_name, g), i) for g in range(max(0, generation - SUBGROUP_GENERATIONS), generation)
               for i in range(subgroups) for name in (node_group_name, shard_group_name)]
    stale = {get_store_name(f"{key}@{group}") for group in groups for key in _NCCL_DEVICE_KEYS} & alive
    for name in stale:  # one gone meanwhile is fine
        kill_quietly(name)
    return len(stale)


def join(world_size: int, rank: int, backend: str, group: str, previous: str = "") -> None:
    """A worker's side of forming `group`: whatever it still holds of `previous` (and any other group in
    this process) goes first, then the rendezvous."""
    import ray.util.collective as col

    leave(previous)
    col.init_collective_group(world_size, rank, backend=backend, group_name=group)


def leave(group: str = "") -> None:
    """Destroy `group` and every other collective group this process holds, with what they own: NCCL
    communicators and unique-id store actors, gloo process groups (the default torch one included).
    Safe to call twice, and on a group that failed mid-collective."""
    from ray.util.collective import collective as col_impl

    with col_impl._group_mgr_lock:
        names = set(col_impl._group_mgr._name_group_map)
    for name in names | ({group} if group else set()):
        _destroy(name)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        log.debug("destroying the default torch process group failed", exc_info=True)


def _destroy(name: str) -> None:
    from ray.util.collective import collective as col_impl
    from ray.util.collective.const import get_store_name

    from elastic.group import kill_quietly

    with col_impl._group_mgr_lock:
        g = col_impl._group_mgr._name_group_map.get(name)
    if g is None:
        return
    # NCCL: the store actors of this group's communicators (any rank may kill them: every rank has its
    # unique id once the communicators exist; Ray's own destroy kills them on rank 0 only)
    stores = [get_store_name(f"{key}@{name}") for key in (getattr(g, "_dev_comm_map", None) or {})]
    try:
        col_impl.destroy_collective_group(name)
    except Exception:  # e.g. rank 0 finding its store already killed by a peer
        log.debug("destroying collective group %s failed", name, exc_info=True)
    for store in stores:  # one already gone is fine
        kill_quietly(store)
