"""Fused Triton kernels for the DeMo codec on CUDA: one program per chunk, the chunk kept on chip.

Owns `fused_encode`, `fused_decode`, `fused_apply`, `fused_decode_apply`, `TritonSections`, `TileTable` and `Addresses`, the
GPU fast path of `compression.demo` for chunk groups whose sides are powers of two in [16, 128] (the 64x64
tiles of every matrix) or `1 x w` runs of such a width (vectors; 16 per program). The torch path in `compression.demo` is
the reference; these kernels compute the same math with fewer trips through memory:
- `fused_encode`: m' = decay * m + lr * grad (the gradient read straight from the parameter-shaped `.grad`
  through a `TileTable` and `Addresses`), the DCT (`tl.dot`s in 3xTF32: fp32-accurate on tensor cores), top-k |coefficient|
  by k max-reductions over int64 keys (descending, ties to the lower index, zero picks last), the error
  feedback m' - idct(picks) as k rank-1 updates, and a per-chunk non-finite count. Memory: read m and grad
  once, write the residual once (the torch path makes ~15 passes and a radix top-k).
- `fused_decode`: sign (or unit-RMS) of sum_e coef_e * outer(C_h[row_e], C_w[col_e]) per chunk, written in
  the update buffer's dtype. The sum runs over the picks in a fixed order with plain fp32 multiply-adds (no
  tensor cores), so it depends only on the gathered bytes and the compiled kernel: every replica on the
  same GPU kind and Triton build gets the same bits.
- `fused_apply`: p <- p * (1 - lr * wd) - lr * u straight into the parameters; `fused_decode_apply` does
  both in one pass without storing u (same bits).
- `TritonSections`: the wire format's sign-payload sections packed (one kernel per group) and unpacked with
  their checks (one per group, all ranks), byte for byte and flag for flag what `codec.Sections` does.
All need Triton; `available()` says whether it imports. `TRITON_INTERPRET=1` (set before import) runs the
kernels on CPU tensors through Triton's interpreter: that is how the unit tests check them without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

from compression.codec import HEADER_BYTES, MAX_WEIGHT, GroupSpec, Sections, to_device

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the interpreter keeps global state: ranks run as threads (tests, `run_threads`) take turns
_launch = threading.Lock() if INTERPRET else contextlib.nullcontext()


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run on `device` (CUDA with Triton, or any device under the interpreter)."""
    return triton is not None and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


ROWS = 16          # 1 x w chunks per program of the row kernels (a `tl.dot` needs 16 rows)
APPLY_ROWS = 64    # tile rows per program of the apply kernel


def _pow2(n: int) -> bool:
    return 16 <= n <= 128 and n & (n - 1) == 0


def supports(h: int, w: int, k: int) -> bool:
    """Chunk shapes the encode/decode kernels take: sides powers of two in [16, 128] (`tl.dot` tiles) or
    1 x such a width (vectors), and k <= h * w."""
    return (h == 1 or _pow2(h)) and _pow2(w) and 1 <= k <= h * w


def supports_apply(w: int) -> bool:
    """Chunk widths the apply kernel takes (any height)."""
    return _pow2(w)


