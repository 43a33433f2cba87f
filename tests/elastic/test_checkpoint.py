"""Checkpoints are atomic and checksummed; a cut-short or corrupt latest falls back to the previous."""
import logging
import threading
import time

import pytest
import torch

from elastic.checkpoint import CheckpointStore, to_bytes, write_file


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


# ---- versioned rewrites, pruning, who writes what ------------------------------------------------------
from elastic.checkpoint import (META, BackgroundWrites, CheckpointWriter, HostSnapshot, build_manifest, dir_name,
                                files_by_rank, parse_dir_name, prune_plan, should_start, sync_file_for)


def test_directory_names_order_by_step_then_version():
    assert dir_name(25) == "step-00000025" and dir_name(25, 1) == "step-00000025.1"
    assert parse_dir_name("s3://b/run/step-00000025.1/") == (25, 1)
    assert parse_dir_name("step-00000025") == (25, 0)
    assert parse_dir_name("step-00000025.tmp") is None and parse_dir_name("COMMIT") is None


def test_rewrite_at_the_same_step_never_touches_the_committed_one(tmp_path):
    store = CheckpointStore(str(tmp_path / "ck"), keep=1)
    _write(store, 25)
    version, uri = store.begin(25)  # a membership change right after the periodic checkpoint
    assert version == 1 and uri.endswith("step-00000025.1")
    assert (tmp_path / "ck" / "step-00000025" / "COMMIT").exists()  # the good one is untouched
    # the rewrite dies half-way (a file, no COMMIT): the committed one is still what loads
    (tmp_path / "ck" / "step-00000025.1" / "model.pt").write_bytes(b"half")
    assert store.load_latest().uri.endswith("step-00000025")
    assert store.read(25).version == 0  # the newest *valid* version at that step
    store.release(25, version)
    v2, _ = store.begin(25)
    assert v2 == 2  # versions are never reused, so nothing is overwritten
    records = {"model.pt": store_file(store, 25, v2, {"w": torch.full((4,), 9.0)})}
    store.commit(25, v2, {"step": 25}, records)
    ck = store.load_latest()
    assert (ck.step, ck.version) == (25, 2) and ck.tensor_file("model.pt")["w"][0] == 9.0
    assert store.entries() == [(25, 2)]  # keep=1: pruned only after the replacement committed


def store_file(store, step, version, obj):
    from elastic.checkpoint import write_file

    return write_file(store.fs, f"{store._dir(step, version)}/model.pt", obj)


def test_prune_plan_keeps_the_newest_committed_and_writes_in_progress():
    entries = [(5, 0, True), (10, 0, False), (10, 1, True), (15, 0, False)]
    # keep=1: step 5 goes, 10.0 was abandoned (older than the newest commit), 15 may still be being written
    assert prune_plan(entries, 1) == [(5, 0), (10, 0)]
    assert prune_plan(entries, 3) == [(10, 0)]
    assert prune_plan([(5, 0, False), (6, 0, False)], 1) == []  # nothing committed: delete nothing
    assert prune_plan([(5, 0, True)], 0) == []  # the newest committed is never deleted


def test_each_rank_writes_only_its_own():
    assert files_by_rank(3, replicated_sync=True) == [{"model.pt": "model", "sync-rank0.pt": "sync"}, {}, {}]
    assert files_by_rank(2, replicated_sync=False) == [{"model.pt": "model", "sync-rank0.pt": "sync"},
                                                       {"sync-rank1.pt": "sync"}]
    names = {"model.pt", "sync-rank0.pt", "sync-rank1.pt"}
    assert sync_file_for(1, names, replicated_sync=False) == "sync-rank1.pt"
    assert sync_file_for(2, names, replicated_sync=False) is None  # a new rank starts its own state afresh
    assert sync_file_for(2, {"model.pt", "sync-rank0.pt"}, replicated_sync=True) == "sync-rank0.pt"


def test_periodic_checkpoints_do_not_pile_up_behind_a_slow_write():
    assert should_start("periodic", 0) and not should_start("periodic", 1)
    assert should_start("join", 1) and should_start("end", 2)


