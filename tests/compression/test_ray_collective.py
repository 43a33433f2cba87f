"""RayCollectiveCommunicator over gloo between two Ray actors: the collectives and two demo steps."""

def test_ray_collective_gloo_two_actors_agree(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class DemoPeer:
        def run(self, world, rank):
            import hashlib

            import ray.util.collective as col
            import torch

            from compression import RayCollectiveCommunicator, SyncConfig, build_sync

            col.init_collective_group(world, rank, backend="gloo", group_name="default")
            comm = RayCollectiveCommunicator("default")
            t = torch.full((3,), float(rank + 1))
            comm.allreduce_(t)
            gathered = comm.allgather(torch.tensor([rank, 10 + rank], dtype=torch.uint8))
            b = torch.tensor([float(rank)])
            comm.broadcast_(b, src=1)
            g = torch.Generator().manual_seed(0)
            model = torch.nn.Linear(64, 32)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
            sync = build_sync(SyncConfig(name="demo"), list(model.parameters()), comm)
            g = torch.Generator().manual_seed(1 + rank)
            for _ in range(2):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=g)
                sync.exchange(lr=1e-2, weight=1.0 + rank)
                sync.commit()
            h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
            col.destroy_collective_group("default")
            return t.tolist(), gathered.tolist(), b.item(), comm.rank, comm.world_size, h

    actors = [DemoPeer.remote() for _ in range(2)]
    try:
        out = ray.get([a.run.remote(2, r) for r, a in enumerate(actors)], timeout=120)
    finally:
        for a in actors:
            ray.kill(a)
    for r, (t, gathered, b, rank, world, _) in enumerate(out):
        assert t == [3.0, 3.0, 3.0] and gathered == [[0, 10], [1, 11]] and b == 1.0
        assert (rank, world) == (r, 2)
    assert out[0][-1] == out[1][-1]
