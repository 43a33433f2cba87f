"""A real local Ray head with the dashboard (`clusters.local`), and helpers to drive `ray job` against it.

One head for the whole folder: starting it costs ~5 s, each job a few more. The head runs token auth off
(local only), its own RAY_TMPDIR and free ports; `local.down` stops exactly its processes, by PID.
"""
import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clusters import local

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# What never goes to the cluster with --working-dir: wheels, other people's scratch, run outputs, git.
# (.gitignore'd paths are skipped by Ray already; .gpu/.rdtune are only in .git/info/exclude.)
EXCLUDES = [".git", ".whl", ".gpu", ".rdtune", "runs", ".pytest_cache", "**/__pycache__"]
# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (default 3 s) read by the
# job's supervisor actor, whose env is the job's runtime_env: give the stop checkpoint room on a busy machine.
STOP_WAIT_S = "60"


@functools.lru_cache(maxsize=1)
def sample_dirs() -> tuple[str, str]:
    """The bundled corpus (train, val) as absolute paths: jobs must not depend on RAYDISTRO_CACHE."""
    from datasets.sample import ensure_sample

    return ensure_sample("train"), ensure_sample("val")


def small_overrides(run_dir: Path, name: str, *extra: str) -> list[str]:
    """The seconds-per-run config of tests/elastic (byte tokenizer, one-layer GPT), local sample data."""
    train, val = sample_dirs()
    return [
        f"run.dir={run_dir}", f"run.name={name}", f"data.source={train}", f"data.val_source={val}",
        "data.tokenizer=bytes", "data.max_doc_tokens=192",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
        "train.seq_len=64", "train.batch_tokens=512", "train.micro_batch_tokens=4096",
        "train.lr=3e-3", "train.warmup_steps=2", "train.step_timeout_s=20",
        "train.eval_tokens=2048", "checkpoint.every=0", "train.workers=2", "train.log_every=2",
        # CPU workers on the head: `clusters local up` publishes GPU node types, which train.device=auto
        # would ask the autoscaler for
        "train.device=cpu",
        *extra,
    ]


class Head:
    """A running `clusters.local` head and the CLI calls the tests make against its dashboard."""

    def __init__(self, cluster: local.LocalCluster, env: dict):
        self.cluster = cluster
        self.env = env
        self.url = cluster.dashboard_url

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES,
                       "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S}}
        res = self.ray("job", "submit", "--address", self.url, "--submission-id", submission_id, "--no-wait",
                       "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint)
        assert res.returncode == 0, res.stdout + res.stderr

    def overrides(self, run_dir: Path, name: str, *extra: str) -> list[str]:
        return small_overrides(run_dir, name, *extra)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url)

    def wait_status(self, submission_id: str, want: set, timeout: float) -> str:
        client = self.client()
        deadline = time.time() + timeout
        status = None
        while time.time() < deadline:
            status = str(client.get_job_status(submission_id).value)
            if status in want or status in ("FAILED", "STOPPED", "SUCCEEDED"):
                break
            time.sleep(1.0)
        return status

    def logs(self, submission_id: str) -> str:
        """The job's log as the dashboard serves it (`ray job logs` prints the same, plus its own colors)."""
        return self.client().get_job_logs(submission_id)

    def wait_log(self, submission_id: str, pattern: str, timeout: float) -> re.Match:
        """Poll the job's logs (the dashboard's log API) until the regex `pattern` matches a line."""
        client = self.client()
        deadline = time.time() + timeout
        text = ""
        while time.time() < deadline:
            text = client.get_job_logs(submission_id)
            match = re.search(pattern, text, re.M)
            if match:
                return match
            if str(client.get_job_status(submission_id).value) in ("FAILED", "STOPPED", "SUCCEEDED"):
                break
            time.sleep(1.0)
        raise AssertionError(f"{pattern!r} not in the logs of {submission_id} after {timeout}s:\n{text[-3000:]}")


@pytest.fixture(scope="session")
def head(tmp_path_factory):
    """`python -m clusters local up` (in process) with a head of 4 CPUs: 2 workers + spare, no autoscaling.

    Its state file goes to a private RAYDISTRO_CACHE; jobs get the sample corpus as absolute paths."""
    cache = tmp_path_factory.mktemp("cache")
    doc = yaml.safe_load(local.DEFAULT_CONFIG.read_text())
    doc["available_node_types"]["ray.head.default"]["resources"] = {"CPU": 4}
    cfg = cache / "head4.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))

    def in_cache(fn, *args):
        with pytest.MonkeyPatch.context() as mp:  # only `up`/`down` see it: the sample corpus stays where it is
            mp.setenv("RAYDISTRO_CACHE", str(cache))
            mp.delenv("RAY_ADDRESS", raising=False)
            return fn(*args)

    cluster = in_cache(local.up, cfg)
    try:
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        env.pop("RAY_ADDRESS", None)
        yield Head(cluster, env)
    finally:
        in_cache(local.down, cluster)
