"""The coordinator's decisions (elastic/policy.py) as plain functions: no Ray, no workers."""
from elastic.journal import DictKV, Journal
from elastic.messages import StepReport
from elastic.policy import (MAX_ATTEMPTS_PER_STEP, CoordinatorState, PeerObservation, ScalingObservation,
                            StepOutcome, capped_scale_target, decide_failure, decide_scaling, fault_time, liveness,
                            resolve_fingerprints, silent_peer_limit, spawn_backoff_s)

MEMBERS = ["w1", "w2", "w3"]


def ok(w, rank):
    return StepReport(w, rank, 7, ok=True, tokens=100)


def failed(w, rank, **kw):
    r = StepReport(w, rank, 7, ok=False, error=kw.pop("error", "boom"))
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def outcome(reports, **kw):
    return StepOutcome(7, MEMBERS, {r.worker_id: r for r in reports}, **kw)


def test_every_rank_ok_commits():
    assert decide_failure(outcome([ok("w1", 0), ok("w2", 1), ok("w3", 2)])).commits


def test_a_missing_report_never_commits():
    d = decide_failure(outcome([ok("w1", 0), ok("w2", 1)], dead=["w3"]))
    assert d.action == "evict" and d.leaving == ["w3"] and d.kind == "death"


def test_silent_peer_is_evicted_and_its_victims_stay():
    # w1 and w2 failed in the collective because w3 froze: only w3 leaves
    reports = [failed("w1", 0, left_group=True), failed("w2", 1, left_group=True)]
    d = decide_failure(outcome(reports, silent=["w3"]))
    assert d.action == "evict" and d.leaving == ["w3"] and d.kind == "silent_peer"


def test_worker_that_failed_before_the_exchange_is_the_origin_not_a_garbage_sender():
    # w2 ran out of memory and abstained with a NaN weight: its peers name it as a bad sender
    reports = [failed("w1", 0, bad_sender=1), failed("w2", 1, pre_exchange=True), failed("w3", 2, bad_sender=1)]
    d = decide_failure(outcome(reports))
    assert d.leaving == ["w2"] and d.kind == "worker_error"


def test_garbage_sender_is_evicted():
    # w3's payload is garbage: every peer names it; w3 itself saw valid payloads
    d = decide_failure(outcome([failed("w1", 0, bad_sender=2), failed("w2", 1, bad_sender=2), ok("w3", 2)]))
    assert d.leaving == ["w3"] and d.kind == "corrupt_payload"


def test_commit_failure_evicts_only_the_failing_replica():
    reports = [failed("w1", 0, bad_sender=1), failed("w2", 1, commit_failed=True, pre_exchange=True),
               failed("w3", 2, bad_sender=1)]
    d = decide_failure(outcome(reports))
    assert d.action == "evict" and d.leaving == ["w2"] and d.kind == "commit_error"


def test_transient_collective_error_regroups_same_members():
    reports = [failed(w, r, left_group=True) for r, w in enumerate(MEMBERS)]
    d = decide_failure(outcome(reports))
    assert d.action == "regroup" and not d.leaving


def test_stuck_collective_with_nobody_to_blame_regroups():
    d = decide_failure(outcome([], collective_stuck=True))
    assert d.action == "regroup" and d.kind == "collective_stuck"


def test_window_mismatch_retries_without_evicting():
    reports = [failed("w1", 0, pre_exchange=True, window_mismatch=True), failed("w2", 1, bad_sender=0),
               failed("w3", 2, bad_sender=0)]
    d = decide_failure(outcome(reports))
    assert d.action == "retry" and d.kind == "window_mismatch"


def test_data_error_stops_and_blames_nobody():
    reports = [failed("w1", 0, pre_exchange=True, data_error=True, error="DataSourceError: s3 down"),
               failed("w2", 1, bad_sender=0), failed("w3", 2, bad_sender=0)]
    d = decide_failure(outcome(reports))
    assert d.action == "stop" and d.kind == "data_error" and "s3 down" in d.reason


def test_a_step_that_keeps_failing_stops():
    reports = [failed(w, r, left_group=True) for r, w in enumerate(MEMBERS)]
    assert decide_failure(outcome(reports, attempts=MAX_ATTEMPTS_PER_STEP)).action == "regroup"
    assert decide_failure(outcome(reports, attempts=MAX_ATTEMPTS_PER_STEP + 1)).action == "stop"


def test_silent_limit_defaults_to_ten_seconds_or_five_median_steps():
    assert silent_peer_limit(0, []) == 10.0
    assert silent_peer_limit(0, [4.0, 4.0, 4.0]) == 20.0
    assert silent_peer_limit(3.5, [4.0, 4.0, 4.0]) == 3.5


