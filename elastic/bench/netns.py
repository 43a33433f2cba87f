"""GPU nodes behind a slow link: one Ray node per GPU, each in its own network namespace (issue 18).

`python -m elastic.bench.netns --gpus 2 [--rate 100mbit] [--rtt-ms 50] [--probe] [-- python -m elastic train ...]`

On one multi-GPU host (root, `ip` and `tc`), this builds what `elastic.bench.slowlink` builds for CPU nodes, with
a GPU per node:

    ns <p>h   Ray head (--num-cpus=0: GCS, coordinator, driver)           eth9 10.99.0.1
    ns <p>g0  Ray node, --num-gpus=1, CUDA_VISIBLE_DEVICES=0 (worker 1)    eth9 10.99.0.2
    ns <p>g1  Ray node, --num-gpus=1, CUDA_VISIBLE_DEVICES=1 (worker 2)    eth9 10.99.0.3

The nodes are joined through a shaped link: veths to a bridge with `tc tbf` at the rate and `netem` for the
delay where the kernel has netem, else the userspace wire `elastic.bench.netwire` (rate and delay; this machine's
kernel has no netem). What guarantees that the collectives cross that link and nothing else:
- every namespace has only `lo` and `eth9`, and the peers' addresses exist only on `eth9`;
- `gpu_node_env`: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME = eth9; NCCL_P2P_DISABLE and NCCL_SHM_DISABLE (no
  NVLink/PCIe peer copies, no /dev/shm: both would go around the namespaces), NCCL_NVLS_ENABLE=0 (NVLink
  SHARP), NCCL_IB_DISABLE (an InfiniBand/RoCE device is visible from every namespace), and a per-node
  NCCL_HOSTID, so NCCL takes the GPUs for different hosts and uses its socket transport.
Teardown (Ray nodes by process group, every process in our namespaces, the namespaces by the names we made,
the wire) always runs, also on an error or Ctrl-C.

The measurement of issue 18 (2 GPUs over 100 Mbit/s with a 50 ms RTT) needs a 2-GPU machine; the plumbing is
tested on CPU (tests/elastic/test_netns.py: namespaces, shaping, a TCP transfer's rate and round trip).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from elastic.bench import slowlink

IFNAME = slowlink.IFNAME


def available() -> str | None:
    """None when this machine can build namespaces and shape links, else why not (for a skip or an error)."""
    reason = slowlink.available()
    if reason:
        return reason
    probe = f"rdgnp{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def netem_available() -> bool:
    """Whether the kernel has tc's netem qdisc (delay on a veth); probed in a namespace of our own."""
    probe = f"rdgnq{os.getpid()}"
    try:
        slowlink._sh("ip", "netns", "add", probe)
        slowlink._sh("ip", "-n", probe, "link", "add", "q0", "type", "veth", "peer", "name", "q1")
        ok = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "q0", "root", "netem", "delay", "1ms"],
                            capture_output=True).returncode == 0
    except (subprocess.CalledProcessError, OSError):
        ok = False
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


def gpu_node_env(gpu: int, node: str, ifname: str = IFNAME) -> dict[str, str]:
    """The environment of the Ray node that owns GPU `gpu` (its workers inherit it): that GPU only, and
    NCCL and gloo over `ifname` by sockets, never P2P, shared memory, NVLS or InfiniBand (see the module
    docstring). `node`: a name unique per node (NCCL's host id)."""
    return {"CUDA_VISIBLE_DEVICES": str(gpu), "NCCL_SOCKET_IFNAME": ifname, "GLOO_SOCKET_IFNAME": ifname,
            "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_NVLS_ENABLE": "0", "NCCL_IB_DISABLE": "1",
            "NCCL_HOSTID": node}


