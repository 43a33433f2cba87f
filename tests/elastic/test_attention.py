"""Attention graphs prepared before training (`elastic.attention`): which row counts, and that a prepared
and an unprepared row count compute the same thing."""
import pytest
import torch

from elastic.attention import AttentionShapes, warm_row_counts
from elastic.config import load_config
from elastic.model import build_model


def test_warm_row_counts():
    assert warm_row_counts(16, 32) == list(range(1, 17))
    assert warm_row_counts(64, 32) == list(range(1, 33)) + [64]  # full micro-batches are always prepared
    assert warm_row_counts(16, 0) == [] and warm_row_counts(0, 8) == []


def test_cpu_workers_prepare_nothing():
    model = build_model(load_config("tiny", []).model, 256, 0)
    shapes = AttentionShapes(torch.device("cpu"), 8, 32)
    assert shapes.prepare(model.blocks[0].attn, 16, model.shape.n_embd, False) == 0.0
    assert shapes.prepared == set()
    with shapes.kernels(5):  # the default kernels: nothing to choose on a CPU
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prepared_and_unprepared_row_counts_agree_on_cuda():
    cfg = load_config("tiny", ["model.n_embd=256", "model.n_head=4", "model.block_size=256"])
    dev = torch.device("cuda")
    model = build_model(cfg.model, 256, 0).to(dev)
    attn = model.blocks[0].attn
    grads_before = [p.grad for p in attn.parameters()]
    shapes = AttentionShapes(dev, 4, 2)  # prepares rows 1, 2 and the full micro-batch (4)
    assert shapes.prepare(attn, 256, 256, True) > 0
    assert shapes.prepared == {1, 2, 4}
    assert [p.grad for p in attn.parameters()] == grads_before  # gradients left as they were
    x = torch.randn(3, 256, 256, device=dev)
    outs = []
    for rows in (2, 3):  # 2: prepared (default kernels), 3: not (cuDNN excluded)
        with shapes.kernels(rows), torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(attn(x[:rows]).float())
    torch.testing.assert_close(outs[0], outs[1][:2], atol=2e-2, rtol=2e-2)
