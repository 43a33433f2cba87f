"""params_fingerprint: bit-exact, chunking-independent, sensitive to any element, shape or dtype change."""
import torch

from elastic import fingerprint as fp


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g) for n in (300, 7, 1, 2048, 64)] + [torch.randn(4, 8, generator=g)]


def test_equal_bits_equal_print_and_chunking_does_not_matter(monkeypatch):
    ps = _params()
    a = fp.params_fingerprint(ps)
    assert a == fp.params_fingerprint([p.clone() for p in ps])
    for chunk in (1, 5, 100, 1000):  # tensors split across and merged within chunks
        monkeypatch.setattr(fp, "CHUNK", chunk)
        assert fp.params_fingerprint(ps) == a


def test_any_flipped_bit_shape_or_order_changes_the_print():
    ps = _params()
    a = fp.params_fingerprint(ps)
    for i, j, bit in ((0, 0, 1), (2, 0, 1 << 31), (3, 2047, 1 << 12), (5, 17, 1)):
        q = [p.clone() for p in ps]
        q[i].view(-1).view(torch.int32)[j] ^= bit
        assert fp.params_fingerprint(q) != a, (i, j, bit)
    q = [p.clone() for p in ps]
    q[5] = q[5].reshape(8, 4)
    assert fp.params_fingerprint(q) != a
    assert fp.params_fingerprint(ps[::-1]) != a


def test_mixed_dtypes():
    ps = [torch.randn(10), torch.randn(6).to(torch.bfloat16), torch.randn(3)]
    a = fp.params_fingerprint(ps)
    q = [p.clone() for p in ps]
    q[1].view(torch.int16)[5] ^= 4
    assert fp.params_fingerprint(q) != a
    assert fp.params_fingerprint([]) == "empty"
    assert fp.tensor_fingerprint(ps[0]) == fp.tensor_fingerprint(ps[0].clone())


def test_the_one_kernel_path_gives_the_torch_sums():
    """The Triton kernel (CUDA, or Triton's interpreter on CPU) against the chunked torch ops: same wrapping
    int64 sums for tensors of several sizes (blocks cut across and inside them), views into one storage,
    fp32 and 2-byte elements."""
    import pytest

    pytest.importorskip("triton")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not fp.triton_usable(dev):
        pytest.skip("Triton imported before TRITON_INTERPRET=1 was set and no GPU")
    g = torch.Generator().manual_seed(3)
    store = torch.randn(20000, generator=g).to(dev)
    ts = [torch.randn(n, generator=g).to(dev) for n in (5000, 1, 4096, 300)] + [store[7:9000], store[9000:]]
    assert int(fp.triton_stream_sum(ts)) == int(fp._stream_sum(ts))
    assert int(fp.triton_stream_sum(ts)) == int(fp._stream_sum(ts))  # the cached table
    half = [t.to(torch.bfloat16) for t in ts[:4]]
    assert int(fp.triton_stream_sum(half)) == int(fp._stream_sum(half))
    q = [t.clone() for t in ts]
    q[5].view(torch.int32)[-1] ^= 1
    assert int(fp.triton_stream_sum(q)) != int(fp.triton_stream_sum(ts))
