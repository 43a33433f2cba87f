import pytest
import torch

from compression.codec import GroupSpec, PayloadError, WireFormat, pack_bits, unpack_bits
from compression.dct import dct2, dct_basis
from compression.demo import encode_chunks


@pytest.mark.parametrize("bits", [1, 3, 6, 12, 16])
def test_pack_unpack_roundtrip(bits):
    x = torch.randint(0, 2**bits, (1001,))
    u8 = pack_bits(x, bits)
    assert u8.dtype == torch.uint8 and u8.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(u8, bits, 1001), x)
    # batched rows decode independently
    assert torch.equal(unpack_bits(torch.stack([u8, u8]), bits, 1001)[1], x)


def test_12_bit_indices_and_signs_roundtrip_through_a_payload():
    wire = WireFormat([GroupSpec(n_chunks=7, numel=4096, k=4, value_bits=1),
                       GroupSpec(n_chunks=3, numel=64, k=4, value_bits=1)])
    idx = [torch.stack([torch.randperm(4096)[:4] for _ in range(7)]), torch.stack([torch.randperm(64)[:4] for _ in range(3)])]
    val = [torch.randn(7, 4), torch.randn(3, 4)]
    val[1][2, 2:] = 0.0  # a chunk with only two nonzero picks
    buf = wire.encode(idx, val, rank=0, step=5, weight=3.0)
    assert buf.numel() == wire.nbytes == 32 + (42 + 3 + 4) + (9 + 2 + 2)  # idx, 3-bit counts, signs
    w, groups = wire.decode(buf[None])
    assert w.tolist() == [3.0]
    for (i, v, mask), i0, v0 in zip(groups, idx, val):
        assert torch.equal(i[0], i0)
        assert torch.equal(v[0], torch.sign(v0))
        assert torch.equal(mask[0], (v0 != 0).float())


def test_bf16_values_roundtrip():
    wire = WireFormat([GroupSpec(n_chunks=2, numel=4096, k=8, value_bits=16)])
    idx = [torch.stack([torch.randperm(4096)[:8] for _ in range(2)])]
    val = [torch.randn(2, 8)]
    _, [(i, v, _)] = wire.decode(wire.encode(idx, val, 0, 0, 1.0)[None])
    assert torch.equal(i[0], idx[0]) and torch.equal(v[0], val[0].bfloat16().float())


def test_topk_selection_matches_brute_force():
    torch.manual_seed(0)
    m = torch.randn(6, 8, 16, dtype=torch.float64)
    ch, cw = dct_basis(8, dtype=torch.float64), dct_basis(16, dtype=torch.float64)
    idx, val = encode_chunks(m.clone(), ch, cw, k=5)
    for n in range(6):
        coef = (ch @ m[n] @ cw.T).flatten().tolist()
        best = sorted(range(128), key=lambda j: -abs(coef[j]))[:5]
        assert idx[n].tolist() == best
        assert torch.allclose(val[n], torch.tensor([coef[j] for j in best], dtype=torch.float64))


def test_error_feedback_conserves_momentum():
    torch.manual_seed(1)
    m = torch.randn(4, 64, 64)
    ch = dct_basis(64)
    residual = m.clone()
    idx, val = encode_chunks(residual, ch, ch, k=4)  # in place: the clone becomes the residual
    sent = m - residual  # what left the momentum ...
    coef_sent = dct2(sent, ch, ch).reshape(4, -1)
    expect = torch.zeros_like(coef_sent).scatter_(1, idx, val)
    assert torch.allclose(coef_sent, expect, atol=1e-5)  # ... is exactly the unquantized top-k picks
    assert torch.allclose(residual + sent, m)


def _wire_and_rows(value_bits=1, W=2):
    wire = WireFormat([GroupSpec(3, 48, 4, value_bits), GroupSpec(2, 4096, 4, value_bits)])
    rows = []
    for r in range(W):
        idx = [torch.stack([torch.randperm(48)[:4] for _ in range(3)]), torch.stack([torch.randperm(4096)[:4] for _ in range(2)])]
        rows.append(wire.encode(idx, [torch.randn(3, 4), torch.randn(2, 4)], rank=r, step=0, weight=1.0))
    return wire, torch.stack(rows)


def _reencode(wire, row, rank, edit):
    _, groups = wire.decode(row[None], validate=False)
    idx = [g[0][0].clone() for g in groups]
    val = [g[1][0].clone() for g in groups]
    edit(idx, val)
    return wire.encode(idx, val, rank=rank, step=0, weight=1.0)


@pytest.mark.parametrize("case,reason", [
    ("flip", "checksum"), ("magic", "magic"), ("rank", "sender rank"), ("length", "length"),
    ("index_range", "out of range"), ("duplicate", "duplicate"), ("weight", "weight"), ("nan", "non-finite"),
])
def test_corrupt_payload_is_rejected_naming_the_sender(case, reason):
    wire, rows = _wire_and_rows(value_bits=16 if case == "nan" else 1)
    bad = rows[1].clone()
    if case == "flip":
        bad[40] ^= 0x10
    elif case == "magic":
        bad[0] = ord("X")
    elif case == "rank":
        bad[4] = 0
        wire.seal(bad)
    elif case == "length":
        bad[24] ^= 1
        wire.seal(bad)
    elif case == "index_range":
        bad = _reencode(wire, bad, 1, lambda i, v: i[0].__setitem__((0, 3), 50))
    elif case == "duplicate":
        bad = _reencode(wire, bad, 1, lambda i, v: i[1].__setitem__((1, 1), int(i[1][1, 0])))
    elif case == "weight":
        bad[16:24] = torch.tensor([float("nan")], dtype=torch.float64).view(torch.uint8)
        wire.seal(bad)
    elif case == "nan":
        bad = _reencode(wire, bad, 1, lambda i, v: v[1].__setitem__((0, 0), float("nan")))
    rows[1] = bad
    with pytest.raises(PayloadError) as e:
        wire.decode(rows)
    assert e.value.sender_rank == 1 and reason in e.value.reason
    w2, clean = _wire_and_rows(value_bits=16 if case == "nan" else 1)
    w2.decode(clean)  # untouched payloads pass


def test_wrong_total_size_is_rejected():
    wire, rows = _wire_and_rows()
    with pytest.raises(PayloadError, match="shape"):
        wire.decode(rows[:, :-1])


def test_deferred_decode_returns_the_checks_and_clamps_indices():
    """`defer=True` (the CUDA-graph path) raises nothing, hands back the same checks, and clamps the
    indices so the consensus can run on unchecked bytes without indexing out of range."""
    from compression.codec import Framing

    wire = WireFormat([GroupSpec(n_chunks=3, numel=48, k=4, value_bits=16)])  # 6 index bits: 48..63 exist
    idx = torch.tensor([[63, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    payload = wire.encode([idx], [torch.ones(3, 4)], rank=0, step=0, weight=1.0)
    weights, groups, checks = wire.decode(payload.unsqueeze(0), defer=True)
    assert int(groups[0][0].max()) == 47
    reasons = [r for r, ok in checks if not bool(ok.all())]
    assert reasons == ["group 0: index out of range (chunk has 48 coefficients)"]
    with pytest.raises(PayloadError, match="index out of range"):
        Framing.raise_first_failure(checks)
