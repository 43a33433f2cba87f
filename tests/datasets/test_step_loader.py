"""`StepLoader`: a step's batch is the same however its documents arrive (read ahead in a thread or a child
process, in whole or in part after a re-split, or read by the step itself after the child died), and the step
reads on its own only what the read-ahead did not bring. One process, the bundled sample corpus, no Ray."""
import inspect
import os
import signal

import pytest
import torch

from datasets import DataConfig, DataPlan, DocRange, StepLoader, discover, pack, read_margin
from datasets.split import row_runs

SEQ = 64


@pytest.fixture(scope="module")
def shards():
    return discover("sample")


def _loader(shards, where="thread"):
    """A loader whose reader records who read which rows: the step itself (this thread), or the read-ahead
    (in `read_and_pack`; the child process reads with a reader of its own and records nothing here)."""
    loader = StepLoader(shards, DataConfig(tokenizer="bytes"), SEQ, read_ahead_in=where, name="t")
    reads, inner = [], loader.reader.read_batch

    def counted(ranges):
        ahead = any(f.function == "read_and_pack" for f in inspect.stack(0))
        reads.append(("ahead" if ahead else "step", sum(len(r) for r in ranges)))
        return inner(ranges)

    loader.reader.read_batch = counted
    return loader, reads


def _plain(shards, ranges):
    """What a step of `ranges` trains on, read by a reader of its own: (inputs, targets, documents, dropped)."""
    loader = StepLoader(shards, DataConfig(tokenizer="bytes"), SEQ)
    try:
        batch = loader.reader.read_batch(ranges)
        return (*pack(batch.docs, SEQ, loader.reader.eot), len(batch.docs), batch.dropped_json())
    finally:
        loader.close()


def _same(batch, plain):
    assert torch.equal(batch.inputs, plain[0]) and torch.equal(batch.targets, plain[1])
    assert (batch.tokens, batch.docs, batch.dropped) == (int((plain[1] >= 0).sum()), plain[2], plain[3])


def _moved(hint, extra):
    """Rank 0's hinted rows plus the first `extra` of rank 1's: what a re-split that moves them hands rank 0."""
    rows = [DocRange(r.shard, r.row_group, x, x + 1) for k in (0, 1) for r in hint[k] for x in range(r.start, r.stop)]
    return row_runs(rows[:sum(len(r) for r in hint[0]) + extra])


def test_a_rebalanced_split_reads_only_the_moved_documents(shards):
    plan = DataPlan(shards, seed=0)
    first = plan.assign(0, {0: 600})[0]
    hint = plan.peek({0: 3000, 1: 3000})
    loader, reads = _loader(shards)
    try:
        _same(loader.load(first, prefetch=hint[0]), _plain(shards, first))
        moved = _moved(hint, 2)                                    # rank 0 takes two of rank 1's documents
        _same(loader.load(moved), _plain(shards, moved))
    finally:
        loader.close()
    n0 = sum(len(r) for r in hint[0])
    assert reads == [("step", sum(len(r) for r in first)), ("ahead", n0), ("step", 2)]


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_re_split_within_the_read_margin_reads_nothing_on_the_step(shards, where):
    plan = DataPlan(shards, seed=0)
    first = plan.assign(0, {0: 600})[0]
    hint = plan.peek({0: 3000, 1: 3000})
    margin = read_margin(hint, 4)
    loader, reads = _loader(shards, where)
    try:
        loader.load(first, prefetch=hint[0], margin=margin[0])
        moved = _moved(hint, 2)
        _same(loader.load(moved), _plain(shards, moved))
    finally:
        loader.close()
    assert [who for who, _ in reads[1:]] == (["ahead"] if where == "thread" else [])  # the step read nothing


def test_ahead_tokens_count_every_row_read_ahead_margin_included(shards):
    plan = DataPlan(shards, seed=0)
    first = plan.assign(0, {0: 600})[0]
    hint = plan.peek({0: 3000, 1: 3000})
    margin = read_margin(hint, 4)
    loader, _ = _loader(shards)
    try:
        assert loader.ahead_tokens() is None                      # nothing read ahead yet
        loader.load(first, prefetch=hint[0], margin=margin[0])
        counts = loader.ahead_tokens()
        plain = loader.reader.read_batch(hint[0] + margin[0])
    finally:
        loader.close()
    rows = [(r.shard, r.row_group, x) for r in hint[0] + margin[0] for x in range(r.start, r.stop)]
    assert sorted(tuple(c[:3]) for c in counts) == sorted(rows)   # each row once
    want = {(o.shard, o.row_group, o.start): len(d) for o, d in zip(plain.origins, plain.docs)}
    assert {tuple(c[:3]): c[3] for c in counts} == {k: want.get(k, 0) for k in rows}


def test_a_child_that_dies_costs_one_read_and_the_next_read_ahead_starts_a_new_one(shards):
    plan = DataPlan(shards, seed=0)
    steps = []
    for s in range(4):
        steps.append(plan.assign(s, {0: 600})[0])
        plan.commit(s)
    loader, reads = _loader(shards, "process")
    try:
        _same(loader.load(steps[0], prefetch=steps[1]), _plain(shards, steps[0]))
        killed = loader.child_pid()
        assert killed is not None
        os.kill(killed, signal.SIGKILL)  # with step 1's read in flight or done
        for s in (1, 2):
            _same(loader.load(steps[s], prefetch=steps[s + 1]), _plain(shards, steps[s]))
        assert loader.child_pid() not in (None, killed)          # step 3 is read by a new child
        _same(loader.load(steps[3]), _plain(shards, steps[3]))
    finally:
        loader.close()
    # read in this process after the kill: step 1 by the step itself (the child died with it in flight), or
    # step 2 (the child had sent step 1; step 2's read-ahead found it dead), never both, never step 3
    assert len(reads) == 2 and reads[0] == ("step", sum(len(r) for r in steps[0])), reads
