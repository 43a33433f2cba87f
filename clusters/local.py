"""The local simulated autoscaling cluster: start, inspect and stop it on one machine.

Owns ``python -m clusters local up|down|status``. ``up`` starts one Ray head with the fake_multinode
provider (``RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config=...``) in its own
RAY_TMPDIR, on free ports, with the dashboard on 127.0.0.1 and token auth off (local only).
The autoscaler then launches simulated nodes (real raylet processes) on demand.

Promises, because the machine is shared with other Ray instances:

* ``down`` stops exactly what ``up`` started and nothing else. It never calls ``ray stop`` and never
  matches processes by name. A process is ours when it belongs to the OS session of the
  ``ray start`` we launched (``start_new_session``; Ray's own children, the autoscaler's simulated
  nodes and their workers all inherit it) or carries our private RAY_TMPDIR in its command line or
  environment, AND it runs as our user AND it started after ``up`` did (no PID-reuse accidents; the
  session counts only while the leader's PID still has the recorded start time, or is gone).
  ``down`` re-scans at stop time, so nodes the autoscaler added or removed since ``up`` are handled.
* the state (leader PID and start time, last-seen PIDs, RAY_TMPDIR, ports, addresses) lives in one
  JSON file:
  ``$RAYDISTRO_CACHE/local-cluster.json`` (default ``~/.cache/raydistro/local-cluster.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from clusters.validate import validate_document

DEFAULT_CONFIG = Path(__file__).with_name("local.yaml")
STATE_NAME = "local-cluster.json"


class LocalClusterError(RuntimeError):
    """A local-cluster operation cannot go on; the message says what to do."""


@dataclass
class LocalCluster:
    """What `up` started: enough for `status` and `down` to find it again."""

    config: str                  # the cluster YAML as given
    tmpdir: str                  # private RAY_TMPDIR (short: Ray's socket paths are length-limited)
    leader_pid: int              # the `ray start --head --block` process; its OS session holds ours
    started_at: float            # wall clock when `up` launched it
    gcs_port: int
    dashboard_port: int
    address: str                 # host:port for ray.init(address=...) / RAY_ADDRESS
    dashboard_url: str
    ports: dict = field(default_factory=dict)
    leader_start: int = 0        # leader's start time (clock ticks since boot): guards against PID reuse
    pids: list = field(default_factory=list)  # last seen (at `up`, refreshed by `status`); `down` re-scans

    @property
    def log_file(self) -> str:
        return os.path.join(self.tmpdir, "head.log")


# ---------------------------------------------------------------------------------------------
# state file


def cache_dir() -> Path:
    return Path(os.environ.get("RAYDISTRO_CACHE") or Path.home() / ".cache" / "raydistro")


def state_path() -> Path:
    return cache_dir() / STATE_NAME


def load_state() -> LocalCluster | None:
    path = state_path()
    if not path.exists():
        return None
    try:
        return LocalCluster(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise LocalClusterError(
            f"{path}: unreadable local-cluster state ({e}); stop the processes listed in it by hand "
            "and delete the file") from None


def _save_state(cluster: LocalCluster) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(cluster), indent=2))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# up


def cluster_env(tmpdir: str) -> dict:
    """Environment for the head and everything it spawns (the autoscaler's nodes inherit it)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # `ray job submit -- python ...` runs `python` from the head's PATH: make it this interpreter.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update({
        "RAY_TMPDIR": tmpdir,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # Local simulation only: real clusters use RAY_AUTH_MODE=token (docs/clusters.md).
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    return env


def up(config: str | Path = DEFAULT_CONFIG, timeout_s: float = 90.0) -> LocalCluster:
    """Start the simulated cluster described by `config`; returns its addresses."""
    existing = load_state()
    if existing is not None:
        if _our_processes(existing):
            raise LocalClusterError(
                f"a local cluster is already running (RAY_ADDRESS={existing.address}, state in "
                f"{state_path()}); run `python -m clusters local down` first")
        state_path().unlink(missing_ok=True)  # stale: its processes are gone

    config = Path(config)
    doc = yaml.safe_load(config.read_text())
    problems = validate_document(doc, str(config))
    if problems:
        raise LocalClusterError("\n".join(map(str, problems)))
    if doc["provider"].get("type") != "fake_multinode":
        raise LocalClusterError(
            f"{config}: provider.type: {doc['provider'].get('type')!r} is not fake_multinode; "
            "`local up` simulates a cluster on this machine, use `ray up` for cloud YAMLs")

    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if not ray_bin:
        raise LocalClusterError("no `ray` executable next to this Python; install ray[default]")

    tmpdir = tempfile.mkdtemp(prefix="rd-", dir="/tmp")  # short on purpose: socket path limit
    ports = {name: _free_port() for name in
             ("gcs", "dashboard", "client_server", "dashboard_agent_listen", "metrics_export")}
    host = _node_ip()
    address = f"{host}:{ports['gcs']}"
    doc["provider"]["gcs_address"] = address
    resolved = os.path.join(tmpdir, "cluster.yaml")
    with open(resolved, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)

    head_res = dict(doc["available_node_types"][doc["head_node_type"]].get("resources") or {})
    cmd = [
        ray_bin, "start", "--head", "--block",
        f"--port={ports['gcs']}",
        f"--num-cpus={head_res.pop('CPU', 1)}",
        f"--num-gpus={head_res.pop('GPU', 0)}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client_server']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--metrics-export-port={ports['metrics_export']}",
        f"--temp-dir={tmpdir}",
        f"--autoscaling-config={resolved}",
        "--disable-usage-stats",
    ]
    if head_res:
        cmd.append(f"--resources={json.dumps(head_res)}")

    started_at = time.time()
    log = open(os.path.join(tmpdir, "head.log"), "wb")
    proc = subprocess.Popen(cmd, env=cluster_env(tmpdir), cwd=tmpdir, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    leader = _stat(proc.pid)
    cluster = LocalCluster(
        config=str(config), tmpdir=tmpdir, leader_pid=proc.pid, started_at=started_at - 2.0,
        gcs_port=ports["gcs"], dashboard_port=ports["dashboard"], address=address,
        dashboard_url=f"http://127.0.0.1:{ports['dashboard']}", ports=ports,
        leader_start=leader[2] if leader else 0)
    _save_state(cluster)  # before waiting: a failed start is still cleaned up by `down`

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = _tail(cluster.log_file)
            down(cluster)
            raise LocalClusterError(f"`ray start --head` exited with {proc.returncode}:\n{tail}")
        if b"block forever" in Path(cluster.log_file).read_bytes():
            cluster.pids = sorted(_our_processes(cluster))
            _save_state(cluster)
            publish_node_types(address, doc)
            return cluster
        time.sleep(0.5)
    tail = _tail(cluster.log_file)
    down(cluster)
    raise LocalClusterError(f"head did not come up within {timeout_s:.0f}s; log tail:\n{tail}")


def node_group_config(doc: dict):
    """Ray's `ClusterConfig` (autoscaler.proto) of a cluster YAML: one node group per worker node type with its
    resources and min/max count."""
    from ray.core.generated import autoscaler_pb2

    cc = autoscaler_pb2.ClusterConfig()
    for name, spec in (doc.get("available_node_types") or {}).items():
        if name == doc.get("head_node_type"):
            continue
        group = cc.node_group_configs.add()
        group.name = name
        group.min_count = int(spec.get("min_workers", 0) or 0)
        group.max_count = int(spec.get("max_workers", doc.get("max_workers", 0)) or 0)
        for key, value in (spec.get("resources") or {}).items():
            group.resources[key] = int(value)
    return cc


def publish_node_types(address: str, doc: dict) -> None:
    """Tell the cluster which node types its autoscaler may add, where Ray reads that
    (`ray._private.state.state.get_cluster_config()`, the autoscaler's ClusterConfig in the GCS, which Ray Train
    reads too; in Ray 2.60 none of the open-source autoscalers writes it, this simulation's v1 autoscaler
    included). raydistro's `train.device=auto` then asks for GPU workers on a cluster that starts with no GPU
    node; on clusters that publish no config, `train.device=cuda` does."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE, GcsClient

    gcs = GcsClient(address=address)
    gcs.internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), node_group_config(doc).SerializeToString(),
                        True, GCS_AUTOSCALER_STATE_NAMESPACE.encode())


# ---------------------------------------------------------------------------------------------
# down


def down(cluster: LocalCluster | None = None, keep_logs: bool = False,
         grace_s: float = 15.0) -> list[int]:
    """Stop every process of the cluster (head, autoscaler, simulated nodes, workers).

    Returns the PIDs that were running. The leader gets SIGTERM first (Ray then shuts down its own
    children gracefully); whatever is left gets SIGTERM, then SIGKILL.
    """
    cluster = cluster or load_state()
    if cluster is None:
        return []
    found = set(_our_processes(cluster))
    if cluster.leader_pid in found:
        _signal(cluster.leader_pid, signal.SIGTERM)
        _wait_gone(cluster, [cluster.leader_pid], grace_s)
    for sig, wait in ((signal.SIGTERM, grace_s / 2), (signal.SIGKILL, 5.0)):
        left = _our_processes(cluster)
        found |= set(left)
        if not left:
            break
        for pid in left:
            _signal(pid, sig)
        _wait_gone(cluster, left, wait)
    left = _our_processes(cluster)
    if left:
        raise LocalClusterError(f"processes {left} survived SIGKILL; state kept in {state_path()}")
    if not keep_logs:
        shutil.rmtree(cluster.tmpdir, ignore_errors=True)
    current = load_state()
    if current is not None and current.leader_pid == cluster.leader_pid:
        state_path().unlink(missing_ok=True)
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# status


def status(cluster: LocalCluster | None = None) -> str:
    """A human summary: addresses, our PIDs, and `ray status` (nodes, resources, demands)."""
    cluster = cluster or load_state()
    if cluster is None:
        return f"no local cluster (no state in {state_path()}); start one with `python -m clusters local up`"
    pids = _our_processes(cluster)
    current = load_state()
    if pids and current is not None and current.leader_pid == cluster.leader_pid:
        cluster.pids = sorted(pids)
        _save_state(cluster)
    lines = [
        f"config:      {cluster.config}",
        f"RAY_TMPDIR:  {cluster.tmpdir}",
        f"RAY_ADDRESS={cluster.address}",
        f"dashboard:   {cluster.dashboard_url}",
        f"processes:   {len(pids)} (leader {cluster.leader_pid}"
        f"{'' if cluster.leader_pid in pids else ', NOT running'})",
    ]
    if cluster.leader_pid in pids:
        ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
        res = subprocess.run([ray_bin, "status", f"--address={cluster.address}"],
                             env=cluster_env(cluster.tmpdir), capture_output=True, text=True,
                             timeout=60)
        lines.append(res.stdout.rstrip() or res.stderr.rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# finding our processes (Linux /proc; never by name)


def _our_processes(cluster: LocalCluster) -> list[int]:
    """PIDs of live processes of `cluster`: see the module docstring for the rule."""
    uid = os.getuid()
    marker = cluster.tmpdir.encode()
    env_marker = b"RAY_TMPDIR=" + marker
    boot = _boot_time()
    ticks = os.sysconf("SC_CLK_TCK")
    # The session id is the leader's PID; trust it only while that PID is still (or was) our leader.
    leader = _stat(cluster.leader_pid)
    session_ok = leader is None or leader[2] == cluster.leader_start
    ours = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            info = _stat(pid)
            if info is None:
                continue
            state, sid, start_ticks = info
            if state == "Z":  # exited, waiting to be reaped: nothing left to stop
                continue
            if boot + start_ticks / ticks < cluster.started_at:
                continue  # older than our cluster: cannot be ours, whatever it looks like
            if session_ok and sid == cluster.leader_pid:
                ours.append(pid)
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    ours.append(pid)
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if env_marker + b"\0" in f.read() + b"\0":
                    ours.append(pid)
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked, or not readable: not ours to touch
    return ours


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time in clock ticks since boot) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[3]), int(fields[19])


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime"):
                return float(line.split()[1])
    raise LocalClusterError("/proc/stat has no btime; `local` needs Linux /proc")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(cluster: LocalCluster, pids: list[int], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = set(_our_processes(cluster))
        if not alive.intersection(pids):
            return
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_ip() -> str:
    # The IP Ray itself will advertise for this node (and for the simulated nodes).
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _tail(path: str, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
