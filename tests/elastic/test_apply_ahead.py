"""Applying an exchanged step while the coordinator decides (`train.apply_ahead`): the same parameters as
applying it at the commit, and an abort leaves exactly what an abort without it leaves."""
from datasets import DataPlan

from .conftest import solo_replica


def _run(apply_ahead: bool, abort_at: int | None):
    rep, shards = solo_replica(f"train.apply_ahead={str(apply_ahead).lower()}", "sync.delayed_apply=true")
    plan = DataPlan(shards, seed=0)
    prints, step, commit = [], 0, None
    while step < 5:
        ranges = plan.assign(step, {0: 600})[0]
        report = rep.step(step, ranges, 1e-3, {}, commit)
        assert report["ok"], report
        if commit is not None:
            prints.append(report["fingerprint"])
        if step == abort_at:
            prints.append(rep.abort(step))  # the coordinator drops this step: it runs again
            plan.abort(step)
            abort_at, commit = None, None
            continue
        plan.commit(step)
        commit, step = step, step + 1
    prints.append(rep.commit(commit))
    return prints, rep.sync_state()["step_count"], rep.fingerprint()


def test_applied_ahead_equals_applied_at_commit_with_and_without_an_abort():
    for abort_at in (None, 2):
        ahead = _run(True, abort_at)
        plain = _run(False, abort_at)
        assert ahead == plain, abort_at
        assert ahead[1] == 5


def test_state_read_while_a_step_is_applied_ahead_is_the_committed_state():
    rep, shards = solo_replica()
    before = rep.fingerprint()
    assert rep.step(0, DataPlan(shards, seed=0).assign(0, {0: 600})[0], 1e-3, {})["ok"]
    assert rep.fingerprint() == before  # applied ahead, not committed: readers see the committed state
    assert rep.fingerprint() != rep.commit(0)  # and the commit still applies it
