"""GPU nodes in network namespaces (`elastic.bench.netns`): the node settings that keep NCCL and gloo on the shaped
link (pure), and on this machine (root) two namespaces shaped to 100 Mbit/s and a 50 ms round trip, measured
with a real TCP transfer, then removed by name. Skipped, with the reason, where `ip netns` is not permitted."""
import subprocess

import pytest

from elastic.bench import netns

REASON = netns.available()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces: {REASON}")


def test_each_gpu_node_talks_nccl_and_gloo_over_eth9_by_sockets_only():
    layout = netns.GpuNodes(prefix="rdgn1", gpus=[2, 5])
    assert layout.roles == ["h", "g0", "g1"]
    env = layout.env()
    assert env["h"] == {"CUDA_VISIBLE_DEVICES": ""} and layout.args()["h"] == ["--num-gpus=0"]
    for role, gpu in (("g0", "2"), ("g1", "5")):
        e = env[role]
        assert e["CUDA_VISIBLE_DEVICES"] == gpu and layout.args()[role] == ["--num-gpus=1"]
        assert e["NCCL_SOCKET_IFNAME"] == e["GLOO_SOCKET_IFNAME"] == netns.IFNAME
        assert e["NCCL_P2P_DISABLE"] == e["NCCL_SHM_DISABLE"] == e["NCCL_IB_DISABLE"] == "1"
        assert e["NCCL_NVLS_ENABLE"] == "0"
    assert env["g0"]["NCCL_HOSTID"] != env["g1"]["NCCL_HOSTID"]  # NCCL must not take them for one host
    with pytest.raises(ValueError, match="repeat"):
        netns.GpuNodes(prefix="x", gpus=[0, 0])
    with pytest.raises(ValueError, match="no GPUs"):
        netns.GpuNodes(prefix="x", gpus=[])


def _listed() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


@needs_netns
def test_two_namespaces_at_100mbit_and_50ms_rtt_measure_so_and_are_removed_by_name():
    links = netns.ShapedNamespaces(["a", "b"], rate="100mbit", rtt_ms=50.0, via="auto")
    try:
        names = links.names
        assert set(names) <= _listed()
        b = links.nodes["b"]
        got = netns.probe_link(links.net, links.nodes["a"]["ns"], b["ns"], b["ip"], size=2 << 20)
        assert got["bytes"] == 2 << 20
        assert 45 <= got["rtt_ms"] <= 150, got  # 50 ms plus a Python forwarding loop on a busy machine
        assert 20 <= got["mbit_s"] <= 110, got  # slow start over a 50 ms RTT costs some of the 100 Mbit/s
    finally:
        links.close()
    assert not set(names) & _listed()


@needs_netns
def test_tc_shapes_veths_and_refuses_a_delay_without_netem():
    links = netns.ShapedNamespaces(["a", "b"], rate="100mbit", rtt_ms=0.0, via="tc")
    try:
        assert "tbf" in links.link
        b = links.nodes["b"]
        got = netns.probe_link(links.net, links.nodes["a"]["ns"], b["ns"], b["ip"], size=2 << 20, port=5402)
        assert got["rtt_ms"] < 20 and 40 <= got["mbit_s"] <= 110, got
    finally:
        links.close()
    if not netns.netem_available():
        with pytest.raises(RuntimeError, match="no netem"):
            netns.ShapedNamespaces(["a", "b"], rate="100mbit", rtt_ms=50.0, via="tc")
    with pytest.raises(ValueError, match="via='x'"):
        netns.ShapedNamespaces(["a"], via="x")


PLACEMENT = """
import json, ray
ray.init(log_to_driver=False)
@ray.remote(num_gpus=1, num_cpus=1)
def where():
    import os
    return [os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NCCL_SOCKET_IFNAME", "NCCL_P2P_DISABLE")] + [
        ray.util.get_node_ip_address()]
nodes = sorted([n["NodeManagerAddress"], n["Resources"].get("GPU", 0)] for n in ray.nodes() if n["Alive"])
json.dump({"nodes": nodes, "tasks": sorted(ray.get([where.remote() for _ in range(2)]))}, open("{out}", "w"))
"""


@needs_netns
@pytest.mark.slow  # starts three Ray nodes in namespaces: ~1 min on 2 cores
def test_ray_nodes_each_own_one_gpu_and_their_tasks_see_the_link_settings(tmp_path):
    """`python -m elastic.bench.netns --gpus 2 -- CMD` on CPU: Ray counts GPUs as declared, so the plumbing shows
    without a GPU: the head has none, each node one, and a one-GPU task on each node sees its own device index
    and the socket-only NCCL settings. Every namespace is gone afterwards."""
    import json
    import sys

    out = tmp_path / "placement.json"
    res = netns.run([0, 1], "100mbit", 50.0, "auto", probe=False,
                    command=[sys.executable, "-c", PLACEMENT.replace("{out}", str(out))], log=lambda m: None)
    assert res["returncode"] == 0
    got = json.loads(out.read_text())
    assert got["nodes"] == [["10.99.0.1", 0], ["10.99.0.2", 1.0], ["10.99.0.3", 1.0]]
    assert got["tasks"] == [["0", "eth9", "1", "10.99.0.2"], ["1", "eth9", "1", "10.99.0.3"]]
    assert not set(res["namespaces"]) & _listed()
