"""Splitting one step between ranks (`datasets.split`): optimal whole-document cuts, re-splits only when the
slowest rank gains, and token-level windows that train every target of the step exactly once."""
import random

import pytest

from datasets.plan import DocRange


def test_balanced_split_is_optimal_against_brute_force():
    import itertools

    from datasets.split import balanced_split, split_cost

    rng = random.Random(4)
    for trial in range(600):
        n, W = rng.randint(1, 8), rng.randint(1, 4)
        docs = [(DocRange(0, 0, i, i + 1), rng.choice([0, 1, 5, 40, 63, 64, 65, 200, 700])) for i in range(n)]
        shares = [rng.choice([1000, 2000, 3000]) for _ in range(W)]
        cuts = balanced_split(docs, shares, 64)
        assert len(cuts) == W and cuts[-1] == n and cuts == sorted(cuts)
        if n >= W:
            assert all(b > a for a, b in zip([0] + cuts, cuts))  # everyone gets a row
            best = min(split_cost(docs, list(c) + [n], shares, 64)
                       for c in itertools.combinations(range(1, n), W - 1))
            assert split_cost(docs, cuts, shares, 64) == best, (docs, shares, cuts)


def test_rebalance_moves_documents_only_when_the_slowest_rank_gains():
    from datasets.split import rebalance

    a = {0: [DocRange(0, 0, 0, 3)], 1: [DocRange(0, 0, 3, 5)]}
    tokens = {(0, 0, 0): 600, (0, 0, 1): 600, (0, 0, 2): 600, (0, 0, 3): 100, (0, 0, 4): 100}
    new = rebalance(a, tokens, {0: 1000, 1: 1000}, 64)  # rank 0: 29 rows, rank 1: 4 -> move one document
    assert new == {0: [DocRange(0, 0, 0, 2)], 1: [DocRange(0, 0, 2, 5)]}
    even = {k: 200 for k in tokens}  # 3 vs 2 documents of 200: either way the slower rank packs 10 rows
    assert rebalance(a, even, {0: 1000, 1: 1000}, 64) is None  # no gain: no churn
    assert rebalance(a, {k: v for k, v in tokens.items() if k != (0, 0, 4)}, {0: 1, 1: 1}, 64) is None
    assert rebalance({0: a[0]}, tokens, {0: 1}, 64) is None


def test_read_margin_gives_each_rank_its_neighbours_nearest_rows():
    from datasets.split import read_margin

    hint = {0: [DocRange(0, 0, 0, 5)], 1: [DocRange(0, 0, 5, 7), DocRange(1, 0, 0, 4)], 2: [DocRange(1, 1, 0, 3)]}
    m = read_margin(hint, 3)
    assert m[0] == [DocRange(0, 0, 5, 7), DocRange(1, 0, 0, 1)]           # rank 1's first 3 rows
    assert m[1] == [DocRange(0, 0, 2, 5), DocRange(1, 1, 0, 3)]           # rank 0's last 3, rank 2's first 3
    assert m[2] == [DocRange(1, 0, 1, 4)]                                 # rank 1's last 3 rows
    assert read_margin(hint, 0) == {0: [], 1: [], 2: []}
    assert read_margin({0: hint[0]}, 3) == {0: []}


def test_split_windows_train_every_target_of_the_step_once_in_rows_proportional_to_shares():
    import torch

    from datasets.packing import pack
    from datasets.split import Window, packed_rows, row_shares, split_windows

    rng = random.Random(8)
    seq, seen_borrow, seen_long = 16, 0, 0
    for trial in range(400):
        n, W = rng.randint(1, 12), rng.randint(1, 4)
        lens = [rng.choice([0, 1, 3, 15, 16, 17, 40, 90]) for _ in range(n)]
        rows = [DocRange(trial % 3, 0, i, i + 1) for i in range(n)]
        text = {rows[i]: [1000 * i + j + 1 for j in range(t)] for i, t in enumerate(lens)}  # every token unique
        shares = [rng.choice([1.0, 2.0, 3.0]) for _ in range(W)]
        wins = split_windows(list(zip(rows, lens)), shares, seq)
        total = sum(t + 1 for t in lens if t)
        if total == 0 or packed_rows(total, seq) < W:
            assert wins is None
            continue
        assert [w.rows for w in wins] == row_shares(packed_rows(total, seq), shares)
        owned = [x for w in wins for r in w.owned for x in range(r.start, r.stop)]
        assert sorted(owned) == list(range(n))                       # each row owned by exactly one rank
        whole = pack([text[r] for r in rows if text[r]], seq, eot=0)
        parts = []
        for w in wins:
            assert Window.from_json(w.to_json()) == w
            docs = [text[one] for r in w.reads() for one in
                    (DocRange(r.shard, r.row_group, x, x + 1) for x in range(r.start, r.stop)) if text[one]]
            assert w.borrow is None or w.borrow.start not in [x for r in w.owned for x in range(r.start, r.stop)]
            seen_borrow += w.borrow is not None
            seen_long += w.borrow is not None and not any(lens[x] for r in w.owned for x in range(r.start, r.stop))
            parts.append(pack(docs, seq, 0, skip=w.skip, rows=w.rows, expect_slots=w.slots))
        assert torch.equal(torch.cat([x for x, _ in parts]), whole[0])   # the step's stream, cut, nothing else
        assert torch.equal(torch.cat([y for _, y in parts]), whole[1])
    assert seen_borrow > 100 and seen_long > 10  # cuts inside documents, and documents longer than a window


