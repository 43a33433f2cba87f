"""raydistro.compression: how replicas agree on an update (dense AdamW all-reduce, DeMo compressed sync,
DiLoCo local steps with an outer step every H).

Knows torch and a Communicator; nothing of Ray actors or data. See docs/compression.md.
"""
from compression.codec import PayloadError, WireFormat
from compression.communicator import (Communicator, RayCollectiveCommunicator, ThreadCommunicator,
                                      TorchDistributedCommunicator, run_threads)
from compression.config import SyncConfig
from compression.dense import DenseSync
from compression.demo import DemoSync
from compression.diloco import DilocoSync
from compression.hierarchy import HierarchicalDemoSync, NodeGroups, node_topology
from compression.optim import DeMo, DiLoCo
from compression.registry import build_sync
from compression.sync import ExchangeStats, Sync

__all__ = ["build_sync", "Sync", "ExchangeStats", "PayloadError", "WireFormat", "SyncConfig", "DeMo", "DiLoCo",
           "DenseSync", "DemoSync", "DilocoSync", "HierarchicalDemoSync", "NodeGroups", "node_topology", "Communicator", "RayCollectiveCommunicator", "TorchDistributedCommunicator",
           "ThreadCommunicator", "run_threads"]