def test_liveness_silent_stuck_and_waiting():
    now = 100.0
    pending = {
        "frozen": PeerObservation(last_seen=80.0, phase="compute", progress=3, progress_at=80.0),
        "hung": PeerObservation(last_seen=99.9, phase="hung", progress=5, progress_at=85.0),
        "reading": PeerObservation(last_seen=99.9, phase="read", progress=2, progress_at=70.0),
        "waiting": PeerObservation(last_seen=99.9, phase="exchange", progress=9, progress_at=70.0),
    }
    lv = liveness(pending, now, limit_s=10.0, waited_s=30.0)
    assert lv.silent == ["frozen"] and lv.stuck == ["hung"] and not lv.collective_stuck
    # a straggler that keeps computing past the watchdog while its peers wait
    slow = {"slow": PeerObservation(last_seen=99.9, phase="compute", progress=7, progress_at=99.0)}
    assert liveness(slow, now, 10.0, waited_s=30.0).stuck == []
    assert liveness(slow, now, 10.0, waited_s=30.0, watchdog_s=25.0).stuck == ["slow"]
    # everyone inside the exchange for longer than the limit, nobody silent: nobody to blame
    lv = liveness({"a": pending["waiting"], "b": pending["waiting"]}, now, 10.0, 30.0)
    assert lv.collective_stuck and not lv.silent and not lv.stuck


def test_fault_time_is_the_last_sign_of_life():
    obs = {"w1": PeerObservation(last_seen=50.0), "w2": PeerObservation(last_seen=42.0)}
    assert fault_time(obs, ["w1", "w2"], 60.0) == 42.0
    assert fault_time(obs, ["w9"], 60.0) == 60.0


def test_fingerprints_majority_wins_and_repeat_offender_is_evicted():
    strikes: dict = {}
    v = resolve_fingerprints({"w1": "a", "w2": "a", "w3": "b"}, MEMBERS, strikes)
    assert not v.agree and v.source == "w1" and v.resync == ["w3"] and not v.evict
    v = resolve_fingerprints({"w1": "a", "w2": "a", "w3": "c"}, MEMBERS, strikes)
    assert v.evict == ["w3"] and not v.resync
    assert resolve_fingerprints({"w1": "a", "w2": "a"}, MEMBERS, strikes).agree


def test_fingerprint_tie_goes_to_the_oldest_replica():
    v = resolve_fingerprints({"w2": "b", "w1": "a"}, ["w1", "w2"], {})
    assert v.source == "w1" and v.resync == ["w2"]


def test_scaling_drain_shrinks_target_and_scale_request_does_not():
    o = ScalingObservation(members=MEMBERS, pending=0, ready=[], target=3, min_workers=1, max_workers=3,
                           grow=False, draining=["w2"])
    d = decide_scaling(o)
    assert d.leave == ["w2"] and d.leave_kind == "drain" and d.target == 2 and d.spawn == 0
    o = ScalingObservation(members=MEMBERS, pending=0, ready=[], target=2, min_workers=1, max_workers=3,
                           grow=False, draining=["w3"], scale_leaving=["w3"])
    d = decide_scaling(o)
    assert d.leave == ["w3"] and d.leave_kind == "scale" and d.target == 2


def test_scaling_keeps_demand_up_to_max_and_backs_off_after_failed_starts():
    o = ScalingObservation(members=["w1"], pending=0, ready=[], target=2, min_workers=1, max_workers=4, grow=True,
                           now=100.0)
    assert decide_scaling(o).spawn == 3
    o.spawn_failures, o.last_spawn_failure_at = 3, 99.0  # three failed starts in a row: wait 5 s
    assert decide_scaling(o).spawn == 0
    o.now = 104.5
    assert decide_scaling(o).spawn == 3
    assert spawn_backoff_s(0) == 0 and spawn_backoff_s(100) == 60.0


def test_scaling_withdraws_requests_beyond_the_target():
    o = ScalingObservation(members=["w1", "w2"], pending=3, ready=[], target=3, min_workers=1, max_workers=3,
                           grow=False)
    assert decide_scaling(o).cancel == 2


def test_scale_target_capped_by_max_workers():
    assert capped_scale_target(10, 1, 4) == 4 and capped_scale_target(0, 2, 4) == 2


def test_terminal_states():
    assert CoordinatorState.FINISHED.is_terminal and CoordinatorState.ERRORED.is_terminal
    assert not CoordinatorState.PAUSED.is_terminal and not CoordinatorState.ADOPTING.is_terminal


def test_journal_keeps_every_row_and_the_latest_head():
    kv = DictKV()
    j = Journal(kv, "ns", "run")
    j.start(shards=(["s1"], []))
    for step in range(150):
        j.record({"step": step + 1, "plan": {"cursor": step}}, row=[step, step * 2])
    head, rows, shards = Journal(kv, "ns", "run").load()
    assert head == {"step": 150, "plan": {"cursor": 149}}
    assert rows == [[s, s * 2] for s in range(150)] and shards == (["s1"], [])
    # an adopting coordinator seeds a new journal with the rows and goes on
    j2 = Journal(kv, "ns", "run")
    j2.start(shards, rows)
    j2.record({"step": 151}, row=[150, 300])
    assert Journal(kv, "ns", "run").load()[1][-2:] == [[149, 298], [150, 300]]
    j2.finish()
    assert Journal(kv, "ns", "run").load() is None and not kv.data


def test_journals_of_two_runs_do_not_mix():
    kv = DictKV()
    Journal(kv, "ns", "a").start(shards=([], []))
    Journal(kv, "ns", "a").record({"step": 1})
    Journal(kv, "ns", "ab").start(shards=([], []))
    Journal(kv, "ns", "ab").record({"step": 9})
    Journal(kv, "ns", "a").finish()
    assert Journal(kv, "ns", "ab").load()[0] == {"step": 9}
