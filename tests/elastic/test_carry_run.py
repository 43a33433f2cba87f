"""Carried tails through the whole stack (`train.carry_tail`): one worker's steps end on whole rows and the rest
of the last document starts the next step; every slot of every delivered document is trained once (summary
`tokens` == `document_slots` at the end) through a retry, a carry that does not fit (dropped, named), a group
that grows from the single worker, and (slow) a stop and resume, which equals the uninterrupted run bit for bit."""
import pytest
import torch

from elastic.checkpoint import CheckpointStore
from elastic.cli import train
from elastic.config import checkpoint_uri

from .conftest import small_config
from .test_field_faults import _assert_healthy

ONE = ("train.workers=1", "sync.name=demo")


def test_one_worker_pads_only_where_it_cannot_cut_and_trains_every_slot_once(tmp_path, ray_cluster):
    """A collective that fails at step 5 makes the step retry with the same carried tail. At step 8 the carried
    tail does not fit its document (chaos sends a skip past its end; in the field, a source changed under the
    run): every rank rejects the step with a window mismatch and the retry goes without the tail, so less
    than a row of one document goes untrained, and the run says so."""
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=carry-one", "train.steps=12", *ONE,
                       "chaos.comm_error_at=[5]", "chaos.window_mismatch_at=[8]")
    s = train(cfg)
    _assert_healthy(s, 12)
    events = " ".join(e["what"] for e in s["events"])
    assert "step-aborted collective_error" in events, events
    assert "step-aborted window_mismatch" in events and "carry-dropped" in events, events
    assert 0 < s["document_slots"] - s["tokens"] < 64, (s["document_slots"], s["tokens"])
    # whole documents would pad ~half a row per step (~400 slots here); cut, only the last step pads
    assert s["rows"] * 64 - s["tokens"] < 3 * 64, (s["rows"], s["tokens"])


def test_a_carry_is_trained_once_when_the_group_grows(tmp_path, ray_cluster):
    """One worker (its steps carry tails), then a second joins: the tail pending at the membership change goes
    through its checkpoint and is trained by rank 0 of the grown group, whose step is not cut at token level."""
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=carry-grow", "train.steps=60", "train.workers=1",
                       "sync.name=demo", "chaos.add_at=[3]", "train.max_workers=2",
                       "train.batch_tokens=8192", "data.max_doc_tokens=8192")  # steps long enough for the join
    s = train(cfg)
    _assert_healthy(s, 60)
    sizes = [w["world_size"] for w in s["world_size_history"]]
    assert sizes[0] == 1 and sizes[-1] == 2, sizes
    assert s["tokens"] == s["document_slots"], (s["tokens"], s["document_slots"])


def test_a_group_cuts_its_steps_windows_with_carried_tails(tmp_path, ray_cluster):
    """Two workers: each step's token-level windows start with the tail the last step left (rank 0 borrows it)
    and end on whole rows, leaving the rest of the last document to the next step. Only steps in whole
    documents (the first, before any token counts) pad; every slot is trained once."""
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=carry-group", "train.steps=12", "train.workers=2",
                       "sync.name=demo", "train.batch_tokens=2048")
    s = train(cfg)
    _assert_healthy(s, 12)
    assert s["split_steps"] >= 10, s["split_steps"]
    assert s["tokens"] == s["document_slots"], (s["tokens"], s["document_slots"])
    assert s["rows"] * 64 - s["tokens"] < 4 * 64, (s["rows"], s["tokens"])  # whole documents: ~2 x 32 per step


@pytest.mark.slow  # three runs (~23 s); the plan-state round trip of a carry runs in CI (tests/datasets/test_carry.py)
def test_stop_and_resume_with_a_pending_tail_equals_uninterrupted(tmp_path, ray_cluster):
    whole = small_config(tmp_path, ray_cluster.address, "run.name=c-whole", "train.steps=8", *ONE)
    a = train(whole)
    part = small_config(tmp_path, ray_cluster.address, "run.name=c-part", "train.steps=8", "train.stop_at=4", *ONE)
    stopped = train(part)
    assert stopped["state"] == "STOPPED" and stopped["steps"] == 4
    assert stopped["tokens"] < stopped["document_slots"], "step 3 left a tail: the stop should catch one pending"
    b = train(small_config(tmp_path, ray_cluster.address, "run.name=c-part", "train.steps=8", *ONE))
    assert b["tokens"] == b["document_slots"] == a["tokens"]
    ck_a = CheckpointStore(checkpoint_uri(whole)).load_latest()
    ck_b = CheckpointStore(checkpoint_uri(part)).load_latest()
    assert ck_a.step == ck_b.step == 8
    model_a, model_b = ck_a.tensor_file("model.pt"), ck_b.tensor_file("model.pt")
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k

