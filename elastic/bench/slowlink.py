"""Slow links, for real: Ray nodes in their own network namespaces behind tc-shaped veth links.

`python -m elastic.bench.slowlink --json [--rates unshaped,1gbit,100mbit] [--syncs dense,demo] [--steps N]`

Builds, on this machine (root, `ip` and `tc` needed):

    ns <p>h  (Ray head, --num-cpus=0: GCS, coordinator, driver)   eth9 10.99.0.1/24 --+
    ns <p>a  (Ray worker node, --num-cpus=1: training worker 1)  eth9 10.99.0.2/24 --+-- br0 in ns <p>s
    ns <p>b  (Ray worker node, --num-cpus=1: training worker 2)  eth9 10.99.0.3/24 --+

Every node has one veth ("eth9" in every namespace, so one GLOO_SOCKET_IFNAME serves all) to a bridge
in a switch namespace. Each link is shaped in both directions with `tbf` (egress of eth9 in the node's
namespace = upload, egress of the switch-side peer = download), like a host on its own NIC.
Everything that goes between nodes crosses those links: GCS/raylet RPCs, object transfers, actor
calls and the gloo collective. The addresses exist only inside these namespaces. `netem` is not
available here, so only bandwidth is shaped: no added latency, no loss.

For each rate, each sync strategy trains the same model for a fixed number of steps (bounded by a
timeout); tokens/s is the steady state from the summary's per-step commit times (first steps skipped).
Teardown (node processes by PID and process group, every process left in our namespaces, the
namespaces, the temp dirs) always runs, also on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from elastic.summary import STEP_TIMING_COLS

REPO = Path(__file__).resolve().parents[2]  # elastic/bench/<this file> -> the repository
IFNAME = "eth9"
SUBNET = "10.99.0"
GCS_PORT = 6379
NS_RE = re.compile(r"^rdsl(\d+)([habs])$")
DOCS = REPO / "docs"
PLOT = DOCS / "throughput_vs_bandwidth.png"


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout)


def available() -> str | None:
    """None when this machine can build shaped namespaces, else the reason it can't."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2)"
    return None


def rate_bytes_per_s(rate: str) -> float | None:
    """'100mbit' -> 12.5e6; 'unshaped' -> None."""
    if rate in ("unshaped", "none", ""):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate.lower())
    if not m:
        raise ValueError(f"rate '{rate}': expected e.g. 100mbit, 1gbit, 500kbit or unshaped")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


class Netns:
    """A set of namespaces joined by veth links (optionally through a bridge), all removed by close()."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"rdsl{os.getpid()}"
        self.names: list[str] = []
        self.links: list[tuple[str, str]] = []  # (namespace, device) pairs to shape

    def ns(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def add(self, role: str) -> str:
        name = self.ns(role)
        _sh("ip", "netns", "add", name)
        self.names.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        _sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        self.links += [(ns_a, dev_a), (ns_b, dev_b)]

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        _sh("ip", "-n", ns, "addr", "add", cidr, "dev", dev)
        _sh("ip", "-n", ns, "link", "set", dev, "up")

    def shape(self, rate: str) -> None:
        """tbf at `rate` on the egress of every link end (both directions); 'unshaped' removes it."""
        bps = rate_bytes_per_s(rate)
        for ns, dev in self.links:
            if bps is None:
                _sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            else:
                burst = max(64 * 1024, int(bps * 0.004))  # >= 4 ms of tokens: 1gbit needs more than 64kb
                _sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", str(burst), "latency", "50ms")

    def qdisc(self, ns: str, dev: str) -> str:
        return _sh("tc", "-n", ns, "qdisc", "show", "dev", dev, check=False).stdout.strip()

    def tx_bytes(self, ns: str, dev: str = IFNAME) -> int:
        out = _sh("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def exec_argv(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def close(self) -> None:
        for name in reversed(self.names):
            kill_namespace_pids(name)
            _sh("ip", "netns", "del", name, check=False)
        self.names = []


def kill_namespace_pids(ns: str, grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process inside namespace `ns` (only ours live there)."""
    def pids() -> list[int]:
        out = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]

    found = pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while pids() and time.time() < deadline:
            time.sleep(0.1)
    return found


