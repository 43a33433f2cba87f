"""`python -m clusters validate`: shipped files pass; each rule fails naming the file and the key."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clusters import GRAFANA_DASHBOARD, SHIPPED_FILES
from clusters.validate import validate_file

REPO = Path(__file__).resolve().parents[2]
AWS = REPO / "clusters" / "aws-mixed-gpu.yaml"
GCP = REPO / "clusters" / "gcp-mixed-gpu.yaml"
LOCAL = REPO / "clusters" / "local.yaml"
KUBE = REPO / "clusters" / "kuberay" / "raycluster.yaml"


def _broken_copy(tmp_path, src, edit, text_edit=None):
    """A copy of `src` in tmp_path with `edit(doc)` applied (or a textual replacement)."""
    dst = tmp_path / src.name
    if text_edit:
        old, new = text_edit
        text = src.read_text()
        assert old in text
        dst.write_text(text.replace(old, new))
    else:
        doc = yaml.safe_load(src.read_text())
        edit(doc)
        dst.write_text(yaml.safe_dump(doc))
    return dst


def _messages(path):
    return [str(p) for p in validate_file(path)]


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_every_shipped_cluster_file_passes(path):
    assert validate_file(path) == []


def test_cli_validates_all_shipped_files_with_exit_zero():
    res = subprocess.run([sys.executable, "-m", "clusters", "validate", *map(str, SHIPPED_FILES)],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(": ok") == len(SHIPPED_FILES)


def test_cli_exits_nonzero_and_names_file_and_key(tmp_path):
    bad = _broken_copy(tmp_path, AWS, lambda d: d["available_node_types"]["l4"]["resources"].update(GPU=0.5))
    res = subprocess.run([sys.executable, "-m", "clusters", "validate", str(bad), str(AWS)],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1
    assert (f"{bad}: available_node_types.l4.resources.GPU: 0.5 is not an integer; "
            "cluster YAML resources must be whole numbers") in res.stderr
    assert f"{AWS}: ok" in res.stdout


def test_fractional_resource_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, LOCAL, lambda d: d["available_node_types"]["a100"]["resources"].update(CPU=1.5))
    msgs = _messages(bad)
    assert [m for m in msgs if m.startswith(
        f"{bad}: available_node_types.a100.resources.CPU: 1.5 is not an integer")], msgs
    # Ray's schema says the same thing; only our clearer message is kept.
    assert len([m for m in msgs if "resources.CPU" in m]) == 1


def test_gpu_node_type_without_accelerator_type_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, GCP,
                       lambda d: d["available_node_types"]["l4"]["resources"].pop("accelerator_type:L4"))
    msgs = _messages(bad)
    assert any(m.startswith(f"{bad}: available_node_types.l4.resources: has GPU: 1 but no "
                            "\"accelerator_type:*\" resource") for m in msgs), msgs


def test_min_workers_above_max_workers_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, AWS, lambda d: d["available_node_types"]["a100"].update(min_workers=5))
    msgs = _messages(bad)
    assert any(m.startswith(f"{bad}: available_node_types.a100.min_workers: 5 is greater than "
                            "max_workers (4)") for m in msgs), msgs


def test_sum_of_min_workers_above_cluster_max_is_rejected(tmp_path):
    def edit(d):
        d["max_workers"] = 1
        d["available_node_types"]["l4"]["min_workers"] = 2
    bad = _broken_copy(tmp_path, AWS, edit)
    assert any(m.startswith(f"{bad}: max_workers: 1 is below the sum of min_workers")
               for m in _messages(bad))


def test_cloud_yaml_without_token_auth_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, AWS, None, text_edit=("export RAY_AUTH_MODE=token;", ""))
    msgs = _messages(bad)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any(m.startswith(f"{bad}: {key}: does not turn on token auth for provider 'aws'")
                   for m in msgs), msgs


def test_local_yaml_needs_no_token_auth():
    assert "RAY_AUTH_MODE" not in LOCAL.read_text().split("provider:")[1]
    assert validate_file(LOCAL) == []


def test_dashboard_open_to_the_world_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, GCP, None,
                       text_edit=("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"))
    msgs = _messages(bad)
    assert any(m.startswith(f"{bad}: head_start_ray_commands[1]: binds the dashboard to 0.0.0.0")
               for m in msgs), msgs


def test_local_yaml_missing_a_top_level_key_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, LOCAL, lambda d: d.pop("rsync_filter"))
    assert any(m.startswith(f"{bad}: rsync_filter: is missing; the local autoscaler")
               for m in _messages(bad))


def test_local_yaml_head_type_must_keep_the_fake_providers_name(tmp_path):
    def edit(d):
        d["available_node_types"]["head"] = d["available_node_types"].pop("ray.head.default")
        d["head_node_type"] = "head"
    bad = _broken_copy(tmp_path, LOCAL, edit)
    assert any(m.startswith(f"{bad}: head_node_type: 'head' must be 'ray.head.default'")
               for m in _messages(bad))


def test_ray_schema_errors_name_the_key(tmp_path):
    bad = _broken_copy(tmp_path, AWS, lambda d: d["available_node_types"]["h100"].update(max_wokers=3))
    msgs = _messages(bad)
    assert any(m.startswith(f"{bad}: available_node_types.h100: ") and "max_wokers" in m
               and "Ray cluster schema" in m for m in msgs), msgs


def test_not_yaml_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    assert _messages(bad)[0].startswith(f"{bad}: is not valid YAML")


# --- KubeRay RayCluster ----------------------------------------------------------------------


def _group(doc, name):
    return next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def test_kuberay_min_replicas_above_max_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, KUBE, lambda d: _group(d, "a100").update(minReplicas=9))
    assert any(m.startswith(f"{bad}: spec.workerGroupSpecs[1].minReplicas: 9 is greater than "
                            "maxReplicas (8)") for m in _messages(bad))


def test_kuberay_gpu_group_without_accelerator_type_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, KUBE, lambda d: _group(d, "l4")["rayStartParams"].pop("resources"))
    assert any(m.startswith(f"{bad}: spec.workerGroupSpecs[2].rayStartParams.resources: group has GPUs")
               for m in _messages(bad))


def test_kuberay_fractional_custom_resource_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, KUBE, None, text_edit=(
        '\'"{\\"accelerator_type:L4\\": 1}"\'', '\'"{\\"accelerator_type:L4\\": 0.5}"\''))
    assert any(m.startswith(f"{bad}: spec.workerGroupSpecs[2].rayStartParams.resources."
                            "accelerator_type:L4: 0.5 is not an integer") for m in _messages(bad))


def test_kuberay_without_token_auth_is_rejected(tmp_path):
    def edit(d):
        d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = []
    bad = _broken_copy(tmp_path, KUBE, edit)
    assert any(m.startswith(f"{bad}: spec.headGroupSpec.template.spec.containers[0].env: does not set "
                            "RAY_AUTH_MODE=token") for m in _messages(bad))


def test_kuberay_operator_token_auth_is_accepted(tmp_path):
    def edit(d):
        for g in [d["spec"]["headGroupSpec"], *d["spec"]["workerGroupSpecs"]]:
            g["template"]["spec"]["containers"][0]["env"] = []
        d["spec"]["authOptions"] = {"mode": "token"}
    assert validate_file(_broken_copy(tmp_path, KUBE, edit)) == []


def test_kuberay_open_dashboard_is_rejected(tmp_path):
    bad = _broken_copy(tmp_path, KUBE,
                       lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"dashboard-host": "0.0.0.0"}))
    assert any(m.startswith(f"{bad}: spec.headGroupSpec.rayStartParams.dashboard-host: is 0.0.0.0")
               for m in _messages(bad))


def test_kuberay_shipped_cr_autoscales_one_group_per_gpu_type():
    doc = yaml.safe_load(KUBE.read_text())
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    assert [g["groupName"] for g in doc["spec"]["workerGroupSpecs"]] == ["h100", "a100", "l4"]


# --- Grafana dashboard -----------------------------------------------------------------------


def _exported_metrics() -> dict[str, set[str]]:
    """Every metric elastic/metrics.py defines, by name, with its tag keys."""
    import re

    src = (REPO / "elastic" / "metrics.py").read_text()
    worker = src[src.index("class WorkerMetrics"):src.index("class RunMetrics")]
    names = {}
    for m in re.finditer(r'(?:Gauge|Counter)\(\s*"(raydistro_[a-z_]+)"', src):
        names[m.group(1)] = {"run", "worker", "accelerator"} if m.start() - src.index("class WorkerMetrics") < len(
            worker) and m.start() > src.index("class WorkerMetrics") else {"run"}
    return names


def test_grafana_dashboard_charts_every_exported_metric_by_run_with_real_labels():
    import re

    dash = json.loads(GRAFANA_DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    metrics = _exported_metrics()
    assert len(metrics) >= 14, metrics  # the parse found them all
    def charts(name, e):
        return re.search(rf"ray_{name}\b", e) is not None

    for name in metrics:
        assert any(charts(name, e) for e in exprs), f"{name} is exported but not charted"
    assert {v["name"] for v in dash["templating"]["list"]} >= {"run", "SessionName"}
    run_var = next(v for v in dash["templating"]["list"] if v["name"] == "run")
    assert "label_values(" in run_var["definition"] and run_var["definition"].endswith(", run)")
    for e in exprs:
        assert 'run=~"$run"' in e, f"not filtered by $run: {e}"
        grouped = set(re.findall(r"by \(([^)]*)\)", e))
        labels = {x.strip() for g in grouped for x in g.split(",")}
        used = [n for n in metrics if charts(n, e)]
        for n in used:  # a panel groups only by labels its series carry
            assert labels <= metrics[n] | {"le"}, f"{e} groups by {labels}, {n} has {metrics[n]}"
        if any(n in ("raydistro_bytes_sent", "raydistro_bytes_received", "raydistro_membership_changes")
               for n in used):
            assert "rate(" in e or "increase(" in e, f"a counter charted without rate/increase: {e}"


# --- RayJob, PodMonitor, the GPU image ---------------------------------------------------------------------

RAYJOB = REPO / "clusters" / "kuberay" / "rayjob.yaml"
PODMON = REPO / "clusters" / "kuberay" / "podmonitor.yaml"


def test_rayjob_needs_an_entrypoint_its_cluster_rules_and_a_token_for_the_submitter(tmp_path):
    def no_entry(d):
        d["spec"].pop("entrypoint")

    def submitter_without_token(d):
        d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"] = []

    def open_dashboard(d):
        d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"

    for edit, where in ((no_entry, "spec.entrypoint: is missing"),
                        (submitter_without_token, "spec.submitterPodTemplate.spec.containers[0].env: does not set"),
                        (open_dashboard, "spec.rayClusterSpec.headGroupSpec.rayStartParams.dashboard-host: is 0.0.0.0")):
        bad = _broken_copy(tmp_path, RAYJOB, edit)
        assert any(where in m for m in _messages(bad)), (where, _messages(bad))


def test_podmonitor_names_the_metrics_port_and_selects_ray_pods(tmp_path):
    bad = _broken_copy(tmp_path, PODMON, lambda d: d["spec"]["podMetricsEndpoints"][0].pop("port"))
    assert any("spec.podMetricsEndpoints[0].port: must name" in m for m in _messages(bad))
    bad = _broken_copy(tmp_path, PODMON, lambda d: d["spec"].update(selector={}))
    assert any("spec.selector: is missing or empty" in m for m in _messages(bad))
    # the port it scrapes is the one every Ray container of the KubeRay manifests declares
    port = yaml.safe_load(PODMON.read_text())["spec"]["podMetricsEndpoints"][0]["port"]
    for path in (KUBE, RAYJOB):
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            ports = group["template"]["spec"]["containers"][0].get("ports", [])
            assert any(p.get("name") == port and p.get("containerPort") == 8080 for p in ports), (path, group)
            assert group["rayStartParams"].get("metrics-export-port") == "8080", (path, group)


def test_cloud_files_run_the_projects_gpu_image_and_install_nothing_at_boot():
    from clusters import DOCKERFILE

    pinned = re.search(r'"ray\[default,train\]>=([0-9.]+),', (REPO / "pyproject.toml").read_text()).group(1)
    base = re.search(r"^FROM rayproject/ray:([0-9.]+)-py\d+-gpu$", DOCKERFILE.read_text(), re.M)
    assert base and base.group(1).startswith(pinned), (pinned, base)
    assert '".[hf]"' in DOCKERFILE.read_text()
    images = set()
    for path in (AWS, GCP):
        doc = yaml.safe_load(path.read_text())
        images.add(doc["docker"]["image"])
        assert not any("pip install" in c and ("torch" in c or "raydistro" in c)
                       for c in doc["setup_commands"] + doc["worker_setup_commands"]), path
    for path in (KUBE, RAYJOB):
        images |= set(re.findall(r"^\s*image: (\S+)", path.read_text(), re.M))
    assert len(images) == 1 and "raydistro" in images.pop()
