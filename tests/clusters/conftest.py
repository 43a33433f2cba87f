"""Shared by the clusters tests: process liveness, and a private state dir for `clusters local`."""
import os

import pytest

from clusters import local


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (reads /proc through clusters.local's own parser)."""
    stat = local._stat(pid)
    return stat is not None and stat[0] != "Z"


@pytest.fixture
def cluster_env(tmp_path, monkeypatch):
    """Env for the CLI with a private state dir; tears the cluster down however the test ends."""
    monkeypatch.setenv("RAYDISTRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = dict(os.environ)
    try:
        yield env
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            state = local.load_state()
            if state is not None:
                # a test's cluster holds no state worth a graceful exit: 5 s before SIGTERM/SIGKILL, not 15
                local.down(state, grace_s=5.0)