def cleanup_stale() -> list[str]:
    """Remove namespaces a previous, killed slowlink run left behind (its pid is gone)."""
    removed = []
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NS_RE.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its creator still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        kill_namespace_pids(name)
        _sh("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


def star_wire(net: Netns, roles: list[str]):
    """One namespace per role, each with eth9 (10.99.0.N): a TUN device of a `netwire.Wire` process, which
    carries every packet between nodes with the bandwidth and delay it is `set` to (for kernels without
    netem). Returns (nodes, wire)."""
    from elastic.bench.netwire import MTU, Wire

    ips = [f"{SUBNET}.{i + 1}" for i in range(len(roles))]
    names = [f"{net.prefix}t{role}" for role in roles]
    wire = Wire(names, ips)
    nodes = {}
    try:
        for role, name, ip in zip(roles, names, ips):
            ns = net.add(role)
            _sh("ip", "link", "set", name, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", name, "name", IFNAME)
            _sh("ip", "-n", ns, "link", "set", IFNAME, "mtu", str(MTU))
            net.addr(ns, IFNAME, f"{ip}/24")
            nodes[role] = {"ns": ns, "ip": ip}
    except BaseException:
        wire.close()
        raise
    return nodes, wire


def star(net: Netns, roles: list[str]) -> dict[str, dict]:
    """One namespace per role, each with eth9 (10.99.0.N) to a bridge in a switch namespace."""
    sw = net.add("s")
    _sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    _sh("ip", "-n", sw, "link", "set", "br0", "up")
    nodes = {}
    for i, role in enumerate(roles):
        ns = net.add(role)
        peer = f"p{role}"
        net.veth(ns, IFNAME, sw, peer)
        ip = f"{SUBNET}.{i + 1}"
        net.addr(ns, IFNAME, f"{ip}/24")
        _sh("ip", "-n", sw, "link", "set", peer, "master", "br0")
        _sh("ip", "-n", sw, "link", "set", peer, "up")
        nodes[role] = {"ns": ns, "ip": ip}
    return nodes


# ---- link counters: what each node's link really carries ------------------------------------------

def read_dev(pid: int, dev: str = IFNAME) -> tuple[int, int]:
    """(tx bytes, rx bytes) of `dev` in the network namespace of process `pid` (/proc/<pid>/net/dev shows the
    reader's view of that process's namespace: no subprocess, cheap enough to poll)."""
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == dev:
            f = rest.split()
            return int(f[8]), int(f[0])
    raise RuntimeError(f"no device {dev} in the namespace of pid {pid}")


class LinkCounters:
    """Polls every node's eth9 tx/rx byte counters (through a process inside each node's namespace) every
    `interval` s in a thread; `samples[role]` = [(unix time, tx, rx)]. Read at the steps' commit times later
    (`wire_per_step`), so the trainer is not touched."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1, dev: str = IFNAME):
        import threading

        self.pids, self.interval, self.dev = pids, interval, dev
        self.samples: dict[str, list[tuple[float, int, int]]] = {r: [] for r in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="slowlink-counters")

    def sample(self) -> None:
        for role, pid in self.pids.items():
            tx, rx = read_dev(pid, self.dev)
            self.samples[role].append((time.time(), tx, rx))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except (OSError, RuntimeError):
                pass  # a node process went away: its samples stop here
            self._stop.wait(self.interval)

    def __enter__(self) -> "LinkCounters":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.sample()
        except (OSError, RuntimeError):
            pass


def _at(samples: list[tuple[float, int, int]], t: float) -> tuple[float, float] | None:
    """(tx, rx) at time t, linear between the two samples around it; None outside the sampled span."""
    import bisect

    i = bisect.bisect_left([s[0] for s in samples], t)
    if i == 0 or i >= len(samples):
        return None
    (t0, tx0, rx0), (t1, tx1, rx1) = samples[i - 1], samples[i]
    w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
    return tx0 + w * (tx1 - tx0), rx0 + w * (rx1 - rx0)


def steady_steps(summary: dict, skip: int, margin: int = 2) -> list[tuple[int, float, float]]:
    """The steady-state steps as (step, commit time of the step before, own commit time): steps >= `skip`,
    and none within `margin` steps after a membership change (world_size_history after its first entry),
    nor a step whose previous step is missing."""
    timing = summary.get("step_timing") or []
    changes = [w["step"] for w in (summary.get("world_size_history") or [])[1:]]
    out = []
    for prev, cur in zip(timing, timing[1:]):
        step = cur[0]
        if step < skip or prev[0] != step - 1:
            continue
        if any(c <= step <= c + margin for c in changes):
            continue
        out.append((step, prev[1], cur[1]))
    return out


def wire_per_step(samples: dict[str, list[tuple[float, int, int]]], summary: dict, skip: int,
                  margin: int = 2, names: dict[str, str] | None = None) -> dict:
    """Per node, the bytes its link sent (tx) and received (rx) per steady-state step (between consecutive
    commits, from the polled counters), next to the sync payload (the summary's bytes sent per worker per
    step) and their ratio. The mean is the figure (it counts traffic that comes every k steps); the median
    and max show whether it is steady."""
    payload = summary.get("bytes_sent_per_step_mean") or 0.0
    steps = steady_steps(summary, skip, margin)
    nodes = {}
    for role, ss in samples.items():
        tx, rx, secs = [], [], 0.0
        for _, t0, t1 in steps:
            a, b = _at(ss, t0), _at(ss, t1)
            if a is None or b is None:
                continue
            tx.append(b[0] - a[0])
            rx.append(b[1] - a[1])
            secs += t1 - t0
        if not tx:
            continue
        d = {"steps": len(tx), "step_s_mean": round(secs / len(tx), 3)}
        for key, v in (("tx", tx), ("rx", rx)):
            mean = statistics.mean(v)
            d[f"wire_{key}_bytes_per_step"] = round(mean)
            # Ray's background traffic is paced by the clock: per second too, to scale to another step time
            d[f"wire_{key}_bytes_per_s"] = round(sum(v) / secs) if secs > 0 else None
            d[f"wire_{key}_bytes_per_step_median"] = round(statistics.median(v))
            d[f"wire_{key}_bytes_per_step_max"] = round(max(v))
            d[f"{key}_over_payload"] = round(mean / payload, 2) if payload else None
        nodes[(names or {}).get(role, role)] = d
    return {"payload_bytes_per_step": payload, "skip": skip, "margin_after_membership_change": margin,
            "steps": [s[0] for s in steps], "nodes": nodes}


def state_transfers(summary: dict, samples: dict[str, list[tuple[float, int, int]]],
                    names: dict[str, str] | None = None) -> list[dict]:
    """Every join's state transfer as the coordinator recorded it (its `state-from-peer` event: bytes on the wire,
    pack and fetch+load seconds; `elastic.state_transfer`), with what each node's link carried meanwhile (the
    polled counters, from 0.5 s before the source started packing to the event)."""
    from elastic.state_transfer import STATE_TRANSFER_RE

    out = []
    for e in summary.get("events") or []:
        m = re.search(STATE_TRANSFER_RE, e.get("what", ""))
        if not m:
            continue
        d = {k: float(v) if k.endswith(("_mb", "_s")) else v for k, v in m.groupdict().items()}
        t1 = e["t"]
        t0 = t1 - d["pack_s"] - d["load_s"] - 0.5
        links = {}
        for role, ss in samples.items():
            a, b = _at(ss, t0), _at(ss, t1)
            if a is not None and b is not None:
                links[(names or {}).get(role, role)] = {"tx": round(b[0] - a[0]), "rx": round(b[1] - a[1])}
        out.append({"step": e["step"], **d, "seconds": round(d["pack_s"] + d["load_s"], 2), "link_bytes": links})
    return out


# ---- where the bytes go: a header capture per node, classified by the Ray port it talks to ----------

# Every Ray node's listening ports are pinned (`RayNodes.start`), so a TCP packet's service is the known port
# on either end; both ends ephemeral is gloo (its listeners bind port 0), the collective's own traffic.
PORTS = {GCS_PORT: "gcs", 6380: "raylet", 6381: "object_manager", 6382: "metrics_export",
         6383: "dashboard_agent", 6384: "dashboard_agent", 6385: "runtime_env_agent"}
WORKER_PORTS = (10002, 10999)  # core worker gRPC servers: actor calls (step RPCs, reports), object owners


def port_kind(sport: int, dport: int) -> str:
    for port in (sport, dport):
        if port in PORTS:
            return PORTS[port]
    if any(WORKER_PORTS[0] <= port <= WORKER_PORTS[1] for port in (sport, dport)):
        return "worker_rpc"
    return "gloo_and_other"


def read_pcap(path: Path, ip: str) -> list[tuple[float, str, str, int]]:
    """[(unix time, 'tx'|'rx', kind, frame bytes)] from a tcpdump file of `ip`'s link (Ethernet or raw IP)."""
    import socket
    import struct

    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    me = socket.inet_aton(ip)
    out, off = [], 24
    while off + 16 <= len(data):
        sec, frac, incl, orig = struct.unpack(endian + "IIII", data[off:off + 16])
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if linktype == 1:  # Ethernet
            if pkt[12:14] != b"\x08\x00":
                out.append((sec + frac / (1e9 if nano else 1e6), "?", "non_ipv4", orig, 0))
                continue
            pkt = pkt[14:]
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            continue
        t = sec + frac / (1e9 if nano else 1e6)
        way = "tx" if pkt[12:16] == me else "rx"
        ihl = (pkt[0] & 15) * 4
        local = 0
        if pkt[9] == 6 and len(pkt) >= ihl + 4:
            sport, dport = struct.unpack(">HH", pkt[ihl:ihl + 4])
            kind = port_kind(sport, dport)
            local = sport if way == "tx" else dport
        else:
            kind = {1: "icmp", 17: "udp"}.get(pkt[9], f"ip_proto_{pkt[9]}")
        out.append((t, way, kind, orig, local))
    return out


