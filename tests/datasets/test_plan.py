"""The data plan's promises, checked against an independent record of what each step delivered."""
import base64
import collections
import json
import random
import zlib

import pytest

from datasets.plan import DataPlan, DocRange, PlanError, PlanStateMismatch, ShardInfo


def make_shards(layout=((100, 100, 37), (250,), (1000, 3), (64, 64, 64, 64))):
    shards = []
    for i, rgs in enumerate(layout):
        shards.append(ShardInfo(path=f"s3://b/data/000_{i:05d}.parquet", size=12345 + i, row_group_rows=tuple(rgs),
                                schema_names=("text", "id"), row_group_tokens=tuple(n * (300 + 100 * i) for n in rgs)))
    return shards


class Ledger:
    """What the trainer saw: rows of committed steps, counted independently of the plan's own record."""

    def __init__(self):
        self.count = collections.Counter()

    def add(self, ranges):
        for r in ranges:
            for row in range(r.start, r.stop):
                self.count[(r.shard, r.row_group, row)] += 1


def all_rows(shards):
    return {(s, g, row) for s, sh in enumerate(shards) for g, n in enumerate(sh.row_group_rows) for row in range(n)}


def run_until_epoch_done(plan, step, shares, ledger, epoch=0):
    while True:
        acc = plan.accounting(epoch)
        if acc["remaining"] == 0 and acc["in_flight"] == 0 and acc["returned"] == 0:
            return step
        a = plan.assign(step, shares)
        plan.commit(step)
        for ranges in a.values():
            ledger.add(ranges)
        step += 1


def test_worker_killed_mid_step_loses_no_documents_across_world_sizes_2_3_1():
    shards = make_shards()
    plan = DataPlan(shards, seed=7)
    ledger = Ledger()
    rng = random.Random(0)
    step = 0
    for world in (2, 3, 1):
        shares = {r: rng.choice([2000, 5000, 12000]) for r in range(world)}
        for _ in range(5):
            a = plan.assign(step, shares)
            plan.commit(step)
            for ranges in a.values():
                ledger.add(ranges)
            step += 1
        plan.assign(step, shares)       # one worker dies mid-batch: the whole step is aborted
        plan.abort(step)
    step = run_until_epoch_done(plan, step, {0: 7000}, ledger)
    epoch0 = {k: v for k, v in ledger.count.items()}
    assert set(epoch0) >= all_rows(shards)
    acc = plan.accounting(0)
    assert acc["documents"] == len(all_rows(shards))
    assert acc["delivered_once"] == acc["documents"]
    assert acc["duplicated"] == 0 and acc["skipped"] == 0 and acc["in_flight"] == 0
    # the independent ledger agrees: rows of epoch 0 were each delivered once (epoch 1 may have started)
    assert plan.epoch in (0, 1)
    if plan.epoch == 0:
        assert all(v == 1 for v in epoch0.values())


def test_random_deaths_and_resizes_keep_exactly_once():
    shards = make_shards()
    for seed in range(5):
        plan = DataPlan(shards, seed=seed)
        rng = random.Random(seed)
        ledger = Ledger()
        step = 0
        while plan.epoch == 0:
            world = rng.randint(1, 5)
            shares = {r: rng.randint(200, 20000) for r in rng.sample(range(8), world)}
            a = plan.assign(step, shares)
            if rng.random() < 0.3:
                plan.abort(step)
            else:
                plan.commit(step)
                for rk, ranges in a.items():
                    ledger.add(ranges)
                step += 1
        # finish epoch 0's in-flight/returned ranges (they may be served after the rollover)
        run_until_epoch_done(plan, step, {0: 5000}, ledger)
        acc = plan.accounting(0)
        assert acc == {**acc, "delivered_once": acc["documents"], "duplicated": 0, "skipped": 0}
        assert all_rows(shards) <= set(ledger.count)


def test_uneven_shares_size_ranges_by_tokens_and_everyone_gets_a_document():
    shards = [ShardInfo("a.parquet", 1, (1000,), ("text",), (1000 * 500,))]   # 500 tokens per document
    plan = DataPlan(shards, seed=1)
    a = plan.assign(0, {0: 5000, 1: 15000, 2: 1})
    rows = {r: sum(len(x) for x in v) for r, v in a.items()}
    assert rows == {0: 10, 1: 30, 2: 1}