if triton is not None:

    @triton.jit
    def _topk_keys(y, pos, NPOS: tl.constexpr):
        """One int64 key per coefficient: |y|'s bits (monotonic for non-negative floats; NaN above inf), then
        the position reversed (ties go to the lower index), then y's sign bit. A max-reduction over keys
        gives a pick's value and position at once; a taken key becomes -1, below every other."""
        a = tl.abs(y)
        return (a.to(tl.int32, bitcast=True).to(tl.int64) << 32) | ((NPOS - 1 - pos) << 1) | (y < 0).to(tl.int64)

    @triton.jit
    def _unkey(best, NPOS: tl.constexpr):
        """(position, signed value) of a key from `_topk_keys`."""
        mag = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        return NPOS - 1 - ((best >> 1) & (NPOS - 1)), tl.where((best & 1) == 1, -mag, mag)

    @triton.jit
    def _non_finite(y):
        a = tl.abs(y)
        return tl.where(a == a, a == float("inf"), True).to(tl.int32)

    @triton.jit
    def _encode_kernel(m_ptr, out_ptr, g_ptr, g_delta_ptr, c_param_ptr, c_off_ptr, c_stride_ptr,
                       ch_ptr, cw_ptr, idx_ptr, val_ptr, bad_ptr, decay, lr,
                       H: tl.constexpr, W: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        rh = tl.arange(0, H)
        rw = tl.arange(0, W)
        loc = rh[:, None] * W + rw[None, :]
        m = tl.load(m_ptr + n * (H * W) + loc)
        # this chunk's gradient tile, inside its parameter's own .grad (offsets in elements from g_ptr)
        p = tl.load(c_param_ptr + n)
        base = tl.load(g_delta_ptr + p) + tl.load(c_off_ptr + n)
        stride = tl.load(c_stride_ptr + n)
        g = tl.load(g_ptr + base + rh[:, None] * stride + rw[None, :])
        x = m * decay + g * lr
        ch = tl.load(ch_ptr + rh[:, None] * H + rh[None, :])      # C_h [H, H]
        cwt = tl.load(cw_ptr + rw[None, :] * W + rw[:, None])     # C_w^T [W, W]
        y = tl.dot(tl.dot(ch, x, input_precision=PREC), cwt, input_precision=PREC)
        tl.store(bad_ptr + n, tl.sum(tl.sum(_non_finite(y), 1), 0))
        key = _topk_keys(y, loc.to(tl.int64), H * W)
        for e in tl.static_range(K):
            best = tl.max(tl.max(key, 1), 0)
            i, v = _unkey(best, H * W)
            key = tl.where(key == best, -1, key)
            tl.store(idx_ptr + n * K + e, i)
            tl.store(val_ptr + n * K + e, v)
            row = tl.load(ch_ptr + (i // W) * H + rh)             # basis function of frequency i // W over h
            col = tl.load(cw_ptr + (i % W) * W + rw)
            x = x - (v * row)[:, None] * col[None, :]              # error feedback: a rank-1 update per pick
        tl.store(out_ptr + n * (H * W) + loc, x)

    @triton.jit
    def _decode_kernel(idx_ptr, coef_ptr, ch_ptr, cw_ptr, out_ptr,
                       p_delta_ptr, c_param_ptr, c_off_ptr, c_stride_ptr, lr, wdm,
                       H: tl.constexpr, W: tl.constexpr, E: tl.constexpr, RMS: tl.constexpr,
                       APPLY: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        rh = tl.arange(0, H)
        rw = tl.arange(0, W)
        x = tl.zeros((H, W), dtype=tl.float32)
        for e in range(E):  # fixed order: the same bits on every replica
            i = tl.load(idx_ptr + n * E + e)
            c = tl.load(coef_ptr + n * E + e)
            row = tl.load(ch_ptr + (i // W) * H + rh)
            col = tl.load(cw_ptr + (i % W) * W + rw)
            x = x + (c * row)[:, None] * col[None, :]
        if RMS:
            rms = tl.sqrt(tl.sum(tl.sum(x * x, 1), 0) / (H * W))
            u = tl.where(rms > 0, x / tl.maximum(rms, 1e-30), 0.0)
        else:
            u = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
        if APPLY:  # out_ptr is the first parameter: p <- p * wdm - lr * u, the update never stored
            base = (tl.load(p_delta_ptr + tl.load(c_param_ptr + n)) + tl.load(c_off_ptr + n))
            addr = out_ptr + base + rh[:, None] * tl.load(c_stride_ptr + n) + rw[None, :]
            tl.store(addr, tl.load(addr) * wdm - lr * u)
        else:
            tl.store(out_ptr + n * (H * W) + rh[:, None] * W + rw[None, :], u.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _encode_rows_kernel(m_ptr, out_ptr, g_ptr, g_delta_ptr, c_param_ptr, c_off_ptr, cw_ptr, idx_ptr, val_ptr,
                            bad_ptr, n_chunks, decay, lr, W: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
                            PREC: tl.constexpr):
        """`_encode_kernel` for 1 x W chunks (vectors): R chunks per program, a 1-D DCT on each row."""
        q = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        ok = q < n_chunks
        rw = tl.arange(0, W)
        mask = ok[:, None]
        m = tl.load(m_ptr + q[:, None] * W + rw[None, :], mask=mask, other=0.0)
        base = (tl.load(g_delta_ptr + tl.load(c_param_ptr + q, mask=ok, other=0), mask=ok, other=0)
                + tl.load(c_off_ptr + q, mask=ok, other=0))
        g = tl.load(g_ptr + base[:, None] + rw[None, :], mask=mask, other=0.0)
        x = m * decay + g * lr
        cwt = tl.load(cw_ptr + rw[None, :] * W + rw[:, None])
        y = tl.dot(x, cwt, input_precision=PREC)
        tl.store(bad_ptr + q, tl.sum(_non_finite(y), 1), mask=ok)
        key = _topk_keys(y, rw[None, :].to(tl.int64), W)
        for e in tl.static_range(K):
            best = tl.max(key, 1)
            i, v = _unkey(best, W)
            key = tl.where(key == best[:, None], -1, key)
            tl.store(idx_ptr + q * K + e, i, mask=ok)
            tl.store(val_ptr + q * K + e, v, mask=ok)
            x = x - v[:, None] * tl.load(cw_ptr + i[:, None] * W + rw[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + q[:, None] * W + rw[None, :], x, mask=mask)

    @triton.jit
    def _decode_rows_kernel(idx_ptr, coef_ptr, cw_ptr, out_ptr, n_chunks,
                            p_delta_ptr, c_param_ptr, c_off_ptr, lr, wdm,
                            W: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RMS: tl.constexpr,
                            APPLY: tl.constexpr):
        """`_decode_kernel` for 1 x W chunks: R chunks per program."""
        q = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        ok = q < n_chunks
        rw = tl.arange(0, W)
        mask = ok[:, None]
        x = tl.zeros((R, W), dtype=tl.float32)
        for e in range(E):
            i = tl.load(idx_ptr + q * E + e, mask=ok, other=0)
            c = tl.load(coef_ptr + q * E + e, mask=ok, other=0.0)
            x = x + c[:, None] * tl.load(cw_ptr + i[:, None] * W + rw[None, :], mask=mask, other=0.0)
        if RMS:
            rms = tl.sqrt(tl.sum(x * x, 1) / W)[:, None]
            u = tl.where(rms > 0, x / tl.maximum(rms, 1e-30), 0.0)
        else:
            u = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
        if APPLY:
            base = (tl.load(p_delta_ptr + tl.load(c_param_ptr + q, mask=ok, other=0), mask=ok, other=0)
                    + tl.load(c_off_ptr + q, mask=ok, other=0))
            addr = out_ptr + base[:, None] + rw[None, :]
            tl.store(addr, tl.load(addr, mask=mask, other=0.0) * wdm - lr * u, mask=mask)
        else:
            tl.store(out_ptr + q[:, None] * W + rw[None, :], u.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _apply_kernel(u_ptr, p_ptr, p_delta_ptr, c_param_ptr, c_off_ptr, c_stride_ptr, n_rows, lr, wdm,
                      H: tl.constexpr, W: tl.constexpr, R: tl.constexpr):
        """p <- p * wdm - lr * u for R tile rows of a group, written straight into the parameters."""
        q = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        ok = q < n_rows
        c = q // H
        base = (tl.load(p_delta_ptr + tl.load(c_param_ptr + c, mask=ok, other=0), mask=ok, other=0)
                + tl.load(c_off_ptr + c, mask=ok, other=0) + (q % H) * tl.load(c_stride_ptr + c, mask=ok, other=0))
        rw = tl.arange(0, W)
        mask = ok[:, None]
        u = tl.load(u_ptr + q[:, None] * W + rw[None, :], mask=mask, other=0.0).to(tl.float32)
        addr = p_ptr + base[:, None] + rw[None, :]
        p = tl.load(addr, mask=mask, other=0.0)
        tl.store(addr, p * wdm - lr * u, mask=mask)


    @triton.jit
    def _read_bits(base, pos, BITS: tl.constexpr, nbytes, live):
        """The BITS-bit little-endian field at bit `pos` of a byte section (BITS <= 25: four bytes hold it);
        bytes at or past `nbytes` read as 0."""
        b = pos >> 3
        w = tl.zeros(pos.shape, dtype=tl.int64)
        for j in tl.static_range(4):
            w = w | (tl.load(base + b + j, mask=live & (b + j < nbytes), other=0).to(tl.int64) << (8 * j))
        return (w >> (pos & 7)) & ((1 << BITS) - 1)

    @triton.jit
    def _pack_field(src_ptr, out_ptr, start, nbytes, nvals, BITS: tl.constexpr, MODE: tl.constexpr,
                    K: tl.constexpr, BLOCK: tl.constexpr):
        """Bytes [start, start + BLOCK) of one bit-packed field array: MODE 0 the int values at src, 1 the
        count of nonzero floats in each row of K at src, 2 the sign bits (x < 0) of the floats at src."""
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        ok = j < nbytes
        byte = tl.zeros((BLOCK,), dtype=tl.int32)
        for t in tl.static_range(8):
            q = (j * 8 + t) // BITS      # the field this bit belongs to, and the bit within it
            r = ((j * 8 + t) % BITS).to(tl.int32)
            live = ok & (q < nvals)
            if MODE == 0:
                v = tl.load(src_ptr + q, mask=live, other=0).to(tl.int32)
            elif MODE == 1:
                v = tl.zeros((BLOCK,), dtype=tl.int32)
                for e in tl.static_range(K):
                    v += (tl.load(src_ptr + q * K + e, mask=live, other=0.0) != 0).to(tl.int32)
            else:
                v = (tl.load(src_ptr + q, mask=live, other=0.0) < 0).to(tl.int32)
            byte = byte | (((v >> r) & 1) << t)
        tl.store(out_ptr + j, byte.to(tl.uint8), mask=ok)

    @triton.jit
    def _pack_kernel(idx_ptr, val_ptr, out_ptr, N, IB, CB, NB, PI, PC,
                     K: tl.constexpr, IBITS: tl.constexpr, CBITS: tl.constexpr, BLOCK: tl.constexpr):
        """One sign-payload group section, `codec.Sections.pack`'s bytes: the first PI programs write the
        indices, the next PC the nonzero counts, the rest the signs."""
        pid = tl.program_id(0)
        if pid < PI:
            _pack_field(idx_ptr, out_ptr, pid * BLOCK, IB, N * K, IBITS, 0, K, BLOCK)
        elif pid < PI + PC:
            _pack_field(val_ptr, out_ptr + IB, (pid - PI) * BLOCK, CB, N, CBITS, 1, K, BLOCK)
        else:
            _pack_field(val_ptr, out_ptr + IB + CB, (pid - PI - PC) * BLOCK, NB - IB - CB, N * K, 1, 2, K, BLOCK)

    @triton.jit
    def _unpack_kernel(sec_ptr, row_stride, idx_ptr, val_ptr, mask_ptr, flag_ptr, N, IB, CB, NB, NUMEL,
                       K: tl.constexpr, KP: tl.constexpr, IBITS: tl.constexpr, CBITS: tl.constexpr,
                       BLOCK: tl.constexpr):
        """`codec.Sections.unpack` of a sign-payload group for BLOCK chunks of one rank's section: indices
        (clamped), values, weight masks, and the rank's check flags raised with atomic max (count above k,
        index out of range, duplicate index in a chunk)."""
        r = tl.program_id(1).to(tl.int64)
        n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        e = tl.arange(0, KP)
        live_n = n < N
        live = live_n[:, None] & (e[None, :] < K)
        base = sec_ptr + r * row_stride
        q = n[:, None] * K + e[None, :]
        idx = _read_bits(base, q * IBITS, IBITS, IB, live)
        cnt = _read_bits(base + IB, n * CBITS, CBITS, CB, live_n)
        sgn = _read_bits(base + IB + CB, q, 1, NB - IB - CB, live)
        m = (e[None, :] < cnt[:, None]).to(tl.float32)
        out = r * N * K + q
        tl.store(idx_ptr + out, tl.minimum(idx, NUMEL - 1), mask=live)
        tl.store(val_ptr + out, (1.0 - 2.0 * sgn.to(tl.float32)) * m, mask=live)
        tl.store(mask_ptr + out, m, mask=live)
        bad_cnt = tl.max((live_n & (cnt > K)).to(tl.int32), 0)
        bad_rng = tl.max(tl.max((live & (idx >= NUMEL)).to(tl.int32), 1), 0)
        same = ((idx[:, :, None] == idx[:, None, :]) & (e[:, None] < e[None, :])[None, :, :]
                & live[:, :, None] & live[:, None, :])
        bad_dup = tl.max(tl.max(tl.max(same.to(tl.int32), 2), 1), 0)
        tl.atomic_max(flag_ptr + r * 3, bad_cnt)
        tl.atomic_max(flag_ptr + r * 3 + 1, bad_rng)
        tl.atomic_max(flag_ptr + r * 3 + 2, bad_dup)

    @triton.jit
    def _byte_sums_kernel(buf_ptr, row_stride, part_ptr, start, nbytes, S, BLOCK: tl.constexpr):
        """The checksum's partial sums: part[r, s] = sum of (byte_i + 1) * (i mod 65521 + 1) over the bytes i
        of row r in [start + s * BLOCK, start + (s + 1) * BLOCK) (integer math: the same on every device)."""
        s = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1).to(tl.int64)
        i = start + s * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        live = i < nbytes
        b = tl.load(buf_ptr + r * row_stride + i, mask=live, other=0).to(tl.int64)
        tl.store(part_ptr + r * S + s, tl.sum(tl.where(live, (b + 1) * (i % 65521 + 1), 0), 0))

    @triton.jit
    def _sum_parts(part_ptr, S, SB: tl.constexpr):
        acc = tl.zeros((SB,), dtype=tl.int64)
        for j in range(0, S, SB):
            q = j + tl.arange(0, SB)
            acc += tl.load(part_ptr + q, mask=q < S, other=0)
        return tl.sum(acc, 0)

    @triton.jit
    def _field(b, pos, OFF: tl.constexpr, N: tl.constexpr):
        """The little-endian integer in header bytes [OFF, OFF + N) of `b` (the 32 bytes as int64)."""
        inside = (pos >= OFF) & (pos < OFF + N)
        return tl.sum(tl.where(inside, b << ((8 * (pos - OFF)) & 63), 0), 0)

    @triton.jit
    def _header_sum(b, pos):
        """The checksum's part over the header's first 28 bytes (the checksum field itself weighs 0)."""
        return tl.sum(tl.where(pos < 28, (b + 1) * (pos + 1), 0), 0)

    @triton.jit
    def _header_check_kernel(buf_ptr, row_stride, part_ptr, S, step_ptr, w64_ptr, ok_ptr, nbytes, magic,
                             max_weight, HAS_STEP: tl.constexpr, C: tl.constexpr, SB: tl.constexpr):
        """`codec.Sections.header_flags` for row r: the weight (float64) and C ok flags (int8 0/1), in the
        order of `Framing.header_reasons`."""
        r = tl.program_id(0).to(tl.int64)
        pos = tl.arange(0, 32).to(tl.int64)
        b = tl.load(buf_ptr + r * row_stride + pos).to(tl.int64)
        bad_magic = tl.sum(((pos < 4) & (b != ((magic >> ((8 * pos) & 63)) & 255))).to(tl.int32), 0)
        total = (_sum_parts(part_ptr + r * S, S, SB) + _header_sum(b, pos)) & 0xFFFFFFFF
        w = _field(b, pos, 16, 8).to(tl.float64, bitcast=True)
        nan = w != w
        out = ok_ptr + r * C
        tl.store(out, (bad_magic == 0).to(tl.int8))
        tl.store(out + 1, (_field(b, pos, 4, 4) == r).to(tl.int8))
        tl.store(out + 2, (_field(b, pos, 24, 4) == nbytes).to(tl.int8))
        tl.store(out + 3, (_field(b, pos, 28, 4) == total).to(tl.int8))
        tl.store(out + 4, (~nan).to(tl.int8))
        tl.store(out + 5, ((tl.abs(w) != float("inf")) | nan).to(tl.int8))
        tl.store(out + 6, ((w > 0) | nan).to(tl.int8))
        tl.store(out + 7, (~(w > max_weight)).to(tl.int8))
        if HAS_STEP:
            tl.store(out + 8, (_field(b, pos, 8, 8) == tl.load(step_ptr)).to(tl.int8))
        tl.store(w64_ptr + r, w)

    @triton.jit
    def _seal_kernel(buf_ptr, part_ptr, S, bad_ptr, n_bad, step_ptr, w_ptr, ok_ptr, rank, nbytes, magic,
                     SB: tl.constexpr, BB: tl.constexpr):
        """`codec.Sections.seal`: the header (the weight NaN where a `bad` count is nonzero) and the checksum
        (the sections' part from `_byte_sums_kernel`), one program."""
        nb = tl.zeros((BB,), dtype=tl.int32)
        for j in range(0, n_bad, BB):
            q = j + tl.arange(0, BB)
            nb += (tl.load(bad_ptr + q, mask=q < n_bad, other=0) != 0).to(tl.int32)
        ok = tl.sum(nb, 0) == 0
        wbits = tl.where(ok, tl.load(w_ptr).to(tl.int64, bitcast=True), 0x7FF8000000000000)  # torch's NaN
        step = tl.load(step_ptr)
        pos = tl.arange(0, 32).to(tl.int64)
        sh = 8 * pos
        b = tl.where(pos < 4, magic >> (sh & 63),
                     tl.where(pos < 8, rank >> ((sh - 32) & 63),
                              tl.where(pos < 16, step >> ((sh - 64) & 63),
                                       tl.where(pos < 24, wbits >> ((sh - 128) & 63),
                                                tl.where(pos < 28, nbytes >> ((sh - 192) & 63), 0))))) & 255
        total = (_sum_parts(part_ptr, S, SB) + _header_sum(b, pos)) & 0xFFFFFFFF
        b = tl.where(pos < 28, b, (total >> ((sh - 224) & 63)) & 255)
        tl.store(buf_ptr + pos, b.to(tl.uint8))
        tl.store(ok_ptr, ok.to(tl.int8))

    @triton.jit
    def _consensus_kernel(idx_ptr, val_ptr, mask_ptr, w_ptr, fidx_ptr, coef_ptr, N,
                          K: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, BLOCK: tl.constexpr):
        """`demo.pairwise_mean` and the `[N, W*k]` flat indices for BLOCK chunks: per pick e (rank e // K, slot
        e % K), the weighted mean of the picks of its chunk with its index, at its first occurrence; 0 at
        repeats and where no weight. The sums run over the picks in a fixed order."""
        n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        e = tl.arange(0, EP)
        live_n = n < N
        live = live_n[:, None] & (e < E)[None, :]
        src = (e // K).to(tl.int64)[None, :] * (N * K) + n[:, None] * K + (e % K)[None, :]
        i = tl.load(idx_ptr + src, mask=live, other=-1)
        num = tl.zeros((BLOCK, EP), dtype=tl.float32)
        den = tl.zeros((BLOCK, EP), dtype=tl.float32)
        first = live
        for e2 in tl.static_range(E):
            at = (e2 // K) * (N * K) + n * K + (e2 % K)
            w2 = tl.load(w_ptr + e2 // K)
            i2 = tl.load(idx_ptr + at, mask=live_n, other=-2)
            v2 = tl.load(val_ptr + at, mask=live_n, other=0.0) * w2
            m2 = tl.load(mask_ptr + at, mask=live_n, other=0.0) * w2
            same = i == i2[:, None]
            num += tl.where(same, v2[:, None], 0.0)
            den += tl.where(same, m2[:, None], 0.0)
            first = first & ~(same & (e > e2)[None, :])
        coef = tl.where(first & (den > 0), tl.math.div_rn(num, tl.maximum(den, 1.1754943508222875e-38)), 0.0)
        out = n[:, None] * E + e[None, :]
        tl.store(fidx_ptr + out, i, mask=live)
        tl.store(coef_ptr + out, coef, mask=live)

class TileTable:
    """Where every chunk of a group lives inside parameter-shaped tensors (gradients, parameters), as offsets.

    Per chunk: its parameter, the offset of its tile in that parameter, the parameter's row length. The
    same table serves the gradients and the parameters; where those tensors are is `Addresses`' job.
    """

    def __init__(self, slots, device):
        params, offs, strides = [], [], []
        for s in slots:
            a = torch.arange(s.rows // s.h, dtype=torch.int64)[:, None] * (s.h * s.cols)
            b = torch.arange(s.cols // s.w, dtype=torch.int64)[None, :] * s.w
            offs.append((a + b).reshape(-1))
            params.append(torch.full((s.n_chunks,), s.index, dtype=torch.int32))
            strides.append(torch.full((s.n_chunks,), s.cols, dtype=torch.int64))
        self.n_chunks = sum(s.n_chunks for s in slots)
        self.c_param = torch.cat(params).to(device)
        self.c_off = torch.cat(offs).to(device)
        self.c_stride = torch.cat(strides).to(device)

    @classmethod
    def chunk_layout(cls, n_chunks: int, h: int, w: int, device) -> "TileTable":
        """The table of chunks already laid out back to back (`[N, h, w]`, one tensor): chunk n at offset
        n * h * w, rows of w. What `compression.hierarchy` hands the kernels: its shard of a gathered gradient."""
        t = cls.__new__(cls)
        t.n_chunks = n_chunks
        t.c_param = torch.zeros(n_chunks, dtype=torch.int32, device=device)
        t.c_off = torch.arange(n_chunks, dtype=torch.int64, device=device) * (h * w)
        t.c_stride = torch.full((n_chunks,), w, dtype=torch.int64, device=device)
        return t


class Addresses:
    """Each tensor's address relative to the first one's (the kernels' base pointer), in elements, on the
    device: one instance per set of tensors (the gradients; the parameters), shared by every group.

    Re-sent only when an address changed (the caching allocator usually hands `zero_grad(set_to_none=True)`'s
    fresh gradients the same memory as last step). The tensors must be float32 and contiguous: the caller
    checks.
    """

    def __init__(self, device):
        self.device = device
        self._ptrs: list[int] | None = None
        self._deltas: torch.Tensor | None = None

    def deltas(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        ptrs = [t.data_ptr() for t in tensors]
        if ptrs != self._ptrs:
            base = ptrs[0]
            if any((q - base) % 4 for q in ptrs):
                raise ValueError("fused kernels: tensors are not 4-byte aligned relative to each other")
            self._deltas = to_device(torch.tensor([(q - base) // 4 for q in ptrs], dtype=torch.int64), self.device)
            self._ptrs = ptrs
        return self._deltas


# registers per thread of the 2-D encode kernel: Triton's choice (184 for 64x64 chunks) fits 2 programs of 4
# warps on an SM; 168 fits 3 without spilling (65536 registers per SM on every CUDA GPU since Kepler), and the
# third program hides memory latency the two leave exposed. 128 would fit 4 but spills, which costs more than
# the fourth hides. Larger chunks keep Triton's choice (a cap would only add spills). Timings of each choice:
# docs/BENCHMARKS.md (compression, encode kernel variants).
ENCODE_MAXNREG = 168


def fused_encode(m: torch.Tensor, out: torch.Tensor, grads: list[torch.Tensor], deltas: torch.Tensor,
                 table: TileTable, ch: torch.Tensor, cw: torch.Tensor, k: int, decay: float, lr: float,
                 precision: str = "tf32x3", bad: torch.Tensor | None = None):
    """out = residual of (decay * m + lr * grad) after its top-k DCT picks; m ([N, h, w]) is not modified.
    `deltas` = `Addresses.deltas(grads)`.

    Returns (indices [N, k] int64, values [N, k] float32 sorted by |value| descending, bad [N] int32 = the
    count of non-finite coefficients per chunk; written into `bad` when given, e.g. a slice of one buffer of
    every group's counts that `Sections.seal` reads).
    """
    N, h, w = m.shape
    idx = torch.empty(N, k, dtype=torch.int64, device=m.device)
    val = torch.empty(N, k, dtype=torch.float32, device=m.device)
    bad = torch.empty(N, dtype=torch.int32, device=m.device) if bad is None else bad
    with _launch:
        if h == 1:
            _encode_rows_kernel[(triton.cdiv(N, ROWS),)](
                m, out, grads[0], deltas, table.c_param, table.c_off, cw, idx, val, bad, N,
                float(decay), float(lr), W=w, K=k, R=ROWS, PREC=precision, num_warps=4)
        else:
            _encode_kernel[(N,)](m, out, grads[0], deltas, table.c_param, table.c_off, table.c_stride,
                                 ch, cw, idx, val, bad, float(decay), float(lr), H=h, W=w, K=k, PREC=precision,
                                 num_warps=4,
                                 **({} if INTERPRET or h * w > 4096 else {"maxnreg": ENCODE_MAXNREG}))
    return idx, val, bad


DECODE_WARPS = 2   # warps per 2-D chunk program of the decode kernels: more are no faster (docs/BENCHMARKS.md)


def fused_decode(idx: torch.Tensor, coef: torch.Tensor, ch: torch.Tensor, cw: torch.Tensor, out: torch.Tensor,
                 rms: bool = False) -> torch.Tensor:
    """out[n] = sign (or x / rms(x)) of idct(sparse coefficients `coef` at flat positions `idx`, both [N, E])."""
    _decode(idx, coef, ch, cw, out, out.shape[0], rms, apply=False, deltas=out, table=None, lr=0.0, wdm=1.0)
    return out


def fused_decode_apply(idx: torch.Tensor, coef: torch.Tensor, ch: torch.Tensor, cw: torch.Tensor,
                       params: list[torch.Tensor], deltas: torch.Tensor, table: TileTable, lr: float, wdm: float,
                       rms: bool = False) -> None:
    """`fused_decode` then `fused_apply` in one pass, the update never written: p <- p * wdm - lr * u for
    every chunk of a group (`table`; `deltas` = `Addresses.deltas(params)`). The same bits as the two
    kernels: the same sum, and the update dtype (bf16 for signs, fp32 for `rms`) holds u exactly."""
    _decode(idx, coef, ch, cw, params[0], table.n_chunks, rms, apply=True, deltas=deltas, table=table, lr=lr, wdm=wdm)


def _decode(idx, coef, ch, cw, out, N, rms, apply, deltas, table, lr, wdm):
    """Launch the decode kernel of the group's chunk shape; `out` is the update buffer, or with `apply`
    the first parameter (the base of `deltas`)."""
    h, w, E = ch.shape[0], cw.shape[0], idx.shape[1]
    idx, coef = idx.contiguous(), coef.to(torch.float32).contiguous()
    c_param, c_off, c_stride = (table.c_param, table.c_off, table.c_stride) if apply else (out, out, out)
    with _launch:
        if h == 1:
            _decode_rows_kernel[(triton.cdiv(N, ROWS),)](idx, coef, cw, out, N, deltas, c_param, c_off,
                                                         float(lr), float(wdm), W=w, E=E, R=ROWS, RMS=bool(rms),
                                                         APPLY=apply, num_warps=4)
        else:
            _decode_kernel[(N,)](idx, coef, ch, cw, out, deltas, c_param, c_off, c_stride, float(lr), float(wdm),
                                 H=h, W=w, E=E, RMS=bool(rms), APPLY=apply,
                                 num_warps=DECODE_WARPS if h * w >= 4096 else 4)


def fused_apply(update: torch.Tensor, params: list[torch.Tensor], deltas: torch.Tensor, table: TileTable,
                lr: float, wdm: float) -> None:
    """p <- p * wdm - lr * u for every chunk of one group (`update` [N, h, w]), in the parameters themselves."""
    N, h, w = update.shape
    rows = N * h
    with _launch:
        _apply_kernel[(triton.cdiv(rows, APPLY_ROWS),)](update, params[0], deltas, table.c_param,
                                                        table.c_off, table.c_stride, rows, float(lr), float(wdm),
                                                        H=h, W=w, R=APPLY_ROWS, num_warps=4)


PACK_BLOCK = 512  # payload bytes per program of the pack kernel


class TritonSections(Sections):
    """`codec.Sections` for sign payloads (value_bits 1) in one kernel per group and direction: the ~25
    torch ops of bit packing, and the ~30 of unpacking and checking, per group per step, become one launch
    each. Same bytes, indices, values, masks and flags as the torch ops (tested); the indices are always
    clamped. Groups with bf16 values, more than 32 picks or fields wider than 24 bits stay on torch.
    The header, its checksum and its checks (~20 torch ops to seal, ~35 to check, whatever the payload's size)
    take two kernels each way: the checksum's partial sums over blocks of the payload, then one program per
    payload for the header fields."""

    def takes(self, spec: GroupSpec) -> bool:
        return spec.value_bits == 1 and spec.k <= 32 and spec.index_bits <= 24 and spec.count_bits <= 24

    def pack(self, idx, val, spec, out) -> None:
        with _launch:
            pi, pc = triton.cdiv(spec.index_bytes, PACK_BLOCK), triton.cdiv(spec.count_bytes, PACK_BLOCK)
            ps = triton.cdiv(spec.value_bytes, PACK_BLOCK)
            _pack_kernel[(pi + pc + ps,)](
                idx.contiguous(), val.contiguous(), out, spec.n_chunks, spec.index_bytes, spec.count_bytes,
                spec.nbytes, pi, pc, K=spec.k, IBITS=spec.index_bits, CBITS=spec.count_bits, BLOCK=PACK_BLOCK,
                num_warps=4)

    def unpack(self, sec, spec, validate, clamp):
        W, N, k, dev = sec.shape[0], spec.n_chunks, spec.k, sec.device
        if sec.stride(1) != 1:
            sec = sec.contiguous()
        idx = torch.empty(W, N, k, dtype=torch.int64, device=dev)
        vals = torch.empty(W, N, k, dtype=torch.float32, device=dev)
        mask = torch.empty_like(vals)
        flags = torch.zeros(W, 3, dtype=torch.int32, device=dev)
        kp = max(2, triton.next_power_of_2(k))
        block = max(1, min(256, 4096 // (kp * kp)))
        with _launch:
            _unpack_kernel[(triton.cdiv(N, block), W)](
                sec, sec.stride(0), idx, vals, mask, flags, N, spec.index_bytes, spec.count_bytes, spec.nbytes,
                spec.numel, K=k, KP=kp, IBITS=spec.index_bits, CBITS=spec.count_bits, BLOCK=block, num_warps=4)
        return idx, vals, mask, (flags == 0) if validate else None

    def seal(self, framing, buf, rank, step, weight, bad=None):
        dev = buf.device
        step = step if isinstance(step, torch.Tensor) else torch.full((), int(step), dtype=torch.int64, device=dev)
        weight = weight if isinstance(weight, torch.Tensor) else torch.full((), float(weight), dtype=torch.float64,
                                                                           device=dev)
        bad = self._no_bad(dev) if bad is None else bad.reshape(-1)
        S = triton.cdiv(framing.nbytes - HEADER_BYTES, SUM_BLOCK)
        part = torch.empty(max(S, 1), dtype=torch.int64, device=dev)
        ok = torch.empty((), dtype=torch.int8, device=dev)
        with _launch:
            if S:
                _byte_sums_kernel[(S, 1)](buf, buf.numel(), part, HEADER_BYTES, framing.nbytes, S, BLOCK=SUM_BLOCK,
                                          num_warps=4)
            _seal_kernel[(1,)](buf, part, S, bad, bad.numel(), step.to(torch.int64), weight.to(torch.float64), ok,
                               int(rank), framing.nbytes, _magic(framing), SB=256, BB=1024, num_warps=4)
        return ok.view(torch.bool)

    def header_flags(self, framing, gathered, step):
        W, dev = gathered.shape[0], gathered.device
        if gathered.stride(1) != 1:
            gathered = gathered.contiguous()
        has_step = step is not None
        if has_step and not isinstance(step, torch.Tensor):
            step = torch.full((), int(step), dtype=torch.int64, device=dev)
        C = len(framing.header_reasons(has_step))
        S = triton.cdiv(framing.nbytes - HEADER_BYTES, SUM_BLOCK)
        part = torch.empty(W, max(S, 1), dtype=torch.int64, device=dev)
        w64 = torch.empty(W, dtype=torch.float64, device=dev)
        ok = torch.empty(W, C, dtype=torch.int8, device=dev)
        with _launch:
            if S:
                _byte_sums_kernel[(S, W)](gathered, gathered.stride(0), part, HEADER_BYTES, framing.nbytes, S,
                                          BLOCK=SUM_BLOCK, num_warps=4)
            _header_check_kernel[(W,)](gathered, gathered.stride(0), part, S, step if has_step else w64, w64, ok,
                                       framing.nbytes, _magic(framing), float(MAX_WEIGHT), HAS_STEP=has_step, C=C,
                                       SB=256, num_warps=4)
        return w64, ok.view(torch.bool)

    @staticmethod
    def _no_bad(dev) -> torch.Tensor:
        if str(dev) not in _NO_BAD:
            _NO_BAD[str(dev)] = torch.zeros(1, dtype=torch.int32, device=dev)
        return _NO_BAD[str(dev)]


SUM_BLOCK = 4096   # payload bytes per program of the checksum's partial sums
_NO_BAD: dict[str, torch.Tensor] = {}


def _magic(framing) -> int:
    return int.from_bytes(framing.magic, "little")


def fused_consensus(idx: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[W, N, k]` picks of every rank (indices, values, weight masks), `[W]` float32 weights -> (flat indices
    `[N, W*k]`, the weighted mean of each pick, `demo.pairwise_mean`'s layout) in one kernel. For W*k up to
    `demo.PAIRWISE_MAX_PICKS`."""
    W, N, k = idx.shape
    E = W * k
    EP = max(2, triton.next_power_of_2(E))
    block = max(1, min(64, 1024 // EP))
    fidx = torch.empty(N, E, dtype=idx.dtype, device=idx.device)
    coef = torch.empty(N, E, dtype=torch.float32, device=idx.device)
    with _launch:
        _consensus_kernel[(triton.cdiv(N, block),)](idx.contiguous(), vals.contiguous(), mask.contiguous(),
                                                    weights.to(torch.float32).contiguous(), fidx, coef, N,
                                                    K=k, E=E, EP=EP, BLOCK=block, num_warps=4)
    return fidx, coef
