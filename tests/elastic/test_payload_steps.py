"""Every payload carries the step it is for, and every rank checks it (compression.codec): in a real run the
worker passes the coordinator's step, so a joiner (whose demo state counts its own steps from 0) agrees with
its peers, while a stale or replayed payload would be refused naming its sender."""
from elastic.cli import train

from .conftest import small_config


def test_demo_joiner_sends_the_runs_step_and_no_step_is_rejected(tmp_path, ray_cluster):
    # min_workers=2: the kill pauses the run until a replacement is ready; it joins with a fresh demo state
    cfg = small_config(tmp_path, ray_cluster.address, "run.name=joinstep", "sync.name=demo", "train.steps=6",
                       "train.min_workers=2", "chaos.kill_at=[2]")
    summary = train(cfg)
    assert summary["state"] == "FINISHED" and summary["steps"] == 6
    assert len({w["generation"] for w in summary["world_size_history"]}) >= 2  # a new generation with the joiner
    assert summary["world_size_history"][-1]["world_size"] == 2
    assert summary["rejected_steps"] == [], summary["rejected_steps"]
    assert summary["replica_hashes_agree"] is True


def test_a_state_sent_in_pieces_arrives_bit_identical_in_another_worker(ray_cluster, monkeypatch):
    # the joiner's state travels as objects of <= STATE_PIECE_BYTES (Ray re-requests a pull that takes > 10 s
    # and the sender starts it over): small pieces here, so the order of many is checked
    import ray
    import torch

    from elastic import worker
    from elastic.state_transfer import pack_state

    monkeypatch.setattr(worker, "STATE_PIECE_BYTES", 4096)
    state = {"w": torch.randn(3000), "ids": torch.arange(700), "tied": None}
    state["tied"] = state["w"]

    @ray.remote(num_cpus=0)
    def receive(packed):
        from elastic.state_transfer import unpack_state
        from elastic.worker import fetch_pieces

        back = unpack_state(fetch_pieces(packed))
        return back["w"].numpy().tobytes(), back["ids"].numpy().tobytes(), back["tied"] is back["w"]

    ray.init(address=ray_cluster.address, log_to_driver=False)
    try:
        packed = worker.in_pieces(pack_state(state, "none"))
        assert isinstance(packed.blob, list) and len(packed.blob) == 5  # 17,600 bytes in pieces of 4096
        w, ids, tied = ray.get(receive.remote(packed))
    finally:
        ray.shutdown()
    assert w == state["w"].numpy().tobytes() and ids == state["ids"].numpy().tobytes() and tied
