"""Ray (2.60, OpenTelemetry export) drops a gauge series that was not set again for a while: a world size set only
when it changes would vanish from Prometheus between membership changes. elastic.metrics.Gauge re-reports its
last value; a plain ray.util.metrics.Gauge set once is the control."""
import time
import urllib.request

import pytest


def _series(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


@pytest.mark.slow  # ~30 s of waiting for Ray to drop the control gauge: `python -m pytest -m slow tests/elastic/test_metrics_refresh.py`
@pytest.mark.timeout(240)
def test_gauges_set_once_stay_exported_while_a_plain_gauge_vanishes():
    import ray
    from ray.cluster_utils import Cluster
    from ray.util import metrics

    from elastic.metrics import Gauge

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"metrics_report_interval_ms": 500}})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = ray.nodes()[0]["MetricsExportPort"]
        plain = metrics.Gauge("raydistro_test_plain_gauge", "set once", ("run",))
        plain.set_default_tags({"run": "r"})
        ours = Gauge("raydistro_test_refreshed_gauge", "set once", ("run",))
        ours.set_default_tags({"run": "r"})
        plain.set(3.0)
        ours.set(5.0)
        seen_plain = False
        deadline = time.time() + 180
        while time.time() < deadline:  # until the control is exported, then dropped
            text = _series(port)
            if "ray_raydistro_test_plain_gauge{" in text:
                seen_plain = True
            elif seen_plain:
                break
            time.sleep(1.0)
        assert seen_plain, "the plain gauge was never exported"
        assert "ray_raydistro_test_plain_gauge{" not in text, "the plain gauge was not dropped within 180 s"
        ours_lines = [line for line in text.splitlines() if line.startswith("ray_raydistro_test_refreshed_gauge{")]
        assert ours_lines and ours_lines[0].endswith(" 5.0"), ours_lines
    finally:
        ray.shutdown()
        cluster.shutdown()
