"""Credentials given in data.storage_options end up nowhere: not in the run directory (config.yaml,
checkpoints' meta.json and tensors, summary.json), not in the driver's output, not in Ray's session logs."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.jobs.conftest import REPO, small_overrides

KEY, SECRET = "AKIAFAKEKEY123", "FAKE-SECRET-xyz"


@pytest.fixture
def ray_tmpdir():
    path = tempfile.mkdtemp(prefix="rdsec-", dir="/tmp")  # short: Ray's socket paths are length-limited
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _files_with_secrets(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets, files Ray removed meanwhile
                continue
            hits += [f"{path}: {s}" for s in (KEY, SECRET) if s.encode() in data]
    return hits


@pytest.mark.timeout(180)
def test_storage_credentials_never_reach_run_dir_output_or_ray_logs(tmp_path, ray_tmpdir):
    run_dir = tmp_path / "runs"
    # a local source: fsspec's local filesystem accepts and ignores key/secret, the code paths are the same
    args = small_overrides(run_dir, "secret", "train.steps=6", "checkpoint.every=3", "cluster.num_cpus=3",
                           f"data.storage_options={{key: {KEY}, secret: {SECRET}}}")
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmpdir), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-m", "elastic", "train", "--config", "tiny", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = run_dir / "secret"
    assert (out / "summary.json").exists() and list(out.glob("checkpoints/step-*/meta.json"))
    assert "***" in (out / "config.yaml").read_text()

    assert any(ray_tmpdir.rglob("raylet.out")), "Ray's session logs are not where the test looks"
    leaks = [f"driver output: {s}" for s in (KEY, SECRET) if s in res.stdout + res.stderr]
    leaks += _files_with_secrets(run_dir)
    leaks += _files_with_secrets(ray_tmpdir)
    assert not leaks, leaks
