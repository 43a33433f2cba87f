"""The Ray a run trains on: the cluster at RAY_ADDRESS / cluster.address, one started here, or one started here
with simulated GPU nodes (`cluster.simulate`).

`RayRuntime` is a context manager: on exit it disconnects from (or shuts down) only what it connected to (or
started); a process already connected to Ray (a notebook that called `ray.init()`) stays connected. It owns the
simulated nodes, so node faults (`chaos.remove_node_at` / `add_node_at`, elastic/chaos.py `NodeChaos`) act through
it.
"""
from __future__ import annotations

import os

from elastic.config import ConfigError


class RayRuntime:
    """Connects to RAY_ADDRESS / cluster.address, or starts Ray here (optionally simulating nodes)."""

    def __init__(self, cfg, log_to_driver: bool = True):
        self.cfg = cfg
        self.log_to_driver = log_to_driver  # off when stdout carries JSON: Ray prints node deaths there
        self.cluster = None
        self.sim_nodes: list = []
        self.started_here = False

    def __enter__(self):
        import ray

        c = self.cfg.cluster
        address = c.address or os.environ.get("RAY_ADDRESS", "")
        self.reused = False
        if ray.is_initialized():
            if c.address or c.simulate:
                raise ConfigError("this process is already connected to Ray: call ray.shutdown() first, or drop "
                                  "cluster.address/cluster.simulate to train on the connected cluster")
            self.reused = True  # e.g. a notebook that called ray.init(): train there, leave it connected
            return self
        if c.simulate or not address:  # a Ray started here: its nodes get Ray's settings for slow links (a
            for k, v in c.ray_node_env.items():  # value already in the environment wins)
                os.environ.setdefault(k, str(v))
        # the repo root must be importable by workers on every node (ray job submit sets it via working_dir)
        if c.simulate:
            from ray.cluster_utils import Cluster

            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            for acc in c.simulate:
                self.add_sim_node(acc)
            ray.init(address=self.cluster.address, namespace=c.namespace, log_to_driver=self.log_to_driver)
            self.started_here = True
        elif address:
            ray.init(address=address, namespace=c.namespace, log_to_driver=self.log_to_driver)
        else:
            ncpu = c.num_cpus if c.num_cpus is not None else max(os.cpu_count() or 2, self.cfg.train.workers)
            ray.init(num_cpus=ncpu, namespace=c.namespace, include_dashboard=False, log_to_driver=self.log_to_driver)
            self.started_here = True
        return self

    def add_sim_node(self, acc: str):
        node = self.cluster.add_node(num_cpus=self.cfg.cluster.simulate_node_cpus, num_gpus=1,
                                     resources={f"accelerator_type:{acc}": 1})
        self.sim_nodes.append(node)
        return node

    def remove_sim_node(self, index: int = -1):
        if self.sim_nodes:
            node = self.sim_nodes.pop(index)
            self.cluster.remove_node(node, allow_graceful=False)

    def __exit__(self, *exc):
        import ray

        if self.reused:
            return
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
