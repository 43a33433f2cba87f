"""A userspace network wire with delay and bandwidth, for machines whose kernel has no `netem`.

`python -m elastic.bench.slowlink --delay-ms D` needs links with a round-trip time, and `tc qdisc ... netem` is
not in every kernel (not in this one: "Specified qdisc kind is unknown", nor `fq`). This module is the
wire instead: one process holds a TUN device per node (moved into the node's network namespace and named
`eth9` there, so every packet a node sends to another crosses it), reads each IPv4 packet, and writes it to
the destination's TUN device when the link model says it arrives:

    leave = max(now, uplink of the sender free) + size / rate       (the sender's link, like tbf on its NIC)
    arrive = max(leave, downlink of the receiver free) + size / rate + one-way delay

A packet that would wait more than `queue_s` (50 ms, tbf's `latency` in the veth topology) for a link is
dropped, so TCP sees a finite queue as on a real link, not unbounded bufferbloat. No rate means no
serialization; delay 0 means none. The model (`LinkModel`) is plain code with unit tests; `serve` is the
loop. The process is started by `slowlink` (`Wire`), which sends `set <bytes/s|none> <one-way s>` lines on
its stdin to change the links between runs.

Costs and limits: every packet crosses a Python loop (~10-20 us), so an "unshaped" wire is slower than a
veth (hundreds of Mbit/s with the 9000-byte MTU used, not tens of Gbit/s); only IPv4 is forwarded.
"""
from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # elastic/bench/<this file> -> the repository
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MTU = 9000
QUEUE_S = 0.05


class LinkModel:
    """When each packet arrives: per node an uplink and a downlink of `rate` bytes/s (None: unlimited),
    plus `delay` seconds one way; None for a packet dropped at a queue longer than `queue_s`."""

    def __init__(self, nodes: int, rate: float | None = None, delay: float = 0.0, queue_s: float = QUEUE_S):
        self.rate, self.delay, self.queue_s = rate, delay, queue_s
        self.up = [0.0] * nodes
        self.down = [0.0] * nodes
        self.dropped = 0

    def set(self, rate: float | None, delay: float) -> None:
        self.rate, self.delay = rate, delay

    def arrival(self, src: int, dst: int, nbytes: int, now: float) -> float | None:
        t = now
        if self.rate:
            start = max(now, self.up[src])
            if start - now > self.queue_s:
                self.dropped += 1
                return None
            t = start + nbytes / self.rate
            start = max(t, self.down[dst])
            if start - t > self.queue_s:
                self.dropped += 1
                return None
            self.up[src] = t
            t = start + nbytes / self.rate
            self.down[dst] = t
        return t + self.delay


def open_tun(name: str) -> int:
    """A non-blocking TUN device `name` (IPv4 packets, no header); it exists while the fd is open."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def serve(fds: list[int], ips: list[str], model: LinkModel, ctl: int) -> None:
    """Forward packets between the TUN devices `fds` (node i has address ips[i]) under `model` until `ctl`
    (a pipe of `set` lines) closes."""
    index = {socket.inet_aton(ip): i for i, ip in enumerate(ips)}
    owner = {fd: i for i, fd in enumerate(fds)}
    heap: list[tuple[float, int, int, bytes]] = []
    seq, buf = 0, b""
    while True:
        timeout = max(0.0, heap[0][0] - time.monotonic()) if heap else None
        ready, _, _ = select.select(fds + [ctl], [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            if fd == ctl:
                chunk = os.read(ctl, 4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    _command(line.decode().split(), model)
                continue
            src = owner[fd]
            for _ in range(256):  # what has arrived, not forever
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    continue  # IPv4 only
                dst = index.get(pkt[16:20])
                if dst is None or dst == src:
                    continue
                at = model.arrival(src, dst, len(pkt), now)
                if at is not None:
                    heapq.heappush(heap, (at, seq, dst, pkt))
                    seq += 1
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, dst, pkt = heapq.heappop(heap)
            try:
                os.write(fds[dst], pkt)
            except OSError:
                model.dropped += 1


def _command(words: list[str], model: LinkModel) -> None:
    if words[:1] == ["set"] and len(words) == 3:
        model.set(None if words[1] == "none" else float(words[1]), float(words[2]))
        print(f"ok rate={words[1]} delay={words[2]} dropped={model.dropped}", flush=True)
    elif words:
        print(f"error: unknown command {' '.join(words)!r} (expected: set <bytes/s|none> <one-way s>)", flush=True)


class Wire:
    """The wire process, run by `slowlink` as root: creates `names` (TUN devices, still in this namespace:
    the caller moves them), then forwards. `set(rate, delay)` changes the links; `close()` stops it (the
    devices disappear with it)."""

    def __init__(self, names: list[str], ips: list[str]):
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elastic.bench.netwire", "--names", ",".join(names), "--ips", ",".join(ips)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path})
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"netwire did not start: {line or 'no output'}")

    def set(self, rate: float | None, delay: float) -> str:
        self.proc.stdin.write(f"set {'none' if not rate else rate} {delay}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elastic.bench.netwire", description=__doc__.split("\n\n")[0])
    p.add_argument("--names", required=True, help="comma list of TUN devices to create, one per node")
    p.add_argument("--ips", required=True, help="comma list: the IPv4 address of each node, same order")
    a = p.parse_args(argv)
    names, ips = a.names.split(","), a.ips.split(",")
    if len(names) != len(ips):
        p.error("--names and --ips must have the same length")
    fds = [open_tun(n) for n in names]
    print("ready", flush=True)
    serve(fds, ips, LinkModel(len(fds)), sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
