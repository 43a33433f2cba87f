import math

import pytest
import torch

from compression.dct import ChunkPlan, dct2, dct_basis, idct2


@pytest.mark.parametrize("n", [1, 3, 48, 64])
def test_basis_is_orthonormal(n):
    c = dct_basis(n, dtype=torch.float64)
    assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_basis_matches_dct_ii_definition():
    n = 8
    x = torch.randn(n, dtype=torch.float64)
    ref = torch.tensor([sum(x[i] * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
                        * math.sqrt((1 if k == 0 else 2) / n) for k in range(n)], dtype=torch.float64)
    assert torch.allclose(dct_basis(n, dtype=torch.float64) @ x, ref, atol=1e-12)


def test_batched_2d_roundtrip_and_energy():
    x = torch.randn(5, 64, 48)
    ch, cw = dct_basis(64), dct_basis(48)
    y = dct2(x, ch, cw)
    assert torch.allclose(idct2(y, ch, cw), x, atol=1e-5)
    assert torch.allclose(y.square().sum(), x.square().sum(), rtol=1e-5)
    # separable: equals transforming each chunk on its own
    assert torch.allclose(y[2], ch @ x[2] @ cw.T, atol=1e-5)


def test_plan_groups_same_chunk_shapes_across_parameters_and_roundtrips():
    shapes = [(192, 128), (192,), (128, 192), (48,), (10, 48), (3, 4, 64), (7,)]
    plan = ChunkPlan(shapes, chunk=64)
    keys = [(g.h, g.w) for g in plan.groups]
    assert keys[0] == (64, 64) and len(keys) == len(set(keys))
    assert sum(g.n_chunks for g in plan.groups if (g.h, g.w) == (64, 64)) == 6 + 6
    assert (1, 48) in keys and (10, 48) in keys and (3, 64) in keys and (1, 7) in keys
    ts = [torch.randn(s) for s in shapes]
    back = plan.scatter(plan.gather(ts, "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(ts, back))
    # a 64x64 chunk is a real 64x64 tile of the matrix
    buf = plan.gather(ts, "cpu")[0]
    assert torch.equal(buf[1], ts[0][0:64, 64:128])


def test_view_cache_reuses_views_of_the_same_tensors_and_never_holds_freed_gradients():
    import gc
    import weakref

    from compression.dct import ViewCache

    plan = ChunkPlan([(128, 64), (64,)], 64)
    built = []

    def build(ts):
        built.append(1)
        return plan.param_tiles(ts)

    grads = ViewCache(build, retain=False)
    fresh = [torch.randn(128, 64), torch.randn(64)]
    alive = weakref.ref(fresh[0])
    grads(fresh)
    del fresh
    gc.collect()
    assert alive() is None  # a one-off (set_to_none) gradient is not kept alive by the cache
    kept = [torch.randn(128, 64), torch.randn(64)]
    first, second, third = grads(kept), grads(kept), grads(kept)
    assert third is second and first is not second and len(built) == 3  # cached once they came back
    kept[0].data = torch.zeros(128, 64)  # same object, new storage: a miss, views of the new storage
    views = grads(kept)
    assert views is not third and views[0].data_ptr() == kept[0].data_ptr()
    params = ViewCache(build)
    assert params(kept) is params(kept)  # retained from the first call
