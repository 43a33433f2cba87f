"""Validation of raydistro cluster files: Ray cluster-launcher YAMLs and KubeRay RayCluster CRs.

Owns the rules a cluster file must meet before anyone launches it. Promises:

* a cluster-launcher YAML is checked against Ray's own schema (``ray/autoscaler/ray-schema.json``,
  the same one ``ray up`` uses);
* a KubeRay ``RayCluster`` (Ray ships no schema for it) gets a structural check of our own;
* both get raydistro's rules: resources are whole numbers, every GPU node type carries an
  ``accelerator_type:*`` resource, min <= max workers (per type and in total), token auth is on
  for real clusters (``RAY_AUTH_MODE=token``), and the dashboard is never bound to 0.0.0.0;
* every problem is one ``Problem`` that names the file, the key path and the fix.

Pure logic: reads YAML, imports nothing from Ray but the location of its schema file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

# Providers that simulate a cluster on one machine: no network exposure, so token auth is optional.
LOCAL_PROVIDERS = frozenset({"fake_multinode", "fake_multinode_docker"})

# Top-level keys the autoscaler reads without defaults when started via `ray start --autoscaling-config`
# (no `ray up` to fill them in): a missing one kills the autoscaler with KeyError (see docs/clusters.md).
AUTOSCALER_REQUIRED_KEYS = (
    "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider", "auth",
    "docker", "head_node_type", "available_node_types", "file_mounts", "cluster_synced_files",
    "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "initialization_commands",
    "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
    "worker_start_ray_commands",
)

# The fake_multinode provider hard-codes the head's node type name (FAKE_HEAD_NODE_TYPE in Ray).
FAKE_HEAD_NODE_TYPE = "ray.head.default"

ACCELERATOR_PREFIX = "accelerator_type:"
GPU_LIMIT_KEY = "nvidia.com/gpu"

_TOKEN_AUTH = re.compile(r"RAY_AUTH_MODE\s*=\s*['\"]?token\b")
_OPEN_DASHBOARD = re.compile(r"--dashboard-host[=\s]+['\"]?0\.0\.0\.0")


@dataclass(frozen=True)
class Problem:
    """One rule a cluster file breaks: where (file, dotted key path) and what to do about it."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}: {where}{self.message}"


def validate_file(path: str | Path) -> list[Problem]:
    """Every problem in one cluster file; an empty list means it is fine to launch."""
    name = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        return [Problem(name, "", f"cannot read file ({e.strerror}); check the path")]
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [Problem(name, "", f"is not valid YAML: {e}")]
    return validate_document(doc, name)


def validate_document(doc: Any, file: str) -> list[Problem]:
    """Problems in an already-parsed cluster document (cluster-launcher config or RayCluster CR)."""
    if not isinstance(doc, dict):
        return [Problem(file, "", "is not a mapping; expected a Ray cluster YAML or a KubeRay RayCluster")]
    if doc.get("kind") == "RayJob":
        return _validate_rayjob(doc, file)
    if doc.get("kind") == "PodMonitor":
        return _validate_podmonitor(doc, file)
    if doc.get("kind") == "RayCluster" or "apiVersion" in doc:
        return _validate_raycluster(doc, file)
    return _validate_launcher_config(doc, file)


# ---------------------------------------------------------------------------------------------
# Cluster-launcher YAML (ray up / ray start --autoscaling-config)


def _validate_launcher_config(doc: dict, file: str) -> list[Problem]:
    ours = _launcher_rules(doc, file)
    flagged = {p.path for p in ours}
    # Ray's schema repeats some of our findings (e.g. "0.5 is not of type 'integer'"); ours say more.
    schema = [p for p in _ray_schema_problems(doc, file) if p.path not in flagged]
    return ours + schema


def ray_schema() -> dict:
    """Ray's own cluster-launcher schema, from the installed ray package."""
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(schema_path.read_text())


