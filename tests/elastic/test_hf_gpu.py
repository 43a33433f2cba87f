"""A Hugging Face model under demo sync on CUDA (bf16 autocast, the fused Triton codec where chunks allow): two
replicas as threads stay bit-identical every step and learn. Needs a GPU; seen on an H100 (2026-12-07): a
Qwen2-shaped 10M-parameter model, loss 8.60 -> 7.02 in 30 steps, 21,187 payload bytes per step against 40 MB of
fp32 parameters, 64x64 and 1x64 chunk groups fused, the 50-wide ones (vocab 5000, MLP 1000) on the torch path."""
import threading
import types

import pytest
import torch

pytest.importorskip("transformers")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hf_qwen2_shaped_model_trains_under_demo_on_cuda_with_identical_replicas(tmp_path):
    from transformers import Qwen2Config

    from compression import ThreadCommunicator, build_sync
    from compression.config import SyncConfig
    from elastic.fingerprint import params_fingerprint
    from elastic.model import build_model

    Qwen2Config(vocab_size=5000, hidden_size=384, intermediate_size=1000, num_hidden_layers=4, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False).save_pretrained(tmp_path)
    model_cfg = types.SimpleNamespace(hf=str(tmp_path), hf_weights=False, vocab_size=0)  # the `model` section
    dev = torch.device("cuda")
    reps = [build_model(model_cfg, 5000, 0).to(dev) for _ in range(2)]
    syncs = [build_sync(SyncConfig(name="demo"), list(r.parameters()), c)
             for r, c in zip(reps, ThreadCommunicator.group(2))]
    assert any(syncs[0].fused) and not all(syncs[0].fused)  # 64-wide groups fused, 50-wide ones not
    base = torch.randint(0, 5000, (64, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(30):
        out = [0.0, 0.0]

        def work(i):
            x = base[torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(2 * step + i))]
            x = x.repeat(1, 8).to(dev)
            y = torch.roll(x, -1, 1)
            y[:, -1] = -1
            for p in reps[i].parameters():
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = reps[i](x, y)[1]
            loss.backward()
            syncs[i].exchange(lr=3e-3, weight=float((y >= 0).sum()), weight_decay=0.1, boundary=False, step=step)
            syncs[i].commit()
            out[i] = float(loss.detach())

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        losses.append(sum(out) / 2)
        assert params_fingerprint(list(reps[0].parameters())) == params_fingerprint(list(reps[1].parameters())), step
    assert losses[-1] < losses[0] - 0.5, losses
