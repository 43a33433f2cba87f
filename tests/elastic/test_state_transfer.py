"""A joiner's state on the wire (elastic.state_transfer): smaller, and bit for bit what the source held."""
import pickle

import pytest
import torch

from elastic.config import ConfigError, load_config
from elastic.model import build_model
from elastic.state_transfer import pack_state, unpack_state


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_tied_weights_travel_once_and_every_tensor_comes_back_bit_identical():
    cfg = load_config("tiny")
    model = build_model(cfg.model, 50257, seed=0)
    with torch.no_grad():  # values a trained replica has: -0.0, denormals, NaN payloads must all survive
        w = model.wte.weight
        w[0, :4] = torch.tensor([-0.0, 1e-42, float("nan"), float("-inf")])
    state = model.state_dict()
    assert state["wte.weight"].data_ptr() == state["lm_head.weight"].data_ptr()  # tied
    plain = sum(v.numel() * v.element_size() for v in state.values())
    for codec in ("zstd", "none"):
        packed = pickle.loads(pickle.dumps(pack_state(state, codec), protocol=5))  # as the object store carries it
        wte = state["wte.weight"]
        assert packed.buffer_bytes == plain - wte.numel() * 4  # the tied embedding once
        if codec == "zstd":
            assert packed.wire_bytes < packed.buffer_bytes
        back = unpack_state(packed)
        assert list(back) == list(state)
        assert all(_bits(back[k]) == _bits(v) and back[k].dtype == v.dtype and back[k].shape == v.shape
                   for k, v in state.items())
        assert back["wte.weight"] is back["lm_head.weight"]  # one tensor again, as load_state_dict expects
        fresh = build_model(cfg.model, 50257, seed=1)
        fresh.load_state_dict(back)
        assert all(_bits(a) == _bits(b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_nested_optimizer_state_with_mixed_dtypes_round_trips():
    p = torch.nn.Parameter(torch.randn(33, 7))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    state = {"opt": opt.state_dict(), "step_count": 5, "bf16": torch.randn(9).bfloat16(),
             "mask": torch.tensor([True, False, True]), "ids": torch.arange(4), "empty": torch.zeros(0),
             "scalar": torch.tensor(2.5), "names": ("a", "b")}
    before = pickle.dumps(state)
    back = unpack_state(pack_state(state))
    assert pickle.dumps(state) == before  # packing copies, never changes the source's tensors
    assert back["step_count"] == 5 and back["names"] == ("a", "b")
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert _bits(back["opt"]["state"][0][k]) == _bits(state["opt"]["state"][0][k])
    for k in ("bf16", "mask", "ids", "empty", "scalar"):
        assert back[k].dtype == state[k].dtype and _bits(back[k]) == _bits(state[k]) and back[k].shape == state[k].shape
    back["ids"] += 1  # writable, and not shared with the packed buffer
    assert torch.equal(unpack_state(pack_state(state))["ids"], torch.arange(4))


def test_unknown_codec_is_named_with_the_choices():
    with pytest.raises(ValueError, match="state_codec: 'lz5' must be one of zstd, none"):
        pack_state({"w": torch.zeros(2)}, "lz5")
    with pytest.raises(ConfigError, match="train.state_codec: 'lz5'"):
        load_config("tiny", ["train.state_codec=lz5"])
