"""elastic.tracking: metrics.jsonl, TensorBoard event files, W&B (offline) and MLflow (file store), summary.json
rewritten during the run. Driven here as the coordinator drives it, with a real RunSummary and membership
generation; the run-level test is test_hf_run.py (files present while the run trains)."""
import json
import struct
import types

import pytest

from elastic import tracking
from elastic.config import load_config, run_dir
from elastic.membership import Member, MembershipGeneration
from elastic.summary import RunSummary


def _report(worker_id: str, step: int, **fields):
    """One ok worker report as the coordinator holds it (elastic.messages.StepReport where the tree has it)."""
    try:
        from elastic.messages import StepReport
    except ImportError:  # reports as dicts
        return {"worker_id": worker_id, "step": step, "ok": True, **fields}
    return StepReport(worker_id, 0, step, ok=True, **fields)


def _coordinator(cfg):
    gen = MembershipGeneration(3, [Member("w1", "A100", "n1", "cuda:0"), Member("w2", "L4", "n2", "cuda:0")])
    return types.SimpleNamespace(cfg=cfg, summary=RunSummary(cfg), generation=gen, step=0)


def _train(coord, steps: int):
    for step in range(steps):
        reports = [_report(w, step, tokens=256, loss=5.0 - step * 0.1, bytes_sent=1000 + step, bytes_received=1000,
                           dense_equivalent_bytes=64000, codec_ms=1.5) for w in ("w1", "w2")]
        coord.summary.step(step, 5.0 - step * 0.1, 512, reports, True, 0.5)
        if step == 2:
            coord.summary.membership_change(step, "death", 1.25, 1)
            coord.summary.event(step, "chaos-kill w2")
        coord.step = step + 1
        tracking.on_commit(coord, step, 5.0 - step * 0.1, 512, reports, 0.5)


def _tb_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `directory` (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for path in sorted(directory.glob("events.out.tfevents*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_rows_tensorboard_and_summary_during_the_run(tmp_path):
    cfg = load_config("tiny", [f"run.dir={tmp_path}", "run.name=trk", "tracking.summary_every=2",
                               "tracking.flush_s=0"])
    coord = _coordinator(cfg)
    _train(coord, 3)
    rd = run_dir(cfg)
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    r = rows[2]
    assert r["loss"] == pytest.approx(4.8) and r["tokens_per_s"] == pytest.approx(1024)
    assert r["bytes_sent"] == 1002 and r["compression_ratio"] == pytest.approx(64000 / 1002)
    assert r["world_size"] == 2 and r["generation"] == 3 and r["accelerators"] == ["A100", "L4"]
    assert [c["kind"] for c in r["membership"]] == ["death"] and "membership" not in rows[1]
    assert any(e["what"] == "chaos-kill w2" for e in r["events"])
    # summary.json is rewritten every 2 steps while the run goes
    assert json.loads((rd / "summary.json").read_text())["steps"] == 2
    assert json.loads((rd / "summary.json").read_text())["state"] == "RUNNING"
    # TensorBoard files are flushed every step with tracking.flush_s=0
    scalars = _tb_scalars(rd / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [0, 1, 2]
    assert scalars["cluster/world_size"][-1] == (2, 2.0) and scalars["cluster/generation"][-1] == (2, 3.0)
    coord.summary.data.update(state="FINISHED", val_loss=4.5)
    tracking.on_finish(coord)
    last = json.loads((rd / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["final"] and last["state"] == "FINISHED" and last["val_loss"] == 4.5
    assert _tb_scalars(rd / "tensorboard")["val/loss"] == [(2, 4.5)]


def test_tensorboard_reaches_the_disk_at_most_every_flush_s(tmp_path):
    """A fast run does not fsync its event file on every step: the first row at once, then every
    tracking.flush_s (and at every membership change); the run's end leaves every event on disk."""
    cfg = load_config("tiny", [f"run.dir={tmp_path}", "run.name=trk", "tracking.flush_s=3600"])
    coord = _coordinator(cfg)
    _train(coord, 2)
    rd = run_dir(cfg)
    assert [s for s, _ in _tb_scalars(rd / "tensorboard")["train/loss"]] == [0]
    assert [json.loads(x)["step"] for x in (rd / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    coord.summary.data.update(state="FINISHED")
    tracking.on_finish(coord)
    assert [s for s, _ in _tb_scalars(rd / "tensorboard")["train/loss"]] == [0, 1]


def test_a_bad_flush_interval_is_refused():
    with pytest.raises(Exception, match="tracking.flush_s"):
        load_config("tiny", ["tracking.flush_s=-1"])


def test_a_resumed_run_appends_rows(tmp_path):
    cfg = load_config("tiny", [f"run.dir={tmp_path}", "run.name=again", "tracking.tensorboard=false"])
    for _ in range(2):
        coord = _coordinator(cfg)
        _train(coord, 2)
        tracking.on_finish(coord)
    rows = [json.loads(x) for x in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("final", False) for r in rows] == [False, False, True] * 2


def test_wandb_offline_and_mlflow_file_store(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path}/mlruns"
    cfg = load_config("tiny", [f"run.dir={tmp_path}", "run.name=wm", "tracking.wandb.project=raydistro-test",
                               "tracking.wandb.mode=offline", f"tracking.mlflow.uri={uri}",
                               "tracking.mlflow.experiment=exp"])
    coord = _coordinator(cfg)
    _train(coord, 4)
    coord.summary.data.update(state="FINISHED", val_loss=4.4)
    tracking.on_finish(coord)
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("exp").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == str(cfg.train.steps)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [0, 1, 2, 3]
    assert client.get_metric_history(run.info.run_id, "val.loss")[0].value == pytest.approx(4.4)
    offline = list((run_dir(cfg) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_an_unusable_sink_warns_and_the_run_goes_on(tmp_path, caplog):
    pytest.importorskip("mlflow")
    cfg = load_config("tiny", [f"run.dir={tmp_path}", "run.name=bad", "tracking.mlflow.uri=unknownscheme://x"])
    coord = _coordinator(cfg)
    _train(coord, 2)
    assert "tracking.mlflow could not start" in caplog.text
    assert len((run_dir(cfg) / "metrics.jsonl").read_text().splitlines()) == 2
