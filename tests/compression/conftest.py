import os
import sys
import tempfile

import pytest

# tests run with --import-mode=importlib: make the shared test kit next to this file importable
sys.path.insert(0, os.path.dirname(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU Ray instance for this module (own temp dir; never touches other Ray instances).
    Module scope: later test folders start their own clusters and need this process disconnected."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    os.environ["RAY_AUTH_MODE"] = "disabled"
    tmp = tempfile.mkdtemp(prefix="rdc-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    env = {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "RAY_AUTH_MODE": "disabled"}
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, runtime_env={"env_vars": env},
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
