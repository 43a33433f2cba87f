"""A real Ray cluster for the elastic tests, shared by the session, and a small fast run config."""

import pytest

from elastic.config import load_config


@pytest.fixture(scope="session")
def ray_cluster():
    from ray.cluster_utils import Cluster

    # logical CPUs: workers are single-threaded, so 6 fit on this 2-core machine (slowly)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6, "include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.shutdown()


def small_config(tmp_path, address: str, *overrides: str):
    """A seconds-per-run config: byte tokenizer, a one-layer GPT, short documents."""
    return load_config("tiny", small_overrides(tmp_path, address) + list(overrides))


def small_overrides(tmp_path, address: str) -> list[str]:
    """The `key=value` list behind `small_config` (for commands that take overrides)."""
    base = [
        f"run.dir={tmp_path}",
        "data.tokenizer=bytes",
        "data.max_doc_tokens=192",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
        "train.seq_len=64", "train.batch_tokens=512", "train.micro_batch_tokens=4096",
        "train.lr=3e-3", "train.warmup_steps=2", "train.step_timeout_s=20",
        "train.eval_tokens=2048", "checkpoint.every=0",
    ]
    if address:
        base.append(f"cluster.address={address}")
    return base


SOLO = ["sync.name=demo", "train.seq_len=64", "data.tokenizer=bytes", "model.n_layer=1"]


def solo_replica(*overrides: str):
    """One `WorkerReplica` on the bundled sample corpus (tiny model, demo sync over a group of one, no Ray):
    (replica, shards) for tests that drive `step`/`commit`/`abort` directly."""
    from compression.communicator import ThreadCommunicator
    from datasets import discover
    from elastic.worker import WorkerReplica

    cfg = load_config("tiny", SOLO + list(overrides))
    d = cfg.data
    shards = discover(d.source, d.storage_options, text_column=d.text_column)
    rep = WorkerReplica(cfg, "w0", shards, 0)
    rep.join_local(ThreadCommunicator.group(1)[0])
    return rep, shards


def train_with_fault_after_first_checkpoint(cfg, fault):
    """Train `cfg`, calling `fault()` (from another thread) as soon as the run's first checkpoint has committed;
    returns the run's summary. `fault` returns nothing; whether it ran is the caller's to check."""
    import threading
    import time

    from elastic.cli import train
    from elastic.config import run_dir

    ckdir = run_dir(cfg) / "checkpoints"
    done = threading.Event()

    def watch():
        while not done.is_set():
            if any(ckdir.glob("step-*/COMMIT")):
                fault()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return train(cfg)
    finally:
        done.set()
        watcher.join()
