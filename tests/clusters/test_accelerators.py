"""`train.accelerators` restricts a run to nodes of the listed types, on a simulated mixed-GPU cluster (real Ray
nodes with logical GPUs and accelerator_type:X resources); a worker's GPU request follows train.device."""
import pytest

from elastic.cli import train
from elastic.config import ConfigError, load_config

SMALL = ["data.tokenizer=bytes", "data.max_doc_tokens=192", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
         "model.block_size=64", "train.seq_len=64", "train.batch_tokens=512", "train.step_timeout_s=20",
         "train.eval_tokens=2048", "checkpoint.every=0"]


def test_only_the_listed_accelerator_types_get_workers(tmp_path):
    # an A100 node is free too, and listed first among the nodes: only the L4s may be used
    cfg = load_config("tiny", [f"run.dir={tmp_path}", *SMALL, "run.name=acc", "train.steps=3", "train.workers=2",
                               "cluster.simulate=[A100,L4,L4]", "train.accelerators=[L4]", "train.start_wait_s=120"])
    summary = train(cfg)
    assert summary["state"] == "FINISHED", summary.get("error")
    first = summary["world_size_history"][0]
    assert first["world_size"] == 2 and first["accelerators"] == ["L4", "L4"], first


def test_accelerators_need_gpu_workers():
    with pytest.raises(ConfigError, match="train.accelerators: .* train.device=cpu"):
        load_config("tiny", ["train.accelerators=[H100]", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.worker_gpus=0"):
        load_config("tiny", ["train.accelerators=[H100]", "train.worker_gpus=0"])
    with pytest.raises(ConfigError, match="accelerator type as Ray names it"):
        load_config("tiny", ["train.accelerators=['H100 80GB']"])