def _ray_schema_problems(doc: dict, file: str) -> list[Problem]:
    import jsonschema

    validator = jsonschema.Draft7Validator(ray_schema())
    problems = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        problems.append(
            Problem(file, _dotted(err.absolute_path), f"{err.message} (Ray cluster schema)")
        )
    return problems


def _launcher_rules(doc: dict, file: str) -> list[Problem]:
    problems: list[Problem] = []
    provider = doc.get("provider") if isinstance(doc.get("provider"), dict) else {}
    provider_type = provider.get("type")
    node_types = doc.get("available_node_types")
    node_types = node_types if isinstance(node_types, dict) else {}

    if provider_type in LOCAL_PROVIDERS:
        for key in AUTOSCALER_REQUIRED_KEYS:
            if key not in doc:
                problems.append(Problem(
                    file, key,
                    "is missing; the local autoscaler reads every top-level key and dies with "
                    "KeyError without it (an empty list/mapping is fine)",
                ))

    head_type = doc.get("head_node_type")
    if provider_type == "fake_multinode" and head_type != FAKE_HEAD_NODE_TYPE:
        problems.append(Problem(
            file, "head_node_type",
            f"{head_type!r} must be {FAKE_HEAD_NODE_TYPE!r}: the fake_multinode provider registers the head "
            "under that fixed name; rename the head's node type"))
    if node_types and head_type is not None and head_type not in node_types:
        problems.append(Problem(
            file, "head_node_type",
            f"{head_type!r} is not one of available_node_types ({', '.join(node_types)}); "
            "name the head's node type",
        ))

    total_min = 0
    for type_name, spec in node_types.items():
        base = f"available_node_types.{type_name}"
        if not isinstance(spec, dict):
            continue
        resources = spec.get("resources")
        if isinstance(resources, dict):
            problems += _resource_rules(resources, f"{base}.resources", file)
        problems += _min_max_rule(spec, "min_workers", "max_workers", base, file)
        if type_name != head_type and _is_int(spec.get("min_workers")):
            total_min += spec["min_workers"]

    cluster_max = doc.get("max_workers")
    if _is_int(cluster_max) and total_min > cluster_max:
        problems.append(Problem(
            file, "max_workers",
            f"{cluster_max} is below the sum of min_workers over node types ({total_min}); "
            "raise max_workers or lower some min_workers",
        ))

    commands = {key: doc.get(key) or [] for key in (
        "initialization_commands", "setup_commands", "head_setup_commands",
        "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    for key, cmds in commands.items():
        for i, cmd in enumerate(cmds if isinstance(cmds, list) else []):
            if isinstance(cmd, str) and _OPEN_DASHBOARD.search(cmd):
                problems.append(Problem(
                    file, f"{key}[{i}]",
                    "binds the dashboard to 0.0.0.0 (open to anyone who can reach the node); use "
                    "--dashboard-host=127.0.0.1 and reach it through `ray dashboard` / an SSH tunnel",
                ))

    if provider_type not in LOCAL_PROVIDERS:
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            cmds = commands[key] if isinstance(commands[key], list) else []
            if not any(isinstance(c, str) and _TOKEN_AUTH.search(c) for c in cmds):
                problems.append(Problem(
                    file, key,
                    f"does not turn on token auth for provider {provider_type!r}; prefix `ray start` "
                    "with `RAY_AUTH_MODE=token` (e.g. `export RAY_AUTH_MODE=token;`) and ship the "
                    "token (~/.ray/auth_token) via file_mounts",
                ))
    return problems


# ---------------------------------------------------------------------------------------------
# KubeRay RayCluster custom resource


def _need(problems: list[Problem], file: str):
    """`need(cond, path, message)`: records a Problem at `path` unless `cond`; returns `cond`."""
    def need(cond: bool, path: str, message: str) -> bool:
        if not cond:
            problems.append(Problem(file, path, message))
        return cond

    return need


def _validate_raycluster(doc: dict, file: str) -> list[Problem]:
    problems: list[Problem] = []
    need = _need(problems, file)

    need(str(doc.get("apiVersion", "")).startswith("ray.io/"), "apiVersion",
         f"{doc.get('apiVersion')!r} is not a KubeRay API version; use ray.io/v1")
    need(doc.get("kind") == "RayCluster", "kind",
         f"{doc.get('kind')!r} is not RayCluster; this checker knows RayCluster CRs only")
    metadata = doc.get("metadata")
    need(isinstance(metadata, dict) and bool(metadata.get("name")), "metadata.name",
         "is missing; every RayCluster needs a name")
    spec = doc.get("spec")
    if not need(isinstance(spec, dict), "spec", "is missing or not a mapping"):
        return problems
    return problems + _raycluster_spec_rules(spec, "spec", file)


def _raycluster_spec_rules(spec: dict, at: str, file: str) -> list[Problem]:
    """Rules of a RayCluster spec (a RayCluster's `spec`, a RayJob's `spec.rayClusterSpec`) found at `at`."""
    problems: list[Problem] = []
    need = _need(problems, file)

    groups: list[tuple[str, dict]] = []
    head = spec.get("headGroupSpec")
    if need(isinstance(head, dict), f"{at}.headGroupSpec", "is missing; a RayCluster needs a head group"):
        groups.append((f"{at}.headGroupSpec", head))
    workers = spec.get("workerGroupSpecs", [])
    if need(isinstance(workers, list), f"{at}.workerGroupSpecs", "must be a list of worker groups"):
        seen: set[str] = set()
        for i, group in enumerate(workers):
            base = f"{at}.workerGroupSpecs[{i}]"
            if not need(isinstance(group, dict), base, "must be a mapping"):
                continue
            name = group.get("groupName")
            if need(isinstance(name, str) and bool(name), f"{base}.groupName", "is missing"):
                need(name not in seen, f"{base}.groupName", f"{name!r} is used twice; names must be unique")
                seen.add(name)
            problems += _replica_rules(group, base, file)
            groups.append((base, group))

    # KubeRay's own token auth (spec.authOptions.mode: token, newer operators) covers every container.
    auth = spec.get("authOptions")
    native_token = isinstance(auth, dict) and auth.get("mode", "token") == "token"
    for base, group in groups:
        problems += _group_rules(group, base, file, token_from_operator=native_token)
    return problems


def _token_env(container: dict) -> bool:
    env = container.get("env") or []
    return any(isinstance(e, dict) and e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in env)


def _validate_rayjob(doc: dict, file: str) -> list[Problem]:
    """A KubeRay RayJob: the job (entrypoint, clean-up) and its cluster (the RayCluster rules, same token rule
    for the submitter pod that runs `ray job submit`)."""
    problems: list[Problem] = []
    need = _need(problems, file)

    need(str(doc.get("apiVersion", "")).startswith("ray.io/"), "apiVersion",
         f"{doc.get('apiVersion')!r} is not a KubeRay API version; use ray.io/v1")
    metadata = doc.get("metadata")
    need(isinstance(metadata, dict) and bool(metadata.get("name")), "metadata.name",
         "is missing; every RayJob needs a name")
    spec = doc.get("spec")
    if not need(isinstance(spec, dict), "spec", "is missing or not a mapping"):
        return problems
    entry = spec.get("entrypoint")
    need(isinstance(entry, str) and bool(entry.strip()), "spec.entrypoint",
         "is missing; the command the job runs, e.g. 'python -m elastic train --config ...'")
    if "shutdownAfterJobFinishes" in spec:
        need(isinstance(spec["shutdownAfterJobFinishes"], bool), "spec.shutdownAfterJobFinishes",
             "must be true or false")
    if "runtimeEnvYAML" in spec:
        need(isinstance(spec["runtimeEnvYAML"], str), "spec.runtimeEnvYAML",
             "must be a string holding YAML (KubeRay's format), e.g. runtimeEnvYAML: |")
    cluster = spec.get("rayClusterSpec")
    if not need(isinstance(cluster, dict), "spec.rayClusterSpec",
                "is missing; a RayJob that starts its own cluster describes it here (or use clusterSelector)"):
        return problems
    problems += _raycluster_spec_rules(cluster, "spec.rayClusterSpec", file)
    auth = cluster.get("authOptions")
    native_token = isinstance(auth, dict) and auth.get("mode", "token") == "token"
    submitter = ((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers")
    if not native_token:
        need(isinstance(submitter, list) and bool(submitter) and isinstance(submitter[0], dict)
             and _token_env(submitter[0]), "spec.submitterPodTemplate.spec.containers[0].env",
             "does not set RAY_AUTH_MODE=token; the submitter pod calls the token-protected job API: add "
             "{name: RAY_AUTH_MODE, value: token} and RAY_AUTH_TOKEN from the Secret")
    return problems


def _validate_podmonitor(doc: dict, file: str) -> list[Problem]:
    """A Prometheus-operator PodMonitor that scrapes the Ray pods' metrics port."""
    problems: list[Problem] = []
    need = _need(problems, file)

    need(str(doc.get("apiVersion", "")).startswith("monitoring.coreos.com/"), "apiVersion",
         f"{doc.get('apiVersion')!r} is not the Prometheus operator's API; use monitoring.coreos.com/v1")
    metadata = doc.get("metadata")
    need(isinstance(metadata, dict) and bool(metadata.get("name")), "metadata.name", "is missing")
    spec = doc.get("spec")
    if not need(isinstance(spec, dict), "spec", "is missing or not a mapping"):
        return problems
    selector = spec.get("selector")
    need(isinstance(selector, dict) and bool(selector.get("matchLabels") or selector.get("matchExpressions")),
         "spec.selector", "is missing or empty; select the Ray pods, e.g. matchLabels: {ray.io/is-ray-node: \"yes\"}")
    endpoints = spec.get("podMetricsEndpoints")
    if need(isinstance(endpoints, list) and bool(endpoints), "spec.podMetricsEndpoints",
            "is missing; list the metrics port, e.g. [{port: metrics}]"):
        for i, ep in enumerate(endpoints):
            need(isinstance(ep, dict) and isinstance(ep.get("port"), str) and bool(ep.get("port")),
                 f"spec.podMetricsEndpoints[{i}].port",
                 "must name the container port Ray exports metrics on (e.g. metrics, containerPort 8080)")
    return problems


def _replica_rules(group: dict, base: str, file: str) -> list[Problem]:
    problems: list[Problem] = []
    for key in ("minReplicas", "maxReplicas", "replicas"):
        if key in group and not _is_int(group[key]):
            problems.append(Problem(file, f"{base}.{key}", f"{group[key]!r} is not an integer"))
    for key in ("minReplicas", "maxReplicas"):
        if key not in group:
            problems.append(Problem(file, f"{base}.{key}",
                                    "is missing; set it so the autoscaler knows the bounds of this group"))
    problems += _min_max_rule(group, "minReplicas", "maxReplicas", base, file)
    lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
    if _is_int(lo) and _is_int(hi) and _is_int(n) and not lo <= n <= hi:
        problems.append(Problem(file, f"{base}.replicas",
                                f"{n} is outside [minReplicas, maxReplicas] = [{lo}, {hi}]"))
    return problems


def _group_rules(group: dict, base: str, file: str, token_from_operator: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    params = group.get("rayStartParams", {})
    if not isinstance(params, dict):
        return [Problem(file, f"{base}.rayStartParams", "must be a mapping of ray start flags to strings")]
    for key, value in params.items():
        if not isinstance(value, str):
            problems.append(Problem(
                file, f"{base}.rayStartParams.{key}",
                f"{value!r} is not a string; KubeRay passes rayStartParams verbatim, so quote it"))
    if str(params.get("dashboard-host", "")).strip() == "0.0.0.0":
        problems.append(Problem(
            file, f"{base}.rayStartParams.dashboard-host",
            "is 0.0.0.0 (open to every pod and any exposed Service); use '127.0.0.1' and reach it "
            "with `kubectl port-forward`"))

    custom: dict = {}
    raw = params.get("resources")
    if isinstance(raw, str):
        try:
            custom = json.loads(_unquote(raw))
        except ValueError:
            problems.append(Problem(
                file, f"{base}.rayStartParams.resources",
                f"{raw!r} is not a JSON object; write it as '\"{{\\\"accelerator_type:A100\\\": 1}}\"'"))
            custom = {}
        if not isinstance(custom, dict):
            problems.append(Problem(file, f"{base}.rayStartParams.resources", "must be a JSON object"))
            custom = {}
        problems += _resource_rules(custom, f"{base}.rayStartParams.resources", file, gpu_key=None)

    containers = (((group.get("template") or {}).get("spec") or {}).get("containers"))
    if not isinstance(containers, list) or not containers:
        problems.append(Problem(file, f"{base}.template.spec.containers",
                                "is missing; the Ray container goes here"))
        return problems
    ray_container = containers[0]
    cpath = f"{base}.template.spec.containers[0]"
    gpus = _gpu_limit(ray_container)
    num_gpus = params.get("num-gpus")
    if (gpus or _positive(num_gpus)) and not any(k.startswith(ACCELERATOR_PREFIX) for k in custom):
        problems.append(Problem(
            file, f"{base}.rayStartParams.resources",
            f"group has GPUs ({GPU_LIMIT_KEY}: {gpus}) but no \"{ACCELERATOR_PREFIX}*\" resource; add "
            "resources: '\"{\\\"accelerator_type:A100\\\": 1}\"' so raydistro can place work by accelerator"))
    if gpus is not None and not _is_int(gpus):
        problems.append(Problem(file, f"{cpath}.resources.limits.{GPU_LIMIT_KEY}",
                                f"{gpus!r} is not an integer; GPUs are whole devices"))

    env = ray_container.get("env") or []
    token = any(isinstance(e, dict) and e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token"
                for e in env)
    if not token and not token_from_operator:
        problems.append(Problem(
            file, f"{cpath}.env",
            "does not set RAY_AUTH_MODE=token; add {name: RAY_AUTH_MODE, value: token} and the token "
            "as RAY_AUTH_TOKEN from a Secret (or spec.authOptions.mode: token on KubeRay versions "
            "that support it)"))
    return problems


# ---------------------------------------------------------------------------------------------
# Rules shared by both formats


def _resource_rules(resources: dict, base: str, file: str, gpu_key: str | None = "GPU") -> list[Problem]:
    problems: list[Problem] = []
    for key, value in resources.items():
        if not _is_int(value):
            problems.append(Problem(
                file, f"{base}.{key}",
                f"{value!r} is not an integer; cluster YAML resources must be whole numbers"))
        elif value < 0:
            problems.append(Problem(file, f"{base}.{key}", f"{value} is negative"))
    if gpu_key is not None and _positive(resources.get(gpu_key)):
        if not any(str(k).startswith(ACCELERATOR_PREFIX) for k in resources):
            problems.append(Problem(
                file, base,
                f"has {gpu_key}: {resources[gpu_key]} but no \"{ACCELERATOR_PREFIX}*\" resource; add e.g. "
                "\"accelerator_type:A100\": 1 so raydistro can place work by accelerator"))
    return problems


def _min_max_rule(spec: dict, lo_key: str, hi_key: str, base: str, file: str) -> list[Problem]:
    lo, hi = spec.get(lo_key), spec.get(hi_key)
    if _is_int(lo) and _is_int(hi) and lo > hi:
        return [Problem(file, f"{base}.{lo_key}",
                        f"{lo} is greater than {hi_key} ({hi}); lower {lo_key} or raise {hi_key}")]
    return []


def _gpu_limit(container: dict) -> Any:
    res = container.get("resources") or {}
    for section in ("limits", "requests"):
        value = (res.get(section) or {}).get(GPU_LIMIT_KEY)
        if value is not None:
            return value
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def _unquote(raw: str) -> str:
    # KubeRay's documented style wraps the JSON in an extra pair of double quotes: '"{\"A\": 1}"'.
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1].replace('\\"', '"')
    return raw


def _dotted(path: Iterable) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