def test_same_seed_same_order_other_seed_other_order():
    shards = make_shards()
    shares = {0: 3000, 1: 9000}
    a1 = [DataPlan(shards, seed=3).assign(0, shares)]
    a2 = [DataPlan(shards, seed=3).assign(0, shares)]
    assert a1 == a2
    orders = {tuple(DataPlan(shards, seed=s).epoch_order(0)) for s in range(6)}
    assert len(orders) > 1
    p = DataPlan(shards, seed=3)
    assert p.epoch_order(0) != p.epoch_order(1)      # a new epoch has a new order


def test_rows_stream_in_order_within_a_row_group():
    shards = make_shards()
    plan = DataPlan(shards, seed=2)
    seen = collections.defaultdict(list)
    step = 0
    while True:
        a = plan.assign(step, {0: 4000})
        plan.commit(step)
        step += 1
        if plan.epoch != 0:          # this step reached into epoch 1: stop before it
            break
        for ranges in a.values():
            for r in ranges:
                seen[(r.shard, r.row_group)].append((r.start, r.stop))
    for spans in seen.values():
        assert spans == sorted(spans)


def test_state_dict_round_trip_mid_run_gives_identical_continuation():
    shards = make_shards()
    a, ref = DataPlan(shards, seed=11), DataPlan(shards, seed=11)
    shares = {0: 4000, 1: 6000}
    for step in range(6):
        for p in (a, ref):
            p.assign(step, shares)
        if step == 3:
            a.abort(step), ref.abort(step)
        else:
            a.commit(step), ref.commit(step)
    a.assign(6, shares)                   # pending when the checkpoint is taken: saved as aborted
    ref.assign(6, shares)
    ref.abort(6)
    sd = json.loads(json.dumps(a.state_dict()))
    b = DataPlan(shards, seed=11)
    b.load_state_dict(sd)
    assert b.accounting() == ref.accounting()
    for step in range(6, 40):
        shares = {0: 3000, 1: 5000, 2: 8000}
        assert b.assign(step, shares) == ref.assign(step, shares)
        b.commit(step), ref.commit(step)
    assert b.state_dict() == ref.state_dict()


def test_resume_on_a_changed_dataset_is_refused_with_a_clear_error():
    shards = make_shards()
    sd = DataPlan(shards, seed=1).state_dict()
    changed = shards[:-1] + [ShardInfo(shards[-1].path, shards[-1].size, (64, 64, 64, 65), ("text",), (1, 1, 1, 1))]
    with pytest.raises(PlanStateMismatch, match="different dataset"):
        DataPlan(changed, seed=1).load_state_dict(sd)
    with pytest.raises(PlanStateMismatch, match="data.seed"):
        DataPlan(shards, seed=2).load_state_dict(sd)


def test_duplicates_would_be_detected_not_assumed_absent():
    shards = make_shards()
    plan = DataPlan(shards, seed=1)
    plan.assign(0, {0: 50000})
    plan.commit(0)
    sd = plan.state_dict()
    sd["cursor"] = [0, 0]                 # a buggy resume that rewinds the cursor
    plan.load_state_dict(sd)
    plan.assign(1, {0: 50000})
    plan.commit(1)
    assert plan.accounting()["duplicated"] > 0


def test_skips_would_be_detected():
    shards = make_shards()
    plan = DataPlan(shards, seed=1)
    plan.assign(0, {0: 50000})
    plan.abort(0)
    sd = plan.state_dict()
    sd["returned"] = []                   # a buggy checkpoint that forgets the aborted step
    plan.load_state_dict(sd)
    assert plan.accounting()["skipped"] > 0


def test_epoch_rollover_starts_a_new_order_and_closes_the_old_epoch():
    shards = make_shards(((10, 10), (10,)))
    plan = DataPlan(shards, seed=5)
    step = 0
    while plan.epoch < 2:
        plan.assign(step, {0: 2000, 1: 3000})
        plan.commit(step)
        step += 1
    acc0 = plan.accounting(0)
    assert acc0["delivered_once"] == 30 and acc0["duplicated"] == 0 and acc0["skipped"] == 0
    assert plan.accounting(1)["delivered_once"] == 30