def test_row_shares_minimise_the_slowest_rank():
    from datasets.split import row_shares

    assert row_shares(10, [1, 1]) == [5, 5] and row_shares(11, [1, 1]) == [6, 5]
    assert row_shares(12, [1, 2, 3]) == [2, 4, 6] and row_shares(3, [1, 100, 1]) == [1, 1, 1]
    assert row_shares(2, [1, 1, 1]) is None and row_shares(4, []) is None


def test_windows_for_cuts_a_step_assignment_only_with_every_count_known():
    from datasets.split import split_windows, windows_for

    a = {0: [DocRange(0, 0, 0, 3)], 1: [DocRange(0, 0, 3, 5)]}
    tokens = {(0, 0, 0): 600, (0, 0, 1): 600, (0, 0, 2): 600, (0, 0, 3): 100, (0, 0, 4): 100}
    got, carry = windows_for(a, tokens, {0: 1.0, 1: 1.0}, 64)
    want = split_windows([(DocRange(0, 0, x, x + 1), tokens[(0, 0, x)]) for x in range(5)], [1.0, 1.0], 64)
    assert got == {0: want[0], 1: want[1]} and got[0].rows == got[1].rows == 16  # 2,005 slots: 32 rows
    assert got[1].borrow == DocRange(0, 0, 1, 2) and carry is None  # the cut falls inside the second document
    # cut: 2,005 slots = 31 rows + 21 slots, all inside the last document (101 slots): 31 rows, 80 trained
    got, carry = windows_for(a, tokens, {0: 1.0, 1: 1.0}, 64, cut=True)
    assert got[0].rows + got[1].rows == 31 and (carry.doc, carry.skip, carry.slots) == (DocRange(0, 0, 4, 5), 80, 101)
    assert windows_for(a, {k: v for k, v in tokens.items() if k != (0, 0, 4)}, {0: 1, 1: 1}, 64) is None
    assert windows_for({0: a[0]}, tokens, {0: 1}, 64) is None


def test_cut_step_with_a_carried_tail_and_a_cut_trains_the_stream_once_and_leaves_the_rest_as_the_next_carry():
    """`cut_step` over random steps, chained: each step's windows start with the tail the previous one left
    (rank 0 borrows it) and, cut, stop after their last full row where that row would hold only the last
    document's tail. Over the chain, the windows' targets are exactly the stream of every document once, in
    order; each window is whole rows; only the steps that could not cut pad."""
    from datasets.packing import pack
    from datasets.split import Carry, cut_step

    rng = random.Random(11)
    seq, carries, trained, want = 16, 0, [], []
    carry, text_of = None, {}
    for step in range(300):
        n, W = rng.randint(1, 8), rng.randint(1, 4)
        lens = [rng.choice([0, 1, 3, 15, 16, 17, 40, 90]) for _ in range(n)]
        rows = [DocRange(step, 0, i, i + 1) for i in range(n)]
        for i, t in enumerate(lens):
            text_of[rows[i]] = [100000 * step + 1000 * i + j + 1 for j in range(t)]
        shares = [rng.choice([1.0, 2.0]) for _ in range(W)]
        cut = rng.random() < 0.8
        got = cut_step(list(zip(rows, lens)), shares, seq, carry=carry, cut=cut)
        if got is None:  # fewer rows than ranks: the step goes in whole documents (not modelled here)
            continue
        wins, out = got
        padded = 0
        for w in wins:
            one = [DocRange(r.shard, r.row_group, x, x + 1) for r in w.reads() for x in range(r.start, r.stop)]
            docs = [text_of[r] for r in one if text_of[r]]
            x, y = pack(docs, seq, 0, skip=w.skip, rows=w.rows, expect_slots=w.slots)
            assert x.shape == (w.rows, seq)
            trained += y[y >= 0].tolist()
            padded += int((y < 0).sum())
        owned = [x for w in wins for r in w.owned for x in range(r.start, r.stop)]
        assert sorted(owned) == list(range(n))
        assert carry is None or wins[0].borrow == carry.doc
        # what the chain must have trained so far: every earlier document whole, this step's up to its cut
        for r, t in zip(rows, lens):
            if t:
                want += text_of[r] + [0]
        if out is not None:
            carries += 1
            assert out.doc in rows and 0 < out.skip < out.slots == len(text_of[out.doc]) + 1
            assert trained == want[:len(want) - (out.slots - out.skip)]
            assert padded == 0  # a step that leaves a tail trains whole rows only
            assert Carry.from_list(out.to_list()) == out
        else:
            assert trained == want
        carry = out
    assert carries > 100


def test_cut_step_refuses_a_carry_without_its_slot_count():
    from datasets.split import Carry, cut_step

    with pytest.raises(ValueError, match="carry"):
        cut_step([(DocRange(0, 0, 1, 2), 20)], [1.0], 16, carry=Carry(DocRange(0, 0, 0, 1), 5))
