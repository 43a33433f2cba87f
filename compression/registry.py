"""`build_sync`: the one place a strategy is built from its name (`sync.name`).

Kept apart from `compression.sync` (the interface the strategies import) so the registry, which imports
every strategy, sits above them in the import graph and nothing imports back into it.
"""
from __future__ import annotations

from compression.communicator import Communicator
from compression.config import SyncConfig, sync_option_problem
from compression.demo import DemoSync
from compression.dense import DenseSync
from compression.diloco import DilocoSync
from compression.hierarchy import HierarchicalDemoSync
from compression.sync import Sync

STRATEGIES: dict[str, type[Sync]] = {"dense": DenseSync, "demo": DemoSync, "diloco": DilocoSync}


def build_sync(cfg: SyncConfig, params, comm: Communicator) -> Sync:
    """The strategy named by `cfg.name` over `params` (an iterable of tensors requiring grad). With
    `cfg.hierarchy == "node"`, `comm` is a `compression.hierarchy.NodeGroups` (the node's group and the shard's
    cross-node group) and demo runs hierarchically."""
    params = [p for p in params]
    if not params:
        raise ValueError("build_sync: no parameters given")
    if cfg.name not in STRATEGIES:
        raise ValueError(f"sync.name: '{cfg.name}' is not a strategy (dense | demo | diloco)")
    problem = sync_option_problem(cfg, "hierarchy")
    if problem:
        raise ValueError(problem)
    if cfg.hierarchy == "node":
        return HierarchicalDemoSync(cfg, params, comm)
    return STRATEGIES[cfg.name](cfg, params, comm)
