"""Starting a step's forward/backward before its call arrives (`train.compute_ahead`): the gradients, reports and
parameters are those of computing it in the call, and anything that changes what the step would compute (other
rows, an abort, a re-sync, a fault at the commit) makes the call compute it again."""
import pytest

from datasets import DataPlan

from .conftest import solo_replica
from elastic.messages import StepCall, StepChaos

SHARE = {0: 600}


def _drive(rep, shards, ahead: bool, events: dict | None = None):
    """Steps 0..5 as the coordinator drives one rank: each call commits the previous step and carries the next
    step's rows as its hint, fixed (`next_fixed`) when `ahead`. `events[step]`: "abort" (the step is dropped
    after its exchange and runs again), "flush" (its commit is sent on its own, as before a checkpoint),
    "other-rows" (the next call brings rows other than the hint), "resync" (a peer's parameters are loaded
    between the steps), "diverge" (the commit's chaos fault). Returns what must not depend on `ahead`."""
    events = dict(events or {})
    plan = DataPlan(shards, seed=0)
    out, step, commit, moved = [], 0, None, False
    while step < 6:
        ranges = plan.assign(step, {0: 400} if moved else SHARE)[0]  # moved: fewer rows than the hint
        hint = plan.peek(SHARE)[0] if step < 5 else None
        ev = events.pop(step, None)
        chaos = StepChaos(diverge=ev == "diverge") if commit is not None else StepChaos()
        report = rep.step(StepCall(step, ranges, 1e-3, chaos, commit_first=commit, prefetch=hint,
                                   next_fixed=ahead and hint is not None))
        assert report.ok, report
        out.append((step, report.tokens, report.docs, report.loss, report.fingerprint))
        if ev == "abort":
            rep.abort(step)
            plan.abort(step)
            commit = None
            continue
        plan.commit(step)
        commit, step = step, step + 1
        if ev in ("flush", "resync"):
            out.append(("flush", rep.commit(commit)))
            commit = None
        if ev == "resync":  # after the flushed commit, the majority's parameters (here its own, nudged)
            state = {k: v.clone() for k, v in rep.model.state_dict().items()}
            for v in state.values():
                if v.is_floating_point():
                    v.add_(1e-3)
            rep.load_model_state(state)
        moved = ev == "other-rows"
    out.append(("end", rep.commit(commit) if commit is not None else rep.fingerprint()))
    return out


def test_computed_ahead_is_what_the_call_computes():
    rep, shards = solo_replica("train.fingerprint_every=1")
    plain, _ = solo_replica("train.fingerprint_every=1")
    assert _drive(rep, shards, True) == _drive(plain, shards, False)


def test_every_step_after_the_first_is_computed_ahead_and_reads_on_ahead():
    rep, shards = solo_replica("train.balance_rows=true")
    plan = DataPlan(shards, seed=0)
    commit = None
    for step in range(4):
        ranges = plan.assign(step, SHARE)[0]
        hint = plan.peek(SHARE)[0]
        report = rep.step(StepCall(step, ranges, 1e-3, commit_first=commit, prefetch=hint, next_fixed=True))
        assert report.ok
        assert (report.ahead_s > 0) == (step > 0), (step, report.ahead_s)
        assert report.compute_s >= report.ahead_s
        # the next step's rows were read ahead although this step's were loaded before its call brought them
        assert report.ahead_tokens and {tuple(r[:3]) for r in report.ahead_tokens} >= {
            (r.shard, r.row_group, x) for r in hint for x in range(r.start, r.stop)}
        plan.commit(step)
        commit = step


def test_what_changes_the_step_discards_it():
    for event in ("abort", "flush", "other-rows", "resync", "diverge"):
        events = {2: event}
        extra = ["chaos.diverge_at=[2]"] if event == "diverge" else []
        rep, shards = solo_replica("train.fingerprint_every=1", *extra)
        plain, _ = solo_replica("train.fingerprint_every=1", *extra)
        got, want = _drive(rep, shards, True, events), _drive(plain, shards, False, events)
        assert got == want, event


def test_a_group_computing_ahead_survives_faults_and_delivers_each_document_once(tmp_path, ray_cluster):
    """Two Ray workers with their rows fixed a step ahead (`train.balance_rows=false`, so the coordinator fixes
    every next step's rows): a kill mid-step, garbage on the wire, a replica that drifts after a commit and a
    collective that fails everywhere. Each discards what it computed ahead where it must: the run finishes with
    bit-identical replicas and every document delivered once, and most steps were computed ahead."""
    from elastic.cli import train

    from .conftest import small_config
    from .test_field_faults import _assert_healthy

    cfg = small_config(tmp_path, ray_cluster.address, "run.name=ahead", "train.steps=30", "train.workers=2",
                       "sync.name=demo", "train.balance_rows=false", "chaos.kill_at=[6]",
                       "chaos.corrupt_payload_at=[14]", "chaos.diverge_at=[18]", "chaos.comm_error_at=[23]",
                       "train.step_timeout_s=6", "train.min_workers=2")
    summary = train(cfg)
    _assert_healthy(summary, 30, agree=False)
    events = " ".join(e["what"] for e in summary["events"])
    assert "step-aborted corrupt_payload" in events and "step-aborted collective_error" in events, events
    # the drifted replica is found at the next call's fingerprints and repaired; no other disagreement
    assert [d["when"] for d in summary["replica_disagreements"]] == ["after step 17"], summary["replica_disagreements"]
    assert "resync " in events, events
    assert summary["computed_ahead_steps"] >= 15, summary["computed_ahead_steps"]


@pytest.mark.slow  # two runs (~15 s); the replica-level equality above runs in CI
def test_one_worker_trains_the_same_with_and_without_computing_ahead(tmp_path, ray_cluster):
    """Through the whole stack (coordinator, Ray calls, read-ahead, checkpoint): one worker computing every step
    ahead of its call reaches the same losses, tokens and held-out loss bit for bit as one that does not."""
    from elastic.cli import train

    from .conftest import small_config

    got = {}
    for ahead in (True, False):
        cfg = small_config(tmp_path / str(ahead), ray_cluster.address, f"run.name=same-{ahead}", "train.steps=12",
                           "train.workers=1", "sync.name=demo", f"train.compute_ahead={str(ahead).lower()}")
        s = train(cfg)
        assert s["state"] == "FINISHED", s.get("error")
        got[ahead] = (s["loss_history"], s["val_loss"], s["data"]["delivered_once"])
        assert (s["computed_ahead_steps"] == 11) if ahead else (s["computed_ahead_steps"] == 0), s["computed_ahead_steps"]
    assert got[True] == got[False]