def test_manifest_needs_meta_and_well_formed_records():
    rec = {"sha256": "0" * 64, "bytes": 3}
    assert build_manifest(3, 1, {META: rec, "model.pt": rec})["version"] == 1
    with pytest.raises(ValueError, match="needs meta.json"):
        build_manifest(3, 0, {"model.pt": rec})
    with pytest.raises(ValueError, match="model.pt"):
        build_manifest(3, 0, {META: rec, "model.pt": {"sha256": "x", "bytes": 3}})


def test_snapshot_is_taken_at_once_and_written_later(tmp_path):
    """Training goes on after the snapshot: what lands on storage is the state at the snapshot."""
    live = {"w": torch.zeros(1000), "nested": [torch.ones(3), {"step": 4}]}
    snap = HostSnapshot({"model.pt": live}, clone_host=True)
    live["w"].add_(1.0)  # the next step updates the parameters in place
    live["nested"][0].mul_(5)
    writes = BackgroundWrites("w0")
    store = CheckpointStore(str(tmp_path / "ck"), keep=2)
    version, uri = store.begin(7)
    writes.start(uri, snap)
    records = writes.result(uri, timeout=60)
    store.commit(7, version, {"step": 7}, records)
    got = store.load_latest().tensor_file("model.pt")
    assert torch.equal(got["w"], torch.zeros(1000)) and torch.equal(got["nested"][0], torch.ones(3))
    assert got["nested"][1] == {"step": 4}


def test_a_write_that_fails_reports_the_storage_error(tmp_path):
    (tmp_path / "blocked").write_text("a file where the checkpoint directory should be")
    writes = BackgroundWrites("w0")
    writes.start(str(tmp_path / "blocked" / "step-00000003"), HostSnapshot({"model.pt": {"w": torch.ones(2)}}, True))
    with pytest.raises(OSError):
        writes.result(str(tmp_path / "blocked" / "step-00000003"), timeout=60)
    with pytest.raises(TimeoutError, match="no snapshot"):
        writes.result(str(tmp_path / "never"), timeout=0.05)


def test_writer_commits_only_once_every_rank_reported(tmp_path):
    store = CheckpointStore(str(tmp_path / "ck"), keep=3)
    _write(store, 4)
    w = CheckpointWriter(store)
    ck = w.begin(8, "periodic", {"step": 8})
    writes = {r: BackgroundWrites(f"w{r}") for r in range(2)}
    for r, files in enumerate(files_by_rank(2, replicated_sync=False)):
        trees = {n: ({"w": torch.full((4,), 8.0)} if what == "model" else {"m": torch.full((2,), float(r))})
                 for n, what in files.items()}
        writes[r].start(ck.uri, HostSnapshot(trees, True))
        ck.writers[f"ref{r}"] = (f"w{r}", files)
    assert not w.should_start("periodic")
    ck.deliver("ref0", writes[0].result(ck.uri, 60))
    assert w.advance() == [] and store.load_latest().step == 4  # rank 1 has not reported: no COMMIT yet
    ck.deliver("ref1", writes[1].result(ck.uri, 60))
    done = w.advance(wait_s=60)
    assert done == [ck] and ck.error is None and w.last_committed == ck.uri
    latest = store.load_latest()
    assert latest.step == 8 and latest.tensor_file("sync-rank1.pt")["m"][0] == 1.0
    assert latest.meta == {"step": 8, "version": 0}


