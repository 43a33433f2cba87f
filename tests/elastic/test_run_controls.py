"""Run options that change what a live run does: held-out scoring every N steps, `scale N` within bounds."""
import threading

from elastic.cli import train
from elastic.config import load_config

from .conftest import small_config


def test_eval_every_scores_the_held_out_set_during_the_run(tmp_path, ray_cluster):
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=evalevery", "train.steps=5", "train.eval_every=2")
    summary = train(cfg)
    assert summary["state"] == "FINISHED"
    history = summary["val_history"]
    assert [h["step"] for h in history] == [2, 4, 5], history  # every 2 committed steps, then the final score
    assert all(h["val_tokens"] > 0 and h["val_loss"] > 0 for h in history)
    assert summary["val_loss"] == history[-1]["val_loss"]
    assert history[0]["val_loss"] != history[1]["val_loss"]  # scored on the parameters of their own step


def _coordinator(tmp_path, *overrides):
    from elastic.coordinator import Coordinator

    return Coordinator(load_config("tiny", [f"run.dir={tmp_path}", "run.name=scale", *overrides]))


def test_scale_is_capped_by_max_workers_with_the_reason_recorded(tmp_path):
    c = _coordinator(tmp_path, "train.workers=2", "train.max_workers=3")
    assert c.request_scale(10) == 3 and c.target_workers == 3
    assert "capped at train.max_workers=3" in c.summary.data["events"][-1]["what"]
    assert c.request_scale(0) == 1  # and never below train.min_workers
    assert c.request_scale(2) == 2 and c.summary.data["events"][-1]["what"] == "scale-request 2"
    c = _coordinator(tmp_path, "train.workers=2")  # max_workers 0 = train.workers
    assert c.request_scale(5) == 2


def test_scale_request_waits_for_the_coordinator_lock(tmp_path):
    """`scale` arrives on another thread than the loop's: it changes the target only under the lock."""
    c = _coordinator(tmp_path, "train.workers=2", "train.max_workers=4")
    got = []
    with c.lock:
        t = threading.Thread(target=lambda: got.append(c.request_scale(4)))
        t.start()
        t.join(1.0)
        assert t.is_alive() and c.target_workers == 2 and not c.scaled_explicitly
    t.join()
    assert got == [4] and c.target_workers == 4 and c.scaled_explicitly
