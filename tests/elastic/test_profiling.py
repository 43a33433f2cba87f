"""`train.profile_at`: a worker profiles its steps with torch.profiler and reports where the time went."""
from compression import build_sync
from compression.communicator import ThreadCommunicator
from datasets import DataPlan, discover
from elastic.config import ConfigError, load_config
from elastic.profiling import PHASES
from elastic.worker import WorkerReplica


def test_profiled_steps_report_a_summary_once():
    cfg = load_config("tiny", ["sync.name=demo", "train.seq_len=64", "data.tokenizer=bytes", "model.n_layer=1",
                               "train.profile_at=1", "train.profile_steps=2"])
    d = cfg.data
    shards = discover(d.source, d.storage_options, text_column=d.text_column)
    rep = WorkerReplica(cfg, "w0", shards, 0)
    comm = ThreadCommunicator.group(1)[0]
    rep.sync, rep.comm, rep.rank, rep.world_size = build_sync(cfg.sync, rep.params, comm), comm, 0, 1
    plan = DataPlan(shards, seed=0)
    reports = []
    for step in range(4):
        reports.append(rep.step(step, plan.assign(step, {0: 600})[0], 1e-3, {}, step - 1 if step else None))
        plan.commit(step)
    assert [("profile" in r) for r in reports] == [False, False, True, False]
    prof = reports[2]["profile"]
    assert prof["steps"] == 2 and prof["wall_ms_per_step"] > 0
    assert set(prof["phases_cpu_ms_per_step"]) == set(PHASES)
    assert prof["phases_cpu_ms_per_step"]["fwd_bwd"] > 0 and prof["phases_cpu_ms_per_step"]["commit"] > 0
    assert prof["top_cpu_ops_ms_per_step"]
    assert "gpu_busy_fraction" not in prof  # CPU run: no device figures


def test_profile_steps_is_checked(tmp_path):
    import pytest

    with pytest.raises(ConfigError, match="train.profile_steps"):
        load_config("tiny", ["train.profile_steps=0"])
