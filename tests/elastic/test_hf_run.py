"""Issue 17's "done means", from the README: its snippet builds a tiny Llama-style HF model with its own HF tokenizer
on the sample corpus; the README's run (demo sync, a worker killed mid-run, a replacement joining with the
survivor's state) trains it; the README's export and load commands run as written. Tracking files exist during
the run and hold one row per step."""
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from datasets import get_tokenizer  # noqa: E402
from elastic.checkpoint import CheckpointStore  # noqa: E402
from elastic.cli import train  # noqa: E402
from elastic.config import checkpoint_uri, run_dir  # noqa: E402
from elastic.model import build_model  # noqa: E402

from .conftest import small_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def readme_blocks() -> tuple[str, list[str]]:
    """The README's tiny-llama Python block and its shell commands (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("<!-- tiny-llama"):]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [line.split("  #")[0].strip() for line in shell.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    return python, commands


def test_hf_llama_with_hf_tokenizer_demo_sync_survives_a_kill_exports_and_loads(tmp_path, ray_cluster):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    python, commands = readme_blocks()
    res = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    llama = tmp_path / "tiny-llama"
    train_cmd, export_cmd, load_cmd = commands
    assert train_cmd.startswith("python -m elastic train ") and export_cmd.startswith("python -m elastic export ")
    # the README's overrides on the test's small run (this session's Ray cluster; the workers' working directory
    # is not the test's, so the model directory goes in as an absolute path)
    overrides = [o.replace("=tiny-llama", f"={llama}").replace("=hf:tiny-llama", f"=hf:{llama}")
                 for o in shlex.split(train_cmd)[4:]]
    assert "sync.name=demo" in overrides and any(o.startswith("chaos.kill_at=") for o in overrides)
    # min_workers=2 (README): the kill pauses the run until a replacement is ready, which then joins with the
    # survivor's parameters and optimizer state (a joiner, whatever the machine's speed)
    cfg = small_config(tmp_path / "runs", ray_cluster.address, "tracking.summary_every=2", *overrides)
    steps = cfg.train.steps
    rd = run_dir(cfg)
    seen_during: dict = {}

    def watch():  # tracking files appear while the run trains, not only after it
        deadline = time.time() + 300
        while time.time() < deadline and "rows" not in seen_during:
            path = rd / "metrics.jsonl"
            if path.exists() and path.read_text().count("\n") >= 2:
                seen_during["rows"] = path.read_text().count("\n")
                seen_during["tensorboard"] = sorted(p.name for p in (rd / "tensorboard").glob("events.out.tfevents*"))
                summary = rd / "summary.json"
                seen_during["summary_state"] = json.loads(summary.read_text())["state"] if summary.exists() else None
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = train(cfg)
    watcher.join(timeout=5)
    assert summary["state"] == "FINISHED" and summary["steps"] == steps, summary.get("error")
    kinds = [c["kind"] for c in summary["membership_changes"]]
    assert "death" in kinds or "death-resume" in kinds, kinds
    assert any("state-from-peer" in e["what"] for e in summary["events"]), summary["events"]
    assert summary["replica_hashes_agree"] is True
    assert summary["data"]["duplicated"] == 0 and summary["data"]["skipped"] == 0
    assert summary["bytes_sent_per_worker_total"] and summary["model"]["hf"] == str(llama)
    # during the run: rows and event files were there, and summary.json said RUNNING
    assert seen_during.get("rows", 0) >= 2 and seen_during["tensorboard"], seen_during
    assert seen_during["summary_state"] in (None, "RUNNING"), seen_during
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if not r.get("final")]
    assert sorted({r["step"] for r in step_rows}) == list(range(steps))
    assert all(r["world_size"] == 2 and r["bytes_sent"] > 0 and r["loss"] > 0 for r in step_rows)
    assert any(c["kind"].startswith("death") for r in step_rows for c in r.get("membership", [])), step_rows
    assert rows[-1]["final"] and rows[-1]["state"] == "FINISHED" and rows[-1]["val_loss"] is not None
    assert max(r["generation"] for r in step_rows) > min(r["generation"] for r in step_rows)

    # the README's export and load commands, as written (cwd: the directory holding runs/)
    res = subprocess.run(export_cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["step"] == steps
    res = subprocess.run(load_cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and res.stdout.startswith("To be"), res.stderr[-3000:]
    out = tmp_path / shlex.split(export_cmd)[shlex.split(export_cmd).index("--out") + 1]
    # the export holds the trained weights: equal logits
    ckpt = CheckpointStore(checkpoint_uri(cfg)).load_latest()
    tok = get_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tok.vocab_size, 0)
    model.load_state_dict(ckpt.tensor_file("model.pt"))
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    ids = hf_tok("To be, or not to be, that is the question").input_ids
    assert ids == tok.encode("To be, or not to be, that is the question")
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model.eval()(x)[0], hf(input_ids=x).logits, atol=1e-5)
