"""Shares per worker, the hang watchdog, generations, the chaos schedule: plain policy objects."""
from elastic.chaos import ChaosSchedule
from elastic.config import ChaosSection
from elastic.membership import Member, compute_shares, watchdog_timeout


def m(wid, acc, rate=0.0):
    return Member(wid, acc, "n", "cpu", rate)


def test_equal_shares_for_homogeneous_workers_are_deterministic():
    members = [m("a", "CPU", 100), m("b", "CPU", 300)]
    assert compute_shares(members, 4096, "auto", {}, 128) == [2048, 2048]


def test_mixed_accelerators_get_throughput_shares():
    members = [m("a", "A100", 3000), m("b", "L4", 1000)]
    shares = compute_shares(members, 4096, "auto", {}, 128)
    assert shares == [3072, 1024]


def test_pinned_accelerator_batch():
    members = [m("a", "A100", 3000), m("b", "L4", 1000), m("c", "L4", 1000)]
    shares = compute_shares(members, 4096, "auto", {"A100": 2048}, 128)
    assert shares[0] == 2048 and shares[1] + shares[2] == 2048


def test_every_rank_gets_at_least_one_sequence():
    members = [m("a", "A100", 1e6), m("b", "L4", 1)]
    assert min(compute_shares(members, 1024, "throughput", {}, 128)) >= 128


def test_watchdog_scales_with_recent_steps():
    assert watchdog_timeout([], 30, 8) == 30
    assert watchdog_timeout([10, 10, 10, 10], 5, 8) == 80


def test_chaos_events_fire_once_and_spare_rank0():
    s = ChaosSchedule(ChaosSection(kill_at=[3], hang_at=[3], add_at=[5]))
    assert s.due(2) == []
    assert [e.kind for e in s.due(3)] == ["kill", "hang"]
    s.mark_done(s.due(3)[1])
    assert [e.kind for e in s.due(4)] == ["kill"]  # not carried out at 3 (e.g. one worker left): still due
    for e in s.due(4):
        s.mark_done(e)
    assert s.due(4) == []
    assert [e.kind for e in s.due(5)] == ["add"]
    assert all(s.pick_victim(3) != 0 for _ in range(50))
    s2 = ChaosSchedule(ChaosSection(kill_at=[3]))
    s2.load_state_dict(s.state_dict())
    assert s2.due(3) == []