@dataclass
class GpuNodes:
    """The namespaces and addresses of a head plus one node per GPU (`plan`); `env`/`args` per role are what
    `slowlink.RayNodes` starts each node with."""
    prefix: str
    gpus: list[int]
    roles: list[str] = field(init=False)

    def __post_init__(self):
        if not self.gpus:
            raise ValueError("netns: no GPUs to give nodes (--gpus N, or a comma list of CUDA device indices)")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"netns: GPU indices {self.gpus} repeat; each node owns a GPU of its own")
        self.roles = ["h"] + [f"g{i}" for i in range(len(self.gpus))]

    def env(self) -> dict[str, dict[str, str]]:
        # the head sees no GPU: no worker may land there, outside the per-GPU nodes' settings
        return {"h": {"CUDA_VISIBLE_DEVICES": ""},
                **{f"g{i}": gpu_node_env(g, f"{self.prefix}g{i}") for i, g in enumerate(self.gpus)}}

    def args(self) -> dict[str, list[str]]:
        return {"h": ["--num-gpus=0"], **{f"g{i}": ["--num-gpus=1"] for i in range(len(self.gpus))}}


class ShapedNamespaces:
    """Namespaces for `roles` joined by a link of `rate` ("100mbit"; "unshaped") and `rtt_ms` round trip:
    veths to a bridge + tbf (+ netem for the delay) when `via` is "tc", the userspace `netwire` when "wire",
    "auto": tc when it can do the delay (netem), else the wire. `close()` removes exactly the namespaces it
    made (by name) and stops the wire."""

    def __init__(self, roles: list[str], rate: str = "100mbit", rtt_ms: float = 50.0, via: str = "auto",
                 prefix: str | None = None):
        if via not in ("auto", "tc", "wire"):
            raise ValueError(f"netns: via='{via}' must be auto, tc or wire")
        bps = slowlink.rate_bytes_per_s(rate)  # raises on a bad rate
        if via == "auto":
            via = "tc" if rtt_ms <= 0 or netem_available() else "wire"
        if via == "tc" and rtt_ms > 0 and not netem_available():
            raise RuntimeError("netns: this kernel has no netem (tc cannot add delay); use via=wire (elastic.bench.netwire)")
        self.net = slowlink.Netns(prefix=prefix or f"rdgn{os.getpid()}")
        self.via, self.rate, self.rtt_ms, self.wire = via, rate, rtt_ms, None
        try:
            if via == "wire":
                self.nodes, self.wire = slowlink.star_wire(self.net, roles)
                self.link = self.wire.set(bps, rtt_ms / 2e3) + " (netwire)"
            else:
                self.nodes = slowlink.star(self.net, roles)
                self.link = self._tc(bps)
        except BaseException:
            self.close()
            raise

    def _tc(self, bps: float | None) -> str:
        """tbf at the rate on both ends of every veth, with netem (half the RTT each way) in front of it."""
        if self.rtt_ms <= 0:
            self.net.shape(self.rate)
            return self.net.qdisc(*self.net.links[0])
        for ns, dev in self.net.links:
            slowlink._sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem",
                         "delay", f"{self.rtt_ms / 2:g}ms")
            if bps is not None:
                burst = max(64 * 1024, int(bps * 0.004))
                slowlink._sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "tbf",
                             "rate", self.rate, "burst", str(burst), "latency", "50ms")
        return self.net.qdisc(*self.net.links[0])

    @property
    def names(self) -> list[str]:
        return list(self.net.names)

    def close(self) -> None:
        if self.wire is not None:
            self.wire.close()
            self.wire = None
        self.net.close()


# ---- measuring a link: a TCP round trip and a bulk transfer ------------------------------------------

_SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{ip}", {port})); s.listen(1); s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(30)
for _ in range({pings}):
    c.sendall(c.recv(1))
