"""Collective groups of runs sharing one Ray cluster: per-run rendezvous, nothing left behind on regroup.

Ray's gloo backend publishes rank 0's address under `collective_group_master_address_<group>`; with the group
"default" every run on a cluster used one key and each coordinator deleted it before forming its group.
"""
import json
import os
import subprocess
import sys
import threading

import pytest
import ray
import torch

from elastic import rendezvous
from elastic.cli import train
from elastic.config import run_dir

from .conftest import small_config, small_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@ray.remote(num_cpus=0)
class Member:
    """A bare process that joins and leaves groups as a worker does (elastic.rendezvous)."""

    def __init__(self):
        self.group = ""

    def join(self, world: int, rank: int, group: str) -> float:
        rendezvous.join(world, rank, "gloo", group, previous=self.group)
        self.group = group
        import ray.util.collective as col

        t = torch.ones(1)
        col.allreduce(t, group_name=group)
        return float(t)

    def leave(self) -> None:
        rendezvous.leave(self.group)
        self.group = ""

    def held(self) -> dict:
        import torch.distributed as dist
        from ray.util.collective import collective as col_impl

        return {"groups": sorted(col_impl._group_mgr._name_group_map),
                "torch_world": dist.get_world_size() if dist.is_initialized() else 0,
                "torch_groups": len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0}


def _named_actors() -> set:
    return {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}


@pytest.fixture
def connected(ray_cluster):
    ray.init(address=ray_cluster.address, namespace="raydistro", log_to_driver=False)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()


def test_regroups_with_other_world_sizes_keep_only_the_current_group(connected):
    """A named gloo group cannot outgrow the first default torch group of its process: a member leaves
    the whole previous generation (default group included), so the world can shrink and grow."""
    from ray.experimental import internal_kv

    members = [Member.remote() for _ in range(3)]
    before = _named_actors()
    other = rendezvous.rendezvous_key(rendezvous.group_name("leak-g1", 0))  # another run, named like a prefix
    internal_kv._internal_kv_put(other, "10.0.0.1:1")
    generations = [[0, 1], [0, 1, 2], [1, 2], [2, 0, 1]]
    for g, ranks in enumerate(generations):
        group = rendezvous.group_name("leak", g)
        out = ray.get([members[m].join.remote(len(ranks), r, group) for r, m in enumerate(ranks)], timeout=120)
        assert out == [float(len(ranks))] * len(ranks), (g, out)
        for m in set(range(3)) - set(ranks):  # left out of this generation: leaves, as a removed worker does
            ray.get(members[m].leave.remote())
        held = ray.get([members[m].held.remote() for m in ranks])
        assert all(h == {"groups": [group], "torch_world": len(ranks), "torch_groups": 2} for h in held), held
    internal_kv._internal_kv_put(rendezvous.rendezvous_key(rendezvous.group_name("leak", 9)), "10.0.0.2:1")
    assert rendezvous.forget_rendezvous("leak") == 1  # what a dead rank 0 left; rank 0 deletes its own
    assert internal_kv._internal_kv_get(other) is not None  # another run's key stays
    internal_kv._internal_kv_del(other)
    assert _named_actors() == before
    # an NCCL unique-id store (a detached actor named after its group) whose rank 0 died before destroying
    # its group: the coordinator removes those of its run's earlier generations, and no other run's
    from ray.util.collective.const import get_store_name

    ours = get_store_name(f"0@{rendezvous.group_name('leak', 1)}")
    theirs = get_store_name(f"0@{rendezvous.group_name('other', 1)}")
    # sync.hierarchy=node over nccl: a named group per node and per shard, each with its store
    node_store = get_store_name(f"0@{rendezvous.node_group_name(rendezvous.group_name('leak', 2), 1)}")
    shard_store = get_store_name(f"0@{rendezvous.shard_group_name(rendezvous.group_name('leak', 1), 0)}")
    stores = [Member.options(name=n, lifetime="detached").remote() for n in (ours, theirs, node_store, shard_store)]
    ray.get([m.held.remote() for m in stores])
    assert rendezvous.forget_rendezvous("leak", generation=3) == 1  # a flat run does not look for subgroups
    assert rendezvous.forget_rendezvous("leak", generation=3, subgroups=2) == 2
    assert _named_actors() == before | {("raydistro", theirs)}
    ray.kill(stores[1])
    for m in members:
        ray.kill(m)


def _train_cli(tmp_path, address, name, *overrides):
    args = [sys.executable, "-m", "elastic", "train", *small_overrides(tmp_path, address), f"run.name={name}",
            *overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_concurrent_gloo_runs_on_one_cluster_both_finish(tmp_path, ray_cluster):
    # each run also re-forms its group once (a collective error on every rank), so rendezvous overlap
    procs = {name: _train_cli(tmp_path, ray_cluster.address, name, "train.steps=6", "chaos.comm_error_at=[2]")
             for name in ("left", "right")}
    outputs = {}

    def wait(name, p):
        outputs[name] = p.communicate(timeout=500)[0]
    threads = [threading.Thread(target=wait, args=item) for item in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, p in procs.items():
        assert p.returncode == 0, outputs[name][-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["run_name"] == name and summary["state"] == "FINISHED" and summary["steps"] == 6
        assert summary["replica_hashes_agree"] is True
        assert summary["data"]["duplicated"] == 0 and summary["data"]["skipped"] == 0
        assert summary["world_size_history"][-1]["world_size"] == 2
        assert len({w["generation"] for w in summary["world_size_history"]}) >= 2  # it re-formed its group


def test_regroups_leave_no_actors_nor_rendezvous_keys_behind(tmp_path, connected):
    from ray.experimental import internal_kv

    before = _named_actors()
    cfg = small_config(tmp_path, "", "run.name=regroups", "train.steps=6", "chaos.comm_error_at=[1,2,3]")
    summary = train(cfg)
    assert summary["state"] == "FINISHED" and summary["steps"] == 6
    generations = {w["generation"] for w in summary["world_size_history"]}
    assert len(generations) >= 4, summary["world_size_history"]  # three regroups happened
    leftover = {name for _, name in _named_actors() - before if not name.endswith("/coordinator")}
    assert leftover == set()  # workers gone, no NCCL store / group info actors
    assert internal_kv._internal_kv_list(rendezvous.rendezvous_key(rendezvous.group_name("regroups", 0))[:-1]) == []
    assert run_dir(cfg).exists()
