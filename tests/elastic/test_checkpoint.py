"""Checkpoints are atomic and checksummed; a cut-short or corrupt latest falls back to the previous."""
import logging

import torch

from elastic.checkpoint import CheckpointStore, to_bytes


def _write(store, step):
    return store.write(step, {"step": step}, {"model.pt": to_bytes({"w": torch.full((4,), float(step))})})


def test_roundtrip_and_keep(tmp_path):
    store = CheckpointStore(str(tmp_path / "ck"), keep=2)
    for s in (1, 2, 3):
        _write(store, s)
    assert store.steps() == [2, 3]
    ck = store.load_latest()
    assert ck.step == 3 and torch.equal(ck.tensor_file("model.pt")["w"], torch.full((4,), 3.0))


def test_truncated_latest_falls_back_with_warning(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ck"), keep=3)
    _write(store, 1)
    _write(store, 2)
    f = tmp_path / "ck" / "step-00000002" / "model.pt"
    f.write_bytes(f.read_bytes()[:10])
    with caplog.at_level(logging.WARNING):
        ck = store.load_latest()
    assert ck.step == 1
    assert "step-00000002/model.pt: checksum mismatch" in caplog.text


def test_missing_commit_marker_is_not_a_checkpoint(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ck"), keep=3)
    _write(store, 1)
    _write(store, 2)
    (tmp_path / "ck" / "step-00000002" / "COMMIT").unlink()
    with caplog.at_level(logging.WARNING):
        assert store.load_latest().step == 1
    assert "no COMMIT marker" in caplog.text


def test_empty_store(tmp_path):
    assert CheckpointStore(str(tmp_path / "none")).load_latest() is None
