"""Reading the next step's documents ahead (`train.prefetch`) through a worker: a hit skips the read, a miss
or a failed background read changes nothing but the time, and the trained result is the same either way.
What the read-ahead reads, and a child process that dies, are `datasets.StepLoader`'s (tests/datasets)."""
import inspect
import threading

from datasets import DataPlan, discover
from elastic.config import load_config
from elastic.fingerprint import params_fingerprint
from elastic.worker import WorkerReplica
from compression.communicator import ThreadCommunicator
from elastic.messages import StepCall


def _replica(cfg, shards):
    rep = WorkerReplica(cfg, "w0", shards, 0)
    rep.join_local(ThreadCommunicator.group(1)[0])
    reads = []
    inner = rep.data.reader.read_batch

    def counted(ranges):  # who read which ranges (the real reader does the reading): a read-ahead, or the step
        # itself (on the read-ahead thread too, to bound it by data.read_timeout_s, but waited for by the step)
        ahead = any(f.function == "read_and_pack" for f in inspect.stack(0))
        reads.append(("read-ahead" if ahead else threading.main_thread().name, tuple(ranges)))
        return inner(ranges)

    rep.data.reader.read_batch = counted
    return rep, reads


def _train(cfg, shards, hints):
    """Three steps; `hints(plan, step)` gives the prefetch ranges sent with each step."""
    rep, reads = _replica(cfg, shards)
    plan = DataPlan(shards, seed=0)
    reports = []
    for step in range(3):
        ranges = plan.assign(step, {0: 600})[0]
        reports.append(rep.step(StepCall(step, ranges, 1e-3, commit_first=step - 1 if step else None,
                                         prefetch=hints(plan, step))))
        assert reports[-1].ok, reports[-1]
        if step:  # the fingerprint read after the fwd/bwd is that of the committed parameters
            assert reports[-1].fingerprint == rep.fingerprint()
        plan.commit(step)
    rep.commit(2)
    rep.data.close()
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


def test_read_ahead_in_a_child_process_trains_the_same():
    """`train.prefetch_in=process` (the default on CUDA): the child reads and packs, the trainer only takes
    the result."""
    base = ["sync.name=demo", "train.seq_len=64", "data.tokenizer=bytes", "model.n_layer=1"]
    cfg = load_config("tiny", base + ["train.prefetch_in=process"])
    d = cfg.data
    shards = discover(d.source, d.storage_options, text_column=d.text_column)
    plain = _train(load_config("tiny", base), shards, lambda plan, step: None)
    hit = _train(cfg, shards, lambda plan, step: plan.peek({0: 600})[0])
    assert plain[:2] == hit[:2]
    main = threading.current_thread().name
    assert [who == main for who, _ in hit[2]] == [True]  # step 0 only: steps 1 and 2 came from the child
