"""Issue 17's "done means": a tiny Llama-style HF model with its own HF tokenizer trains on the sample corpus with
demo sync, loses a worker mid-run (a replacement joins with state from the survivor), exports, and the export
loads in transformers with the trained logits. Tracking files exist during the run and hold one row per step."""
import json
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
from .hf_testkit import build_llama_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_hf_llama_with_hf_tokenizer_demo_sync_survives_a_kill_exports_and_loads(tmp_path, ray_cluster):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = build_llama_dir(tmp_path / "llama")
    # min_workers=2: the kill pauses the run until a replacement is ready, which then joins with the
    # survivor's parameters and optimizer state (a joiner, whatever the machine's speed)
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=hf", f"model.hf={llama}",
                       f"data.tokenizer=hf:{llama}", "sync.name=demo", "train.steps=10", "train.workers=2",
                       "train.min_workers=2", "chaos.kill_at=[4]", "tracking.summary_every=2")
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
    assert summary["state"] == "FINISHED" and summary["steps"] == 10, summary.get("error")
    kinds = [c["kind"] for c in summary["membership_changes"]]
    assert "death" in kinds or "death-resume" in kinds, kinds
    assert any("state-from-peer" in e["what"] for e in summary["events"]), summary["events"]
    assert summary["replica_hashes_agree"] is True
    assert summary["data"]["duplicated"] == 0 and summary["data"]["skipped"] == 0
    assert summary["bytes_sent_per_worker_total"] and summary["model"]
    # during the run: rows and event files were there, and summary.json said RUNNING
    assert seen_during.get("rows", 0) >= 2 and seen_during["tensorboard"], seen_during
    assert seen_during["summary_state"] in (None, "RUNNING"), seen_during
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("final")]
    assert sorted({r["step"] for r in steps}) == list(range(10))
    assert all(r["world_size"] == 2 and r["bytes_sent"] > 0 and r["loss"] > 0 for r in steps)
    assert any(c["kind"].startswith("death") for r in steps for c in r.get("membership", [])), steps
    assert rows[-1]["final"] and rows[-1]["state"] == "FINISHED" and rows[-1]["val_loss"] is not None
    assert max(r["generation"] for r in steps) > min(r["generation"] for r in steps)

    # export (the CLI, as the README says) and load it in transformers: the trained logits
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "elastic", "export", str(rd), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["step"] == 10
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
        assert hf.generate(x, max_new_tokens=4, do_sample=False).shape[1] == x.shape[1] + 4