def breakdown(packets: list[tuple], windows: list[tuple[float, float]], owners: dict[int, str] | None = None) -> dict:
    """Bytes per steady-state step by kind and direction: packets inside the windows (one per step). With
    `owners` (local TCP port -> process name), by '<process on this node> -> <kind>' instead."""
    import bisect

    if not windows:
        return {}
    windows = sorted(windows)
    starts = [w[0] for w in windows]
    tot: dict = {}
    for t, way, kind, n, *local in packets:
        if owners is not None:
            kind = f"{owners.get(local[0] if local else 0, 'unknown')} -> {kind}"
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t <= windows[i][1]:
            tot.setdefault(kind, {"tx": 0, "rx": 0}).setdefault(way, 0)
            tot[kind][way] += n
    k = len(windows)
    return {kind: {w: round(v / k) for w, v in d.items()}
            for kind, d in sorted(tot.items(), key=lambda kv: -sum(kv[1].values()))}


class Capture:
    """tcpdump (headers only) on eth9 inside each node's namespace while a run trains; stopped by its pid."""

    def __init__(self, net: "Netns", nodes: dict[str, dict], root: Path, tag: str):
        self.files = {r: root / f"{tag}-{r}.pcap" for r in nodes}
        self.nodes, self.procs = nodes, {}
        tcpdump = shutil.which("tcpdump")
        if tcpdump is None:
            raise SystemExit("slowlink --capture: needs tcpdump (apt-get install tcpdump)")
        for r, n in nodes.items():
            self.procs[r] = subprocess.Popen(net.exec_argv(n["ns"], tcpdump, "-i", IFNAME, "-s", "96", "-n",
                                                           "-U", "-w", str(self.files[r])),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline and not all(f.exists() for f in self.files.values()):
            time.sleep(0.1)
        import threading

        self.owners: dict[str, dict[int, str]] = {r: {} for r in nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._snapshot_owners, daemon=True) if shutil.which("ss") else None
        if self._thread is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _snapshot_owners(self) -> None:
        """Which process owns each local TCP port (`ss -tnp` in every namespace, every 2 s while the run
        trains: training workers' connections are gone once it ends)."""
        while not self._stop.wait(2.0):
            for r, n in self.nodes.items():
                out = _sh("ip", "netns", "exec", n["ns"], "ss", "-tnpH", check=False).stdout
                for line in out.splitlines():
                    m = re.search(r"\S+:(\d+)\s+\S+:\d+\s+users:\(\(\"([^\"]+)\"", line)
                    if m:
                        self.owners[r].setdefault(int(m.group(1)), m.group(2))

    def by_process(self, windows: list[tuple[float, float]]) -> dict:
        return {self.nodes[r]["ip"]: breakdown(read_pcap(f, self.nodes[r]["ip"]), windows, self.owners[r])
                for r, f in self.files.items() if f.exists()}

    def by_kind(self, windows: list[tuple[float, float]]) -> dict:
        return {self.nodes[r]["ip"]: breakdown(read_pcap(f, self.nodes[r]["ip"]), windows)
                for r, f in self.files.items() if f.exists()}


# ---- Ray nodes ---------------------------------------------------------------------------------

class RayNodes:
    """`ray start --block` per namespace, each with its own temp dir; stopped by process group."""

    def __init__(self, net: Netns, nodes: dict[str, dict], root: Path, ray_env: dict[str, str] | None = None,
                 node_env: dict[str, dict] | None = None, node_args: dict[str, list[str]] | None = None):
        self.net, self.nodes, self.root = net, nodes, root
        self.ray_env = ray_env or {}  # extra environment for the `ray start` processes (Ray's own settings)
        # per role: more environment / `ray start` arguments (elastic.bench.netns: one GPU per node, NCCL on eth9)
        self.node_env, self.node_args = node_env or {}, node_args or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.head_ip = nodes["h"]["ip"]
        self.address = f"{self.head_ip}:{GCS_PORT}"

    def env(self, role: str) -> dict:
        env = dict(os.environ)
        tmp = self.root / role
        tmp.mkdir(parents=True, exist_ok=True)
        env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, worker_cpus: int = 1, object_store_bytes: int = 400_000_000) -> None:
        ray_bin = str(Path(sys.executable).parent / "ray")
        # every port pinned (each namespace has its own ports), so a capture can tell what talks (port_kind)
        common = ["--block", "--disable-usage-stats", f"--object-store-memory={object_store_bytes}",
                  "--node-manager-port=6380", "--object-manager-port=6381", "--metrics-export-port=6382",
                  "--dashboard-agent-grpc-port=6383", "--dashboard-agent-listen-port=6384",
                  "--runtime-env-agent-port=6385", f"--min-worker-port={WORKER_PORTS[0]}",
                  f"--max-worker-port={WORKER_PORTS[1]}"]
        for role, node in self.nodes.items():
            if role == "h":
                args = [ray_bin, "start", "--head", f"--node-ip-address={node['ip']}", f"--port={GCS_PORT}",
                        "--num-cpus=0", "--include-dashboard=false",
                        f"--temp-dir={self.root / role}", *common]
            else:
                args = [ray_bin, "start", f"--address={self.address}", f"--node-ip-address={node['ip']}",
                        f"--num-cpus={worker_cpus}", *common]
            args += self.node_args.get(role, [])
            log = open(self.root / f"{role}.log", "w")
            self.procs[role] = subprocess.Popen(self.net.exec_argv(node["ns"], *args),
                                                env={**self.env(role), **self.ray_env, **self.node_env.get(role, {})},
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_started(role, 120)  # one at a time: nodes joining together time out on 2 cores

    def _wait_started(self, role: str, timeout: float) -> None:
        log = self.root / f"{role}.log"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            if self.procs[role].poll() is not None:
                raise RuntimeError(f"ray start ({role}) exited: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"ray start ({role}) not up after {timeout}s")

    def wait_nodes(self, timeout: float = 90) -> list[dict]:
        """Block until every node is alive in the GCS; returns [(ip, CPU)] as the head sees them."""
        code = (
            "import json,time,ray\n"
            f"ray.init(address='{self.address}', log_to_driver=False)\n"
            f"deadline=time.time()+{timeout}\n"
            "while True:\n"
            "    alive=[n for n in ray.nodes() if n['Alive']]\n"
            f"    if len(alive)>={len(self.nodes)} or time.time()>deadline: break\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps([{'ip':n['NodeManagerAddress'],'cpus':n['Resources'].get('CPU',0)} for n in alive]))\n"
            "ray.shutdown()\n")
        out = subprocess.run(self.net.exec_argv(self.nodes["h"]["ns"], sys.executable, "-c", code),
                             env=self.env("h"), capture_output=True, text=True, timeout=timeout + 60)
        nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else []
        if len(nodes) < len(self.nodes):
            raise RuntimeError(f"only {len(nodes)}/{len(self.nodes)} Ray nodes came up: {out.stderr[-2000:]}")
        return nodes

    def stop(self) -> None:
        for role, p in self.procs.items():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # ray start --block stops its node's processes
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs = {}


# ---- one training run --------------------------------------------------------------------------

MARKERS = {"dense": "o", "demo": "s", "diloco": "^"}  # the strategies, in the order tables and plots show them


def steady_tokens_per_s(summary: dict, skip: int) -> dict:
    """Tokens/s between the commit of step `skip-1` and the last commit (per-step commit times)."""
    timing = summary.get("step_timing") or []
    hist = summary.get("loss_history") or []
    cum = {row[0]: row[2] for row in hist}
    if len(timing) > skip + 1:
        first, last = timing[skip - 1] if skip > 0 else timing[0], timing[-1]
        tokens = cum[last[0]] - cum[first[0]]
        secs = last[1] - first[1]
        gaps = [b[1] - a[1] for a, b in zip(timing[skip - 1 if skip else 0:], timing[skip if skip else 1:])]
        comm_i, compute_i = STEP_TIMING_COLS.index("comm_ms"), STEP_TIMING_COLS.index("compute_s")
        comm = [row[comm_i] for row in timing[skip:]]
        compute = [row[compute_i] for row in timing[skip:]]
        return {"tokens_per_s": tokens / secs if secs > 0 else None, "steps_measured": last[0] - first[0],
                "step_s_median": statistics.median(gaps) if gaps else None,
                # slowest worker's time inside the collective (includes waiting for the other) and
                # read+forward/backward: CPU contention shows in compute, the link in comm
                "comm_ms_median": statistics.median(comm) if comm else None,
                "compute_s_median": statistics.median(compute) if compute else None}
    tokens, wall = summary.get("tokens", 0), summary.get("wall_s", 0.0)
    return {"tokens_per_s": tokens / wall if wall else None, "steps_measured": summary.get("steps"),
            "step_s_median": None, "comm_ms_median": None, "note": "whole run (no step_timing)"}


def train_once(net: Netns, ray_nodes: RayNodes, sync: str, rate: str, steps: int, skip: int,
               preset: str, extra: list[str], timeout_s: float, run_dir: Path, capture: bool = False) -> dict:
    name = f"sl-{sync}-{rate}-{int(time.time())}"
    argv = [sys.executable, "-m", "elastic", "train", "--config", preset, "--json",
            f"sync.name={sync}", f"train.steps={steps}", "train.workers=2", "train.min_workers=2",
            "train.max_workers=2", "checkpoint.every=0", "train.eval_tokens=2048",
            f"cluster.address={ray_nodes.address}", f"cluster.gloo_socket_ifname={IFNAME}",
            f"run.dir={run_dir}", f"run.name={name}", "train.step_timeout_s=120", *extra]
    before = {r: net.tx_bytes(n["ns"]) for r, n in ray_nodes.nodes.items()}
    load0 = os.getloadavg()[0]
    log = open(run_dir / f"{name}.stderr", "w")
    t0 = time.time()
    counters = LinkCounters({r: ray_nodes.procs[r].pid for r in ray_nodes.nodes})  # pids inside each namespace
    cap = Capture(net, ray_nodes.nodes, run_dir, name) if capture else None
    with counters:
        p = subprocess.Popen(net.exec_argv(ray_nodes.nodes["h"]["ns"], *argv), cwd=str(REPO),
                             env=ray_nodes.env("h"), stdout=subprocess.PIPE, stderr=log, text=True,
                             start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except BaseException:
            _stop_group(p)
            raise
        finally:
            log.close()
            if cap is not None:
                cap.stop()
    elapsed = time.time() - t0
    after = {r: net.tx_bytes(n["ns"]) for r, n in ray_nodes.nodes.items()}
    summary_path = run_dir / name / "summary.json"
    if not summary_path.exists():
        tail = (run_dir / f"{name}.stderr").read_text()[-3000:]
        raise RuntimeError(f"{sync} at {rate}: no summary.json (exit {p.returncode}); stderr tail:\n{tail}")
    s = json.loads(summary_path.read_text())
    steady = steady_tokens_per_s(s, skip)
    roles = {"h": "head", "a": "worker node a", "b": "worker node b"}
    wire = wire_per_step(counters.samples, s, skip,
                         names={r: ray_nodes.nodes[r]["ip"] for r in ray_nodes.nodes})
    for r, n in ray_nodes.nodes.items():
        if n["ip"] in wire["nodes"]:
            wire["nodes"][n["ip"]]["role"] = roles.get(r, r)
    # a join's state transfer (e.g. after chaos.kill_at=[k]): bytes and seconds, and each link's share
    joins = state_transfers(s, counters.samples, names={r: ray_nodes.nodes[r]["ip"] for r in ray_nodes.nodes})
    if cap is not None:  # per steady-state step, by the Ray port each packet talks to
        wire["by_kind"] = cap.by_kind([(t0, t1) for _, t0, t1 in steady_steps(s, skip)])
        wire["by_process"] = cap.by_process([(t0, t1) for _, t0, t1 in steady_steps(s, skip)])
        for f in cap.files.values():
            f.unlink(missing_ok=True)
    return {
        "sync": sync, "rate": rate, "state": s.get("state"), "steps": s.get("steps"),
        **steady,
        "tokens_per_s_whole_run": s["tokens"] / s["wall_s"] if s.get("wall_s") else None,
        "bytes_sent_per_worker_per_step": s.get("bytes_sent_per_step_mean"),
        "link_tx_bytes": {ray_nodes.nodes[r]["ip"]: after[r] - before[r] for r in after},
        # steady state, from each node's own link counters at the step commits (issue 23)
        "wire": wire,
        "state_transfers": joins,
        "final_loss": s.get("final_loss"), "driver_s": round(elapsed, 1),
        # the machine is shared: 1-min load average before and after the run (2 cores here)
        "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "world_sizes": sorted({w["world_size"] for w in s.get("world_size_history", [])}),
    }


def _stop_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            pass


# ---- the benchmark -----------------------------------------------------------------------------

def bench(rates: list[str], syncs: list[str], steps: int, skip: int, preset: str, extra: list[str],
          timeout_s: float, keep_logs: bool = False, log=lambda m: print(m, file=sys.stderr),
          delay_ms: float = 0.0, capture: bool = False, ray_env: dict[str, str] | None = None) -> dict:
    """`delay_ms` > 0: the links go through a `netwire` process instead of veths and tbf, and every shaped
    rate also gets `delay_ms` of one-way delay (round trip: twice that); 'unshaped' is the wire with
    neither."""
    reason = available()
    if reason:
        raise SystemExit(f"slowlink: {reason}")
    for r in rates:
        rate_bytes_per_s(r)
    # the nodes get what raydistro gives the Ray nodes it starts (cluster.ray_node_env), then --ray-env
    given = dict(ray_env or {})
    ray_env = {**node_env(preset, extra), **given}
    stale = cleanup_stale()
    if stale:
        log(f"slowlink: removed stale namespaces {stale}")
    root = Path(tempfile.mkdtemp(prefix="rdsl", dir="/tmp"))  # short: Ray's socket paths are long
    net = Netns()
    ray_nodes = wire = None
    results: list[dict] = []
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if delay_ms > 0:
            nodes, wire = star_wire(net, ["h", "a", "b"])
            log(f"slowlink: namespaces {net.names}, {IFNAME} {[n['ip'] for n in nodes.values()]} via netwire")
        else:
            nodes = star(net, ["h", "a", "b"])
            log(f"slowlink: namespaces {net.names}, {IFNAME} {[n['ip'] for n in nodes.values()]} via br0")
        ray_nodes = RayNodes(net, nodes, root, ray_env)
        ray_nodes.start()
        seen = ray_nodes.wait_nodes()
        log(f"slowlink: Ray nodes up {seen}")
        run_dir = root / "runs"
        run_dir.mkdir()
        for rate in rates:
            if wire is not None:
                bps = rate_bytes_per_s(rate)
                qd = wire.set(bps, delay_ms / 1e3 if bps else 0.0) + " (netwire)"
            else:
                net.shape(rate)
                qd = net.qdisc(nodes["a"]["ns"], IFNAME)
            log(f"slowlink: links now {rate}: {qd}")
            for sync in syncs:
                log(f"slowlink: training {sync} at {rate} ({steps} steps)")
                r = train_once(net, ray_nodes, sync, rate, steps, skip, preset, extra, timeout_s, run_dir,
                               capture=capture)
                r["qdisc"] = qd
                r["rtt_ms"] = 2 * delay_ms if wire is not None and rate_bytes_per_s(rate) else 0.0
                results.append(r)
                log(f"slowlink: {sync} @ {rate}: {r['tokens_per_s']:.0f} tokens/s, step "
                    f"{r['step_s_median']}, link tx {r['link_tx_bytes']}; steady state per step: "
                    f"{wire_text(r)}")
    finally:
        signal.signal(signal.SIGTERM, old)
        if ray_nodes is not None:
            ray_nodes.stop()
        if wire is not None:
            wire.close()
        net.close()
        if keep_logs:
            log(f"slowlink: logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        left = [n for n in _sh("ip", "netns", "list", check=False).stdout.split() if n.startswith(net.prefix)]
        if left:
            log(f"slowlink: WARNING namespaces left: {left}")
    topology = ("3 namespaces (head --num-cpus=0, 2 worker nodes --num-cpus=1) joined by a userspace wire "
                f"(TUN devices, elastic.bench.netwire): each node's uplink and downlink at the rate, {delay_ms:g} ms one "
                "way at shaped rates, 50 ms queues" if wire is not None else
                "3 namespaces (head --num-cpus=0, 2 worker nodes --num-cpus=1) on a bridge; tbf "
                "on both directions of every node's veth; bandwidth only (no netem: no delay/loss)")
    return {"preset": preset, "steps": steps, "skip": skip, "overrides": extra, "delay_ms": delay_ms,
            "ray_env": ray_env, "ray_env_given": given,
            "topology": topology,
            "results": results, "table": table(results)}


def node_env(preset: str, extra: list[str]) -> dict[str, str]:
    """`cluster.ray_node_env` of the run's config: Ray's settings raydistro gives the nodes it starts."""
    from elastic.config import load_config

    cfg = load_config(preset, [o for o in extra if o.startswith("cluster.ray_node_env")])
    return {k: str(v) for k, v in cfg.cluster.ray_node_env.items()}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def table(results: list[dict]) -> dict:
    """{sync: {rate: tokens/s}} (the median over repeats, runs listed) and each rate's share of that
    sync's unshaped throughput."""
    runs: dict = {}
    for r in results:
        if r.get("tokens_per_s"):
            runs.setdefault(r["sync"], {}).setdefault(r["rate"], []).append(r["tokens_per_s"])
    out: dict = {}
    for sync, by_rate in runs.items():
        out[sync] = {rate: statistics.median(v) for rate, v in by_rate.items()}
        out[f"{sync}_runs"] = {rate: [round(x, 1) for x in v] for rate, v in by_rate.items()}
        base = out[sync].get("unshaped")
        if base:
            out[f"{sync}_fraction_of_unshaped"] = {k: v / base for k, v in out[sync].items()}
    return out


def plot(results: list[dict], path: Path = PLOT, title: str = "") -> Path:
    """Left: steady tokens/s vs link bandwidth. Right: time in the collective per step (the part
    the link can change; on a shared CPU the rest of a step moves with the machine's load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    shaped = [rate_bytes_per_s(r["rate"]) for r in results if rate_bytes_per_s(r["rate"])]
    unshaped_x = max(shaped) * 8 * 10 if shaped else 1e10  # placed one decade right of the fastest shaped
    x_of = lambda rate: rate_bytes_per_s(rate) * 8 if rate_bytes_per_s(rate) else unshaped_x  # noqa: E731
    for a, key, scale, ylabel, fmt in (
            (ax, "tokens_per_s", 1.0, "tokens/s (steady state, 2 workers)", "{:,.0f}"),
            (ax2, "comm_ms_median", 1e-3, "s per step in the collective (median, slowest worker)", "{:.2f}")):
        for sync, marker in MARKERS.items():
            runs: dict = {}
            for r in results:
                if r["sync"] == sync and r.get(key) is not None:
                    runs.setdefault(r["rate"], []).append(r[key] * scale)
            if not runs:
                continue
            pts = sorted((x_of(rate), statistics.median(v), min(v), max(v)) for rate, v in runs.items())
            n = max(len(v) for v in runs.values())
            a.errorbar([p[0] for p in pts], [p[1] for p in pts],
                       yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], marker=marker,
                       capsize=3, label=f"sync={sync}" + (f" (median of {n} runs, bars min-max)" if n > 1 else ""))
            for x, y, _, _ in pts:
                a.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        a.set_xscale("log")
        ticks = sorted({rate_bytes_per_s(r["rate"]) * 8 for r in results if rate_bytes_per_s(r["rate"])})
        a.set_xticks(ticks + [unshaped_x])
        a.set_xticklabels([_fmt_rate(t) for t in ticks] + ["unshaped\n(veth)"])
        a.minorticks_off()
        a.set_xlabel("per-node link bandwidth (tc tbf both ways; no added latency)")
        a.set_ylabel(ylabel)
        a.set_ylim(bottom=0)
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    loads = [x for r in results for x in r.get("loadavg_1m", [])]
    sub = f"; machine load avg {min(loads):.0f}-{max(loads):.0f} on 2 vCPU (shared)" if loads else ""
    fig.suptitle(title or "Dense all-reduce vs DeMo sync over shaped links (Ray nodes in network namespaces"
                 + sub + ")", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt_rate(bits: float) -> str:
    return f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elastic.bench.slowlink", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="unshaped,1gbit,100mbit", help="comma list: unshaped, 1gbit, 100mbit, ...")
    p.add_argument("--syncs", default="dense,demo", help="comma list of dense, demo, diloco")
    p.add_argument("--steps", type=int, default=30, help="steps per training run")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the steady-state rate")
    p.add_argument("--config", default="tiny")
    p.add_argument("--timeout", type=float, default=540, help="seconds per training run")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="one-way delay at shaped rates (RTT = 2x); links then go through elastic.bench.netwire "
                        "(a userspace wire: works without the kernel's netem)")
    p.add_argument("--capture", action="store_true",
                   help="also tcpdump (headers) each node's link and split its steady-state bytes per step by "
                        "the Ray port they talk to (gcs, raylet, object_manager, worker_rpc, gloo_and_other)")
    p.add_argument("--ray-env", default="", metavar="K=V,...",
                   help="environment for every node's `ray start` (Ray's own settings), over the run config's "
                        "cluster.ray_node_env (default REPORTER_UPDATE_INTERVAL_MS=15000: how often each node's "
                        "dashboard agent reports to the GCS)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--no-record", action="store_true", help="don't append to docs/BENCHMARKS.md")
    p.add_argument("--no-plot", action="store_true", help=f"don't write {PLOT.relative_to(REPO)}")
    p.add_argument("--keep-logs", action="store_true", help="keep the Ray and driver logs (temp dir)")
    p.add_argument("--cleanup", action="store_true", help="only remove namespaces a killed run left")
    p.add_argument("--from-json", metavar="PATH", help="plot (and record) a saved --json result; no runs")
    p.add_argument("overrides", nargs="*", help="extra key=value for every training run")
    a = p.parse_args(argv)
    if a.cleanup:
        print(json.dumps({"removed": cleanup_stale()}))
        return 0
    if a.skip >= a.steps - 1:
        p.error("--skip must leave at least two measured steps")
    rates, syncs = a.rates.split(","), a.syncs.split(",")
    if a.from_json:  # one or more saved results (comma list): their runs are pooled
        saved = [json.loads(Path(f).read_text()) for f in a.from_json.split(",")]
        out = {**saved[0], "results": [r for o in saved for r in o["results"]]}
        out["table"] = table(out["results"])
        a.rates = " then ".join(",".join(dict.fromkeys(r["rate"] for r in o["results"])) for o in saved)
        a.steps, a.skip = out["steps"], out["skip"]
        a.syncs = ",".join(dict.fromkeys(r["sync"] for r in out["results"]))
        a.overrides = out.get("overrides", [])
        a.delay_ms = out.get("delay_ms", 0.0)
        a.config = out.get("preset", a.config)
        a.ray_env = ",".join(f"{k}={v}" for k, v in out.get("ray_env_given", out.get("ray_env", {})).items())
    else:
        try:
            out = bench(rates, syncs, a.steps, a.skip, a.config, a.overrides, a.timeout, a.keep_logs,
                        delay_ms=a.delay_ms, capture=a.capture, ray_env=_ray_env(p, a.ray_env))
        except KeyboardInterrupt:
            print("slowlink: interrupted; torn down", file=sys.stderr)
            return 130
    if not a.no_plot and out["results"]:
        out["plot"] = str(plot(out["results"]))
    if not a.no_record and out["results"]:
        from elastic.bench.runs import append_row

        loads = [x for r in out["results"] for x in r.get("loadavg_1m", [])]
        out["loadavg_1m_range"] = [min(loads), max(loads)] if loads else None

        append_row("Slow links: tokens/s vs per-node bandwidth (network namespaces + tc tbf)",
                   f"python -m elastic.bench.slowlink --syncs {a.syncs} --rates {a.rates} --steps {a.steps} --skip {a.skip}"
                   + (f" --config {a.config}" if a.config != "tiny" else "")
                   + (f" --delay-ms {a.delay_ms:g}" if a.delay_ms else "")
                   + (" --capture" if any(r.get("wire", {}).get("by_kind") for r in out["results"]) else "")
                   + (f" --ray-env {a.ray_env}" if a.ray_env else "")
                   + (f" {' '.join(a.overrides)}" if a.overrides else ""),
                   record_text(out))
    print(json.dumps(out, indent=1, default=str) if a.json else _human(out))
    return 0


def _ray_env(p: argparse.ArgumentParser, text: str) -> dict[str, str]:
    env = {}
    for item in filter(None, text.split(",")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            p.error(f"--ray-env {item!r}: expected KEY=VALUE[,KEY=VALUE...]")
        env[k] = v
    return env


def record_text(out: dict) -> str:
    parts = []
    for sync in MARKERS:
        by = out["table"].get(sync)
        if not by:
            continue
        frac = out["table"].get(f"{sync}_fraction_of_unshaped", {})
        sent = next((r["bytes_sent_per_worker_per_step"] for r in out["results"] if r["sync"] == sync), 0)
        n = out["table"].get(f"{sync}_runs", {})
        cells = ", ".join(f"{rate} {v:,.0f}" + (f" ({frac[rate]:.0%})" if rate in frac and rate != "unshaped" else "")
                          + (f" [runs {'/'.join(f'{x:.0f}' for x in n[rate])}]" if len(n.get(rate, [])) > 1 else "")
                          for rate, v in by.items() if v)
        parts.append(f"{sync} ({sent:,.0f} B/worker/step): {cells} tokens/s")
        for r in out["results"]:
            if r["sync"] == sync and r.get("wire", {}).get("nodes"):
                parts.append(f"{sync} @ {r['rate']} link bytes per steady step (own counters): {wire_text(r)}")
    load = out.get("loadavg_1m_range")
    return ("; ".join(parts) + f"; {out['preset']}, 2 workers on 2 namespace nodes, steady state steps "
            f"{out['skip']}..{out['steps'] - 1}; "
            + (f"userspace wire (elastic.bench.netwire), {2 * out['delay_ms']:g} ms RTT at shaped rates" if out.get("delay_ms")
               else "bandwidth only (no netem)")
            + (f"; shared machine, load avg {load[0]:.0f}-{load[1]:.0f} during the runs" if load else ""))


def wire_text(r: dict) -> str:
    """'10.99.0.2 (worker node a) tx 24.1 kB rx 23.0 kB (2.1x / 2.0x payload 11.7 kB), ...' plus by kind."""
    w = r.get("wire") or {}
    kb = lambda b: f"{b / 1e3:,.1f} kB"  # noqa: E731
    parts = [f"{ip} ({d.get('role', '')}) tx {kb(d['wire_tx_bytes_per_step'])} rx {kb(d['wire_rx_bytes_per_step'])}"
             + (f" ({d['tx_over_payload']}x/{d['rx_over_payload']}x payload)" if d.get("tx_over_payload") else "")
             for ip, d in w.get("nodes", {}).items()]
    text = (", ".join(parts) + f" (payload {kb(w.get('payload_bytes_per_step') or 0)}/worker/step, "
            f"{len(w.get('steps', []))} steps)") if parts else "no steady-state steps sampled"
    workers = [ip for ip, d in w.get("nodes", {}).items() if "worker" in d.get("role", "")][:1]  # one is typical
    for ip, kinds in (w.get("by_kind") or {}).items():
        if ip in workers and not w.get("by_process"):
            text += f"; {ip} by port (tx/rx): " + ", ".join(
                f"{k} {kb(v.get('tx', 0))}/{kb(v.get('rx', 0))}" for k, v in kinds.items() if sum(v.values()) >= 50)
    for ip, procs in (w.get("by_process") or {}).items():  # the biggest few: who on the node talks to what
        if ip in workers:
            text += f"; {ip} by process (tx/rx): " + ", ".join(
                f"{k} {kb(v.get('tx', 0))}/{kb(v.get('rx', 0))}" for k, v in list(procs.items())[:5])
    for j in r.get("state_transfers") or []:
        text += (f"; join at step {j['step']} ({j['source']} -> {j['joiners']}): state {j['wire_mb']:.1f} MB on the "
                 f"wire ({j['raw_mb']:.1f} MB as state dicts, {j['codec']}) in {j['seconds']:.2f} s (pack "
                 f"{j['pack_s']:.2f} s, fetch+load {j['load_s']:.2f} s); links meanwhile " + ", ".join(
                     f"{ip} tx {kb(v['tx'])} rx {kb(v['rx'])}" for ip, v in j["link_bytes"].items()))
    return text


def _human(out: dict) -> str:
    lines = [f"{'sync':<6} {'rate':<9} {'tokens/s':>9} {'step s':>7} {'comm ms':>8} {'B/worker/step':>14}"]
    for r in out["results"]:
        lines.append(f"{r['sync']:<6} {r['rate']:<9} {r['tokens_per_s'] or 0:>9.0f} {r['step_s_median'] or 0:>7.2f} "
                     f"{r['comm_ms_median'] or 0:>8.0f} {r['bytes_sent_per_worker_per_step'] or 0:>14,.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