def test_aborted_ranges_drawn_before_rollover_count_for_their_epoch():
    shards = make_shards(((10,),))
    plan = DataPlan(shards, seed=5)
    plan.assign(0, {0: 300 * 4})        # 4 docs of epoch 0 in flight
    plan.assign(1, {0: 300 * 6})        # the other 6
    plan.assign(2, {0: 300 * 3})        # rolls over: 3 docs of epoch 1
    plan.commit(2)
    plan.abort(0)
    plan.commit(1)
    a = plan.assign(3, {0: 300 * 4})[0]
    assert sum(len(r) for r in a) == 4
    plan.commit(3)
    assert plan.accounting(0)["delivered_once"] == 10 and plan.accounting(0)["duplicated"] == 0
    assert plan.accounting(1)["delivered_once"] == 3


def test_steps_may_be_assigned_ahead_and_commit_out_of_order_up_to_max_pending():
    plan = DataPlan(make_shards(), seed=1, max_pending=2)
    plan.assign(0, {0: 1000})
    plan.assign(1, {0: 1000})
    with pytest.raises(PlanError, match="pending"):
        plan.assign(2, {0: 1000})
    plan.commit(1)
    plan.commit(0)
    with pytest.raises(PlanError, match="not pending"):
        plan.commit(0)
    with pytest.raises(PlanError, match="> 0 tokens"):
        plan.assign(2, {0: 0})


def test_filtered_and_unusable_are_not_counted_as_delivered():
    plan = DataPlan(make_shards(), seed=1)
    a = plan.assign(0, {0: 10000})
    n = sum(len(r) for r in a[0])
    r0 = a[0][0]
    with pytest.raises(PlanError, match="not part of this step"):
        plan.commit(0, dropped=[(DocRange(r0.shard, r0.row_group, r0.stop, r0.stop + 1), "filtered")])
    plan.commit(0, dropped=[(DocRange(r0.shard, r0.row_group, r0.start, r0.start + 2), "filtered"),
                            [r0.shard, r0.row_group, r0.start + 2, r0.start + 3, "unusable"]])
    acc = plan.accounting()
    assert acc["filtered"] == 2 and acc["unusable"] == 1 and acc["delivered_once"] == n - 3


def test_doc_range_is_frozen():
    r = DocRange(0, 1, 2, 5)
    assert len(r) == 3
    with pytest.raises(Exception):
        r.start = 0


def test_aborted_step_is_served_first_and_resplit_over_the_survivors():
    plan = DataPlan(make_shards(), seed=4)
    dead = plan.assign(0, {0: 3000, 1: 3000, 2: 3000})
    returned = plan.abort(0)
    assert returned == [r for rank in (0, 1, 2) for r in dead[rank]]
    again = plan.assign(0, {5: 100000})            # one survivor, a big share: it takes all of them first
    got = again[5]
    rows = [(r.shard, r.row_group, row) for r in got for row in range(r.start, r.stop)]
    want = [(r.shard, r.row_group, row) for r in returned for row in range(r.start, r.stop)]
    assert rows[:len(want)] == want
    plan.commit(0)
    assert plan.accounting()["duplicated"] == 0 and plan.accounting()["returned"] == 0


def _as_version_1(sd, shards):
    """The state a version-1 plan wrote: every delivered row group spelled out as spans, no bitmap."""
    v1 = json.loads(json.dumps(sd))
    v1["version"] = 1
    for rec in v1["records"].values():
        full = zlib.decompress(base64.b64decode(rec.pop("full")))
        rec.pop("full_rows")
        i = 0
        for s, sh in enumerate(shards):
            for g, n in enumerate(sh.row_group_rows):
                if full[i >> 3] >> (i & 7) & 1:
                    rec["delivered"][f"{s}:{g}"] = [[0, n]]
                i += 1
    return v1


