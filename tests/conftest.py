"""Session-wide test environment: a private RAY_TMPDIR, token auth off for local clusters.

Every Ray instance a test starts lives under this session's RAY_TMPDIR and is stopped by the test
(ray.shutdown / cluster.shutdown / by PID): never `ray stop`, other users' Ray shares the machine.
"""
import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if "RAY_TMPDIR" not in os.environ or not os.environ["RAY_TMPDIR"].startswith("/tmp/rdt-"):
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rdt-", dir="/tmp")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# without a GPU, Triton's interpreter runs the fused codec kernels (compression.kernels) on CPU tensors;
# it must be chosen before triton is first imported
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
