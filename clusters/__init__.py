"""raydistro cluster configuration and its small tooling.

Owns the cluster files (``local.yaml`` for a simulated laptop/CI cluster, ``aws-mixed-gpu.yaml``,
``gcp-mixed-gpu.yaml``, ``kuberay/raycluster.yaml``, ``kuberay/rayjob.yaml``, ``kuberay/podmonitor.yaml``), the
GPU image they run (``docker/Dockerfile``), the Grafana dashboard
(``grafana/raydistro.json``), their validation (``clusters.validate``) and the local autoscaling
cluster (``clusters.local``). Imports nothing from ``elastic``, ``datasets`` or ``compression``.

CLI: ``python -m clusters validate FILE...`` and ``python -m clusters local up|down|status [FILE]``.
"""

from pathlib import Path

CLUSTER_DIR = Path(__file__).parent
SHIPPED_FILES = (
    CLUSTER_DIR / "local.yaml",
    CLUSTER_DIR / "aws-mixed-gpu.yaml",
    CLUSTER_DIR / "gcp-mixed-gpu.yaml",
    CLUSTER_DIR / "kuberay" / "raycluster.yaml",
    CLUSTER_DIR / "kuberay" / "rayjob.yaml",
    CLUSTER_DIR / "kuberay" / "podmonitor.yaml",
)
DOCKERFILE = CLUSTER_DIR / "docker" / "Dockerfile"
GRAFANA_DASHBOARD = CLUSTER_DIR / "grafana" / "raydistro.json"
