"""Applying an exchanged step while the coordinator decides (`train.apply_ahead`): the same parameters as
applying it at the commit, and an abort leaves exactly what an abort without it leaves."""
from datasets import DataPlan

from .conftest import solo_replica
from elastic.messages import StepCall


def _run(apply_ahead: bool, abort_at: int | None):
    rep, shards = solo_replica(f"train.apply_ahead={str(apply_ahead).lower()}", "sync.delayed_apply=true")
    plan = DataPlan(shards, seed=0)
    prints, step, commit = [], 0, None
    while step < 5:
        ranges = plan.assign(step, {0: 600})[0]
        report = rep.step(StepCall(step, ranges, 1e-3, commit_first=commit))
        assert report.ok, report
        if commit is not None:
            prints.append(report.fingerprint)
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
    assert rep.step(StepCall(0, DataPlan(shards, seed=0).assign(0, {0: 600})[0], 1e-3)).ok
    assert rep.fingerprint() == before  # applied ahead, not committed: readers see the committed state
    assert rep.fingerprint() != rep.commit(0)  # and the commit still applies it


def test_a_failed_apply_ahead_falls_back_to_applying_at_the_commit():
    """If the thread's commit raises (a device that refuses work from another thread, say), the state goes
    back as the exchange left it, the step is applied at the commit, and later steps apply there too."""
    rep, shards = solo_replica()
    plain, _ = solo_replica("train.apply_ahead=false")
    inner = rep.sync.commit
    calls = []

    def flaky(keep_undo=False):
        calls.append(keep_undo)
        if keep_undo and len(calls) == 1:
            inner(keep_undo=True)  # applied, then the thread fails
            raise RuntimeError("device refused")
        inner(keep_undo=keep_undo)

    rep.sync.commit = flaky
    plan_a, plan_b = DataPlan(shards, seed=0), DataPlan(shards, seed=0)
    for step in range(3):
        got = rep.step(StepCall(step, plan_a.assign(step, {0: 600})[0], 1e-3, commit_first=step - 1 if step else None))
        want = plain.step(StepCall(step, plan_b.assign(step, {0: 600})[0], 1e-3,
                                   commit_first=step - 1 if step else None))
        assert got.ok and want.ok
        assert got.fingerprint == want.fingerprint, step
        plan_a.commit(step)
        plan_b.commit(step)
    assert rep.commit(2) == plain.commit(2)
    assert calls == [True, False, False, False]  # after the failure: applied at the commit only