n = 0; t0 = None
while n < {size}:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
c.sendall(b"k"); print(n, time.perf_counter() - t0, flush=True)
"""

_CLIENT = """
import socket, statistics, time
c = socket.create_connection(("{ip}", {port}), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range({pings}):
    t = time.perf_counter(); c.sendall(b"p"); c.recv(1); rtts.append(time.perf_counter() - t)
c.sendall(b"x" * {size}); c.recv(1)
print(statistics.median(rtts))
"""


def probe_link(net: slowlink.Netns, src_ns: str, dst_ns: str, dst_ip: str, size: int = 4 << 20,
               port: int = 5401, pings: int = 5) -> dict:
    """A TCP connection from `src_ns` to `dst_ip` in `dst_ns`: the median of `pings` one-byte round trips,
    then `size` bytes in bulk (rate measured at the receiver, from its first byte: slow start included).
    Returns {rtt_ms, mbit_s, bytes}."""
    server = subprocess.Popen(net.exec_argv(dst_ns, sys.executable, "-c",
                                            _SERVER.format(ip=dst_ip, port=port, size=size, pings=pings)),
                              stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"netns: the probe's server in {dst_ns} did not start")
        client = subprocess.run(net.exec_argv(src_ns, sys.executable, "-c",
                                              _CLIENT.format(ip=dst_ip, port=port, size=size, pings=pings)),
                                capture_output=True, text=True, timeout=120)
        if client.returncode != 0:
            raise RuntimeError(f"netns: the probe's client in {src_ns} failed: {client.stderr[-500:]}")
        out, _ = server.communicate(timeout=30)
        received, secs = out.split()
        return {"rtt_ms": round(float(client.stdout) * 1e3, 2), "mbit_s": round(int(received) * 8 / float(secs) / 1e6, 1),
                "bytes": int(received)}
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# ---- the command ------------------------------------------------------------------------------------------

def run(gpus: list[int], rate: str, rtt_ms: float, via: str, probe: bool, command: list[str],
        log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Build the namespaces, optionally probe the head -> first GPU node link, start the Ray nodes and run
    `command` (e.g. `python -m elastic train ... cluster.address=<head>`) inside the head's namespace with
    RAY_ADDRESS set; everything is torn down afterwards. Returns what was built and measured."""
    reason = available()
    if reason:
        raise SystemExit(f"netns: {reason}")
    layout = GpuNodes(prefix=f"rdgn{os.getpid()}", gpus=gpus)
    root = Path(tempfile.mkdtemp(prefix="rdgn", dir="/tmp"))
    links = ray_nodes = None
    out: dict = {"gpus": gpus, "rate": rate, "rtt_ms": rtt_ms}
    old = signal.signal(signal.SIGTERM, slowlink._raise_interrupt)
    try:
        links = ShapedNamespaces(layout.roles, rate, rtt_ms, via, prefix=layout.prefix)
        out.update(via=links.via, link=links.link, namespaces=links.names,
                   nodes={r: {**n, "env": layout.env().get(r, {})} for r, n in links.nodes.items()})
        log(f"netns: {links.names} joined by {links.link}")
        if probe:
            g0 = links.nodes["g0"]
            out["probe"] = probe_link(links.net, links.nodes["h"]["ns"], g0["ns"], g0["ip"])
            log(f"netns: head -> g0: {out['probe']}")
        if command:
            ray_nodes = slowlink.RayNodes(links.net, links.nodes, root, node_env=layout.env(), node_args=layout.args())
            ray_nodes.start()
            out["ray_nodes"] = ray_nodes.wait_nodes()
            env = {**ray_nodes.env("h"), "RAY_ADDRESS": ray_nodes.address}
            log(f"netns: Ray up at {ray_nodes.address}; running {' '.join(command)}")
            done = subprocess.run(links.net.exec_argv(links.nodes["h"]["ns"], *command), env=env)
            out["returncode"] = done.returncode
    finally:
        signal.signal(signal.SIGTERM, old)
        if ray_nodes is not None:
            ray_nodes.stop()
        if links is not None:
            links.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elastic.bench.netns", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="2", help="N (GPUs 0..N-1) or a comma list of CUDA device indices")
    p.add_argument("--rate", default="100mbit", help="per-node link rate (both ways), or unshaped")
    p.add_argument("--rtt-ms", type=float, default=50.0, help="round trip between two nodes (half each way)")
    p.add_argument("--via", default="auto", choices=("auto", "tc", "wire"),
                   help="tc: veths + tbf + netem; wire: elastic.bench.netwire (no netem needed); auto: tc if netem exists")
    p.add_argument("--probe", action="store_true", help="measure the head -> first node link (TCP RTT and rate)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then a command to run in the head's namespace")
    a = p.parse_args(argv)
    spec = a.gpus.strip()
    gpus = list(range(int(spec))) if spec.isdigit() else [int(x) for x in spec.split(",") if x.strip()]
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    try:
        out = run(gpus, a.rate, a.rtt_ms, a.via, a.probe, command)
    except KeyboardInterrupt:
        print("netns: interrupted; torn down", file=sys.stderr)
        return 130
    print(json.dumps(out, indent=1))
    return out.get("returncode", 0)


if __name__ == "__main__":
    sys.exit(main())
