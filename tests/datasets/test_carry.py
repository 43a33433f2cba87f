"""Carrying the tail of a step's last document into the next step (`StepLoader.load(carry=, cut=)`,
`DataPlan.commit(carry=)`): every target slot of every delivered document is trained exactly once, in order,
across the steps (the same stream as packing all of them at once), no step but the last ends in a padded row
where its last document can be cut, and the carry survives the plan's checkpoint. One process, the bundled
sample corpus, no Ray."""
import pytest

from datasets import Carry, DataConfig, DataPlan, DocRange, PlanError, StepLoader, WindowMismatch, discover

SEQ = 64


@pytest.fixture(scope="module")
def shards():
    return discover("sample")


def _steps(shards, n_steps, cut=True, share=300, restore_at=None):
    """Train n_steps with one rank: (the targets each step trained, in stream order; the steps' batches; the
    documents delivered, in order, as token lists). `restore_at`: at that step the plan and the loader are
    rebuilt from the plan's state (a resume from a checkpoint: the carried document is read again)."""
    plan = DataPlan(shards, seed=0)
    loader = StepLoader(shards, DataConfig(tokenizer="bytes"), SEQ)
    trained, batches, delivered = [], [], []
    try:
        for step in range(n_steps):
            if step == restore_at:
                state = plan.state_dict()
                plan = DataPlan(shards, seed=0)
                plan.load_state_dict(state)
                loader.close()
                loader = StepLoader(shards, DataConfig(tokenizer="bytes"), SEQ)
            ranges = plan.assign(step, {0: share})[0]
            carry = Carry.from_list(plan.carry) if plan.carry else None
            batch = loader.load(ranges, carry=carry, cut=cut and step < n_steps - 1)
            trained.append(batch.targets[batch.targets >= 0].tolist())
            batches.append(batch)
            delivered += [list(d) for d in loader.reader.read_batch(ranges).docs]
            plan.commit(step, batch.dropped, carry=batch.carry_out.to_list() if batch.carry_out else None)
    finally:
        loader.close()
    return trained, batches, delivered


def _stream(docs, eot):
    out = []
    for d in docs:
        out += d + [eot]
    return out


def test_every_slot_of_every_document_is_trained_once_in_order(shards):
    trained, batches, delivered = _steps(shards, 12)
    eot = StepLoader(shards, DataConfig(tokenizer="bytes"), SEQ).reader.eot
    assert [t for step in trained for t in step] == _stream(delivered, eot)
    assert sum(b.tokens for b in batches) == sum(b.doc_slots for b in batches)
    carried = [b for b in batches if b.carry_out is not None]
    assert len(carried) >= 6, "the sample's documents are long: most steps should end inside one"
    for b in carried:  # a step that carries its tail trains whole rows only
        assert b.tokens == b.targets.numel()


def test_the_cut_trains_the_same_stream_with_fewer_padded_slots(shards):
    cut_trained, cut_batches, cut_docs = _steps(shards, 12, cut=True)
    plain_trained, plain_batches, plain_docs = _steps(shards, 12, cut=False)
    assert cut_docs == plain_docs  # the same documents, in the same steps
    assert [t for s in cut_trained for t in s] == [t for s in plain_trained for t in s]
    pad = lambda bs: sum(b.targets.numel() - b.tokens for b in bs)
    assert pad(cut_batches) < pad(plain_batches) / 3, (pad(cut_batches), pad(plain_batches))


def test_a_carry_survives_the_plans_checkpoint_and_is_read_again(shards):
    whole, _, docs = _steps(shards, 8)
    resumed, batches, docs_r = _steps(shards, 8, restore_at=4)
    assert batches[3].carry_out is not None, "pick a step that carries (the corpus changed?)"
    assert docs_r == docs and resumed == whole


def test_bad_carries_are_refused_with_what_is_wrong(shards):
    plan = DataPlan(shards, seed=0)
    ranges = plan.assign(0, {0: 300})[0]
    r = ranges[0]
    with pytest.raises(PlanError, match="carry"):
        plan.commit(0, carry=[r.shard, r.row_group, r.stop + 1000, 5])  # not a row of the step
    with pytest.raises(PlanError, match="carry"):
        plan.commit(0, carry=[r.shard, r.row_group, r.start, 0])  # nothing of it trained
    loader = StepLoader(shards, DataConfig(tokenizer="bytes"), SEQ)
    try:
        with pytest.raises(WindowMismatch, match="carried tail"):
            loader.load(ranges, carry=Carry(DocRange(r.shard, r.row_group, r.start, r.start + 1), 10 ** 9))
    finally:
        loader.close()
