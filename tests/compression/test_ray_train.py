"""compression.DeMo inside Ray Train's TorchTrainer: 2 CPU workers, gloo process group, replicas bit-identical."""


def _train_loop(config):
    import hashlib
    import json

    import ray.train
    import torch
    import torch.distributed as dist

    from compression import DeMo, TorchDistributedCommunicator

    rank = dist.get_rank()
    torch.manual_seed(0)  # same init on every worker (separate processes)
    model = torch.nn.Linear(128, 64, bias=False)
    target = torch.randn(64, 128) / 8
    gen = torch.Generator().manual_seed(100 + rank)  # each worker its own data
    x = torch.randn(256, 128, generator=gen)
    y = x @ target.T
    opt = DeMo(model.parameters(), TorchDistributedCommunicator(), lr=3e-2, topk=32, decay=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / config["steps"])
    losses = []
    for _ in range(config["steps"]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(weight=float(x.shape[0]))
        sched.step()
        losses.append(loss.item())
    digest = hashlib.sha256(model.weight.detach().numpy().tobytes()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    st = opt.last_stats
    metrics = {"first": losses[0], "last": losses[-1], "digests": digests,
               "ratio": st.dense_equivalent_bytes / st.bytes_sent}
    if rank == 0:  # Ray Train V2 keeps metrics only with checkpoints: hand them back through a file
        with open(config["out"], "w") as f:
            json.dump(metrics, f)
    ray.train.report(metrics)


import json


def test_demo_optimizer_in_ray_train_torch_trainer(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "metrics.json"
    trainer = TorchTrainer(_train_loop, train_loop_config={"steps": 40, "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=RunConfig(storage_path=str(tmp_path), name="demo"))
    trainer.fit()
    m = json.loads(out.read_text())
    assert len(m["digests"]) == 2 and len(set(m["digests"])) == 1
    assert m["last"] < 0.5 * m["first"]
    assert m["ratio"] > 10
