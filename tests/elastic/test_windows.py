"""A step cut between ranks at token level (`train.split_docs`): each worker trains exactly its window of the
step's stream, the windows together train every target of the step once, and a window that does not fit the
documents fails the step instead of training anything twice."""
from datasets import DataPlan, DocRange, discover, pack, split_windows
from elastic.config import load_config

from .test_prefetch import _replica
from elastic.messages import StepCall


def _setup():
    cfg = load_config("tiny", ["sync.name=demo", "train.seq_len=64", "data.tokenizer=bytes", "model.n_layer=1"])
    d = cfg.data
    shards = discover(d.source, d.storage_options, text_column=d.text_column)
    return cfg, shards


def test_windows_train_each_target_of_the_step_once():
    cfg, shards = _setup()
    plan = DataPlan(shards, seed=0)
    a = plan.assign(0, {0: 900, 1: 300})
    rep, _ = _replica(cfg, shards)
    rows = [DocRange(r.shard, r.row_group, x, x + 1) for k in sorted(a) for r in a[k] for x in range(r.start, r.stop)]
    batch = rep.data.reader.read_batch(rows)
    tokens = {(o.shard, o.row_group, o.start): len(doc) for o, doc in zip(batch.origins, batch.docs)}
    counts = [(r, tokens.get((r.shard, r.row_group, r.start), 0)) for r in rows]
    wins = split_windows(counts, [1.0, 1.0], 64)
    assert wins is not None and wins[1].borrow is not None  # the byte tokenizer's long documents: a cut inside one
    whole = int((pack(batch.docs, 64, rep.tokenizer.eot)[1] >= 0).sum())
    got = []
    for rank, w in enumerate(wins):
        rep, _ = _replica(cfg, shards)
        report = rep.step(StepCall(0, list(w.owned), 1e-3, window=w.to_json()))
        assert report.ok, report
        got.append(report)
    assert sum(r.tokens for r in got) == whole
    assert all(r.tokens <= 64 * w.rows for r, w in zip(got, wins))
    # documents are counted by the rank that owns them, not by the one that borrows a part
    assert sum(r.docs for r in got) == len(batch.docs)


def test_a_window_cut_for_other_token_counts_fails_the_step_and_says_so():
    cfg, shards = _setup()
    plan = DataPlan(shards, seed=0)
    ranges = plan.assign(0, {0: 600})[0]
    rep, _ = _replica(cfg, shards)
    wrong = {"owned": [r.to_list() for r in ranges], "borrow": None, "skip": 0, "rows": 2, "slots": 7}
    report = rep.step(StepCall(0, ranges, 1e-3, window=wrong))
    assert not report.ok and report.window_mismatch and report.pre_exchange
    assert "cut for 7 target slots" in report.error