def test_writer_abandons_a_checkpoint_a_rank_failed(tmp_path):
    store = CheckpointStore(str(tmp_path / "ck"), keep=1)
    _write(store, 4)
    w = CheckpointWriter(store)
    w.last_committed = store.load_latest().uri  # the coordinator's restore tells it
    ck = w.begin(4, "death", {"step": 4})  # rewrite at the same step
    ck.writers["ref0"] = ("w0", {"model.pt": "model"})
    ck.writers["ref1"] = ("w1", {"sync-rank1.pt": "sync"})
    ck.deliver("ref0", {"model.pt": {"sha256": "0" * 64, "bytes": 1}})
    ck.fail("w1", "ActorDiedError: the worker died")
    assert ck.pending == []
    done = w.advance()
    assert done == [ck] and "w1: ActorDiedError" in ck.error and "step-00000004 stays" in w.failure(ck)
    assert store.load_latest().uri.endswith("step-00000004")  # never committed; the previous one stays
    ck2 = w.begin(5, "periodic", {"step": 5})
    ck2.writers["ref"] = ("w0", {"model.pt": "model"})
    ck2.deliver("ref", {"model.pt": {"sha256": "0" * 64, "bytes": 1}, "extra.pt": {"sha256": "0" * 64, "bytes": 1}})
    assert "reported files" in ck2.error  # a writer must report exactly the files it was asked for


def test_cut_short_sync_file_in_the_latest_is_skipped(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ck"), keep=3)
    for step in (1, 2):
        store.write(step, {"step": step}, {"model.pt": to_bytes({"w": torch.ones(2)}),
                                           "sync-rank1.pt": to_bytes({"m": torch.ones(100)})})
    f = tmp_path / "ck" / "step-00000002" / "sync-rank1.pt"
    f.write_bytes(f.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING):
        assert store.load_latest().step == 1
    assert "step-00000002/sync-rank1.pt: checksum mismatch" in caplog.text


def test_pinned_buffers_are_reused_up_to_what_one_snapshot_used():
    from elastic.checkpoint import PinnedPool

    pool = PinnedPool()
    a, b, c = torch.zeros(4), torch.zeros(4), torch.zeros(2, 2)
    pool.give_back([a, b, c])  # what one snapshot used: two of shape (4,), one of (2, 2)
    assert {id(pool.take(torch.Size([4]), torch.float32)) for _ in range(2)} == {id(a), id(b)}
    assert pool.take(torch.Size([2, 2]), torch.float32) is c
    pool.give_back([a, b, c])
    pool.give_back([torch.zeros(2, 2)])  # an extra buffer from a second snapshot in flight is not kept
    assert pool.pooled_bytes() == (4 + 4 + 4) * 4


class _HangingStore(CheckpointStore):
    """A store whose first commit once `armed` hangs until `thaw` is set (a frozen endpoint)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.armed, self.thaw, self.hung = False, threading.Event(), threading.Event()

    def commit(self, step, version, meta, records, prune=True, abandoned=None):
        if self.armed and not self.hung.is_set():
            self.hung.set()
            self.thaw.wait(60)
        return super().commit(step, version, meta, records, prune=prune, abandoned=abandoned)


def test_a_commit_that_hangs_fails_after_the_timeout_and_the_next_commits_on_a_fresh_thread(tmp_path):
    store = _HangingStore(str(tmp_path / "ck"), keep=5)
    _write(store, 4)
    store.armed = True
    w = CheckpointWriter(store, timeout_s=0.3)
    stuck = w.begin(8, "periodic", {"step": 8})
    stuck.writers["ref"] = ("w0", {"model.pt": "model"})
    stuck.deliver("ref", {"model.pt": write_file(store.fs, f"{tmp_path}/ck/step-00000008/model.pt", b"x")})
    assert w.advance() == [] and store.hung.wait(10)
    time.sleep(0.4)
    done = w.advance()
    assert done == [stuck] and "took longer than 0s" in stuck.error and w.in_flight == []
    nxt = w.begin(9, "membership", {"step": 9})  # the stuck thread still holds the first commit
    nxt.writers["ref"] = ("w0", {"model.pt": "model"})
    nxt.deliver("ref", {"model.pt": write_file(store.fs, f"{tmp_path}/ck/step-00000009/model.pt", b"y")})
    assert w.advance(wait_s=10) == [nxt] and nxt.error is None and store.load_latest().step == 9
    store.thaw.set()  # the store answers again: the abandoned checkpoint still gets no COMMIT
    time.sleep(0.5)
    assert store.steps() == [4, 9]
