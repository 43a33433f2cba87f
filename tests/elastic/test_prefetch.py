"""Reading the next step's documents ahead (`train.prefetch`): a hit skips the read, a partial hit reads only
the rest, a miss or a failed background read changes nothing but the time, and the trained result is the
same either way."""
import inspect
import os
import signal
import threading

from datasets import DataPlan, discover
from elastic.config import load_config
from elastic.fingerprint import params_fingerprint
from elastic.worker import WorkerReplica
from compression import build_sync
from compression.communicator import ThreadCommunicator
from elastic.messages import StepCall


def _replica(cfg, shards):
    rep = WorkerReplica(cfg, "w0", shards, 0)
    comm = ThreadCommunicator.group(1)[0]
    rep.sync, rep.comm, rep.rank, rep.world_size = build_sync(cfg.sync, rep.params, comm), comm, 0, 1
    reads = []
    inner = rep.reader.read_batch

    def counted(ranges):  # who read which ranges (the real reader does the reading): a read-ahead, or the step
        # itself (on the read-ahead thread too, to bound it by data.read_timeout_s, but waited for by the step)
        ahead = any(f.function == "read_and_pack" for f in inspect.stack(0))
        reads.append(("read-ahead" if ahead else threading.main_thread().name, tuple(ranges)))
        return inner(ranges)

    rep.reader.read_batch = counted
    return rep, reads


def _train(cfg, shards, hints, before_step=None):
    """Three steps; `hints(plan, step)` gives the prefetch ranges sent with each step."""
    rep, reads = _replica(cfg, shards)
    plan = DataPlan(shards, seed=0)
    reports = []
    for step in range(3):
        if before_step:
            before_step(rep, step)
        ranges = plan.assign(step, {0: 600})[0]
        reports.append(rep.step(StepCall(step, ranges, 1e-3, commit_first=step - 1 if step else None,
                                         prefetch=hints(plan, step))))
        assert reports[-1].ok, reports[-1]
        if step:  # the fingerprint read after the fwd/bwd is that of the committed parameters
            assert reports[-1].fingerprint == rep.fingerprint()
        plan.commit(step)
    rep.commit(2)
    return params_fingerprint(rep.params), [(r.tokens, r.loss) for r in reports], reads


def test_prefetch_hit_miss_and_failure_train_the_same():
    cfg = load_config("tiny", ["sync.name=demo", "train.seq_len=64", "data.tokenizer=bytes", "model.n_layer=1"])
    d = cfg.data
    shards = discover(d.source, d.storage_options, text_column=d.text_column)
    plain = _train(cfg, shards, lambda plan, step: None)
    hit = _train(cfg, shards, lambda plan, step: plan.peek({0: 600})[0])
    bad = [type(r)(r.shard, r.row_group, 0, 10**9) for r in plan_ranges(shards)]  # past the row group's end
    failed = _train(cfg, shards, lambda plan, step: bad)
    wider = _train(cfg, shards, lambda plan, step: plan.peek({0: 5000})[0])  # a superset of the next ranges
    other = DataPlan(shards, seed=99)  # another order: other documents
    miss = _train(cfg, shards, lambda plan, step: other.peek({0: 600})[0])
    assert plain[:2] == hit[:2] == failed[:2] == wider[:2] == miss[:2]
    main = threading.current_thread().name
    # a hit: steps 1 and 2 come from the background read only
    assert [who == main for who, _ in hit[2]] == [True, False, False, False]
    assert all(who == main for who, _ in plain[2]) and len(plain[2]) == 3
    # a failed or wrong background read: the step reads its documents itself
    assert [who == main for who, _ in failed[2]] == [True, False, True, False, True, False]
    assert sum(who == main for who, _ in miss[2]) == 3
    assert sum(who == main for who, _ in wider[2]) == 1  # the next ranges come out of the wider read


def plan_ranges(shards):
    return DataPlan(shards, seed=0).peek({0: 600})[0]