def test_whole_row_groups_are_bits_and_version_1_states_still_load():
    shards = make_shards()
    plan = DataPlan(shards, seed=3)
    for step in range(5):
        plan.assign(step, {0: 20000, 1: 20000})
        plan.commit(step)
    sd = json.loads(json.dumps(plan.state_dict()))
    rec = sd["records"]["0"]
    assert rec["full_rows"] > 0
    for key, spans in rec["delivered"].items():  # only row groups delivered in part are spelled out
        s, g = map(int, key.split(":"))
        assert spans != [[0, shards[s].row_group_rows[g]]], key
    old = DataPlan(shards, seed=3)
    old.load_state_dict(_as_version_1(sd, shards))
    assert old.accounting() == plan.accounting()
    assert old.state_dict() == plan.state_dict()


def test_state_stays_small_over_an_epoch_of_many_row_groups():
    shards = make_shards(tuple((100,) * 40 for _ in range(500)))  # 20,000 row groups, 2M documents
    plan = DataPlan(shards, seed=4)
    sizes, step = [], 0
    while plan.epoch == 0:
        plan.assign(step, {0: 3_000_000, 1: 3_000_000, 2: 3_000_000})
        if step % 7 == 3:
            plan.abort(step)  # partial row groups come back and are re-split
        else:
            plan.commit(step)
        sizes.append(len(json.dumps(plan.state_dict())))
        step += 1
    acc = plan.accounting(0)
    assert acc["delivered_once"] == plan.documents and acc["duplicated"] == 0 and acc["skipped"] == 0
    assert max(sizes) < 20_000, max(sizes)  # spelled out per row group (version 1): 431 kB


def test_peek_predicts_the_next_assign_and_changes_nothing():
    """`peek` (the prefetch hint) equals the next `assign` with the same shares when nothing aborts in
    between, leaves the state untouched (across a rollover and with ranges on the returned queue), and is
    simply wrong, not harmful, after an abort."""
    shards = make_shards(((10, 10), (10,)))
    plan = DataPlan(shards, seed=3)
    shares = {0: 2000, 1: 2500}
    step = 0
    while plan.epoch < 2:
        before = json.dumps(plan.state_dict(), sort_keys=True)
        hint = plan.peek(shares)
        assert json.dumps(plan.state_dict(), sort_keys=True) == before
        got = plan.assign(step, shares)
        assert got == hint, step
        if step == 3:                     # an aborted step: its ranges come back first, peek sees them
            plan.abort(step)
            hint = plan.peek(shares)
            assert plan.assign(step, shares) == hint
        plan.commit(step)
        step += 1
    acc = plan.accounting(0)
    assert acc["delivered_once"] == 30 and acc["duplicated"] == 0 and acc["skipped"] == 0


def test_resplit_moves_rows_between_ranks_and_keeps_exactly_once():
    from datasets.split import row_runs

    shards = make_shards(((10, 10), (10,)))
    plan = DataPlan(shards, seed=3)
    step, seen_ambiguous = 0, []
    while plan.epoch < 2:
        a = plan.assign(step, {0: 2000, 1: 2500})
        rows = [DocRange(r.shard, r.row_group, x, x + 1) for k in sorted(a) for r in a[k] for x in range(r.start, r.stop)]
        ambiguous = len(set(rows)) < len(rows)  # a row of both epochs in one step (rollover, tiny data)
        if len(rows) >= 2:
            cut = 1 + step % (len(rows) - 1)
            assert plan.resplit(step, {0: row_runs(rows[:cut]), 1: row_runs(rows[cut:])}) is not ambiguous
            seen_ambiguous.append(ambiguous)
        if step == 1:
            with pytest.raises(PlanError, match="not a row set"):
                plan.resplit(step, {0: [DocRange(0, 0, 0, 10)], 1: []})
            with pytest.raises(PlanError, match="given to nobody"):
                plan.resplit(step, {0: row_runs(rows[:1])})
            plan.abort(step)            # the resplit ranges come back, all of them
        else:
            plan.commit(step)
        step += 1
    acc = plan.accounting(0)
    assert acc["delivered_once"] == 30 and acc["duplicated"] == 0 and acc["skipped"] == 0
    assert True in seen_ambiguous and False in seen_ambiguous
