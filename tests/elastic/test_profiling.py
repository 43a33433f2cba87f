"""`train.profile_at`: a worker profiles its steps with torch.profiler and reports where the time went."""
from datasets import DataPlan
from elastic.config import ConfigError, load_config
from elastic.messages import StepCall
from elastic.profiling import PHASES

from .conftest import solo_replica


def test_profiled_steps_report_a_summary_once():
    rep, shards = solo_replica("train.profile_at=1", "train.profile_steps=2")
    plan = DataPlan(shards, seed=0)
    reports = []
    for step in range(4):
        reports.append(rep.step(StepCall(step, plan.assign(step, {0: 600})[0], 1e-3,
                                         commit_first=step - 1 if step else None)))
        plan.commit(step)
    assert [r.profile is not None for r in reports] == [False, False, True, False]
    prof = reports[2].profile
    assert prof["steps"] == 2 and prof["wall_ms_per_step"] > 0
    assert set(prof["phases_cpu_ms_per_step"]) == set(PHASES)
    assert prof["phases_cpu_ms_per_step"]["fwd_bwd"] > 0 and prof["phases_cpu_ms_per_step"]["commit"] > 0
    assert prof["top_cpu_ops_ms_per_step"]
    assert "gpu_busy_fraction" not in prof  # CPU run: no device figures


def test_profile_steps_is_checked(tmp_path):
    import pytest

    with pytest.raises(ConfigError, match="train.profile_steps"):
        load_config("tiny", ["train.profile_steps=0"])