def test_a_rebalanced_split_reads_only_the_moved_documents():
    """When the coordinator moves documents between ranks (`_balance`), a worker takes what it read ahead
    and reads only the rows it did not: the batch equals a plain read of the new ranges."""
    from datasets.plan import row_runs

    cfg = load_config("tiny", ["sync.name=demo", "train.seq_len=64", "data.tokenizer=bytes", "model.n_layer=1"])
    d = cfg.data
    shards = discover(d.source, d.storage_options, text_column=d.text_column)
    rep, reads = _replica(cfg, shards)
    plan = DataPlan(shards, seed=0)
    hint = plan.peek({0: 3000, 1: 3000})
    rep._read_ahead(hint[0])
    rows = [type(r)(r.shard, r.row_group, x, x + 1) for k in (0, 1) for r in hint[k] for x in range(r.start, r.stop)]
    n0 = sum(len(r) for r in hint[0])
    moved = row_runs(rows[:n0 + 2])                 # rank 0 takes two of rank 1's documents
    got, packed = rep._read(moved)
    plain = rep.reader.read_batch(moved)
    assert got.docs == plain.docs and got.dropped == plain.dropped
    assert packed is None  # packed in the background only for an exact hit
    main = threading.current_thread().name
    assert [(who == main, sum(len(r) for r in rs)) for who, rs in reads[:2]] == [(False, n0), (True, 2)]


def _kill_child(rep, step):
    if step == 1:  # the child read step 1's documents; it is gone before step 2's read-ahead
        pool = rep._ahead_process._pool
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGKILL)


def test_read_ahead_in_a_child_process_trains_the_same_and_survives_its_death():
    """`train.prefetch_in=process` (the default on CUDA): the child reads and packs, the trainer only takes
    the result; a child that dies costs the read, and the next read-ahead starts a new child."""
    base = ["sync.name=demo", "train.seq_len=64", "data.tokenizer=bytes", "model.n_layer=1"]
    cfg = load_config("tiny", base + ["train.prefetch_in=process"])
    d = cfg.data
    shards = discover(d.source, d.storage_options, text_column=d.text_column)
    plain = _train(load_config("tiny", base), shards, lambda plan, step: None)
    hit = _train(cfg, shards, lambda plan, step: plan.peek({0: 600})[0])
    killed = _train(cfg, shards, lambda plan, step: plan.peek({0: 600})[0], before_step=_kill_child)
    assert plain[:2] == hit[:2] == killed[:2]
    main = threading.current_thread().name
    assert [who == main for who, _ in hit[2]] == [True]  # step 0 only: steps 1 and 2 came from the child
    # step 2's documents were read in this process after the child died (by the thread the read-ahead falls
    # back to, or by the step itself when the child died with the read in flight)
    assert len(killed[2]) == 2 and killed[2][0][0] == main


def test_a_re_split_within_the_read_margin_reads_nothing_on_the_step():
    """With the neighbours' rows next to its own read ahead too (`read_margin`), a worker handed two of rank
    1's documents by a re-split has them already: the step reads nothing, in the thread or in the child."""
    from datasets.plan import read_margin, row_runs

    for where in ("thread", "process"):
        cfg = load_config("tiny", ["sync.name=demo", "train.seq_len=64", "data.tokenizer=bytes", "model.n_layer=1",
                                   f"train.prefetch_in={where}"])
        d = cfg.data
        shards = discover(d.source, d.storage_options, text_column=d.text_column)
        rep, reads = _replica(cfg, shards)
        hint = DataPlan(shards, seed=0).peek({0: 3000, 1: 3000})
        margin = read_margin(hint, 4)
        rep._read_ahead(hint[0], margin[0])
        rows = [type(r)(r.shard, r.row_group, x, x + 1) for k in (0, 1) for r in hint[k] for x in range(r.start, r.stop)]
        n0 = sum(len(r) for r in hint[0])
        moved = row_runs(rows[:n0 + 2])
        got, packed = rep._read(moved)
        plain = rep.reader.read_batch(moved)
        assert [list(d) for d in got.docs] == plain.docs and got.dropped == plain.dropped, where
        main = threading.current_thread().name
        assert not [rs for who, rs in reads[:-1] if who == main], (where, reads)  # the last: `plain` above
        rep._ahead_process.close()
