"""The DeMo wire format: bit packing, one payload per worker per step, validation of received payloads.

Owns: `Framing` (the header, checksum and header checks every payload kind shares; DiLoCo's `DeltaWire`
builds on it too), `WireFormat` (layout, `encode`, `decode`), `Sections` (how a group's section is packed and
unpacked; torch ops here, one Triton kernel each way in `compression.kernels`), `pack_bits`/`unpack_bits`,
`PayloadError`.
Promises:
- a payload's size depends only on the model's chunk groups, `topk` and `value_bits` (so it goes through
  an all-gather of fixed-size uint8 buffers);
- `decode` never returns data from a payload that fails a check: it raises `PayloadError(sender_rank,
  reason)` naming the lowest bad rank, and every replica (same bytes) raises the same error;
- everything runs on the payload's device; validation costs one device->host copy of a few flags;
- a payload's weight is the number of tokens its sender trained on: it must be finite, > 0 and at most
  `MAX_WEIGHT` (a NaN weight is a sender abstaining: it failed before the exchange and took part only so
  nobody waits for it; its payload is refused like any other bad one, with that reason);
- given the step a decode is for (`step`), a payload whose header carries another step (a stale or
  replayed payload) is refused, naming its sender.

Layout (little endian), header then one section per chunk group in plan order:
    magic  b"DMO1" | sender rank u32 | step i64 | weight f64 | total length u32 | checksum u32   (32 bytes)
    per group: indices (N*k values of `index_bits` = ceil(log2(h*w)) bits, bit-packed)
               [1-bit only] per-chunk count of nonzero picks (ceil(log2(k+1)) bits): picks past it are ignored,
                            so an all-zero chunk is never sent as +-1
               values: N*k sign bits (1 = negative) or N*k bfloat16
The checksum is sum_i (byte_i + 1) * (i mod 65521 + 1) mod 2^32 over every byte but the checksum field
(position weighted, so flips and swaps are caught; computed with integer ops on device, not cryptographic).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

MAGIC = b"DMO1"
HEADER_BYTES = 32
_HEADER = struct.Struct("<4sIqdII")
assert _HEADER.size == HEADER_BYTES
# The largest weight (tokens trained on by one rank since its last payload) a payload may carry: 2^40 tokens
# is 4 TiB of int32 token ids, more than any step can hold, and keeps weight x value sums far inside float32
# (a weight of 1e300 became inf in the float32 consensus and zeroed the update on every replica).
MAX_WEIGHT = 2.0 ** 40


class PayloadError(RuntimeError):
    """A received payload failed validation; it was not applied. `sender_rank` -1 means 'not attributable'."""

    def __init__(self, sender_rank: int, reason: str):
        super().__init__(f"payload from rank {sender_rank} rejected: {reason}")
        self.sender_rank = sender_rank
        self.reason = reason

    def __reduce__(self):  # picklable across Ray
        return (PayloadError, (self.sender_rank, self.reason))


_CONST: dict[tuple, torch.Tensor] = {}


def _const(name: str, device, make) -> torch.Tensor:
    """Small constant tensors, built once per device (saves a host->device copy per use on CUDA)."""
    key = (name, str(device))
    if key not in _CONST:
        _CONST[key] = make().to(device)
    return _CONST[key]


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on `device` without stalling the host: on CUDA through pinned memory and an
    asynchronous copy (a pageable copy would wait for every kernel queued before it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _shifts(n: int, device, dtype=torch.int32) -> torch.Tensor:
    return _const(f"shifts{n}{dtype}", device, lambda: torch.arange(n, dtype=dtype))


def pack_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative ints `x` (any shape, each < 2**bits) -> uint8, little-endian bit order, zero padded."""
    shifts = _shifts(bits, x.device)
    b = ((x.reshape(-1, 1).to(torch.int32) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-b.numel()) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    weights = _const("byteweights", x.device, lambda: (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8))
    return (b.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(u8: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits` over the last dim: `[..., nbytes]` uint8 -> `[..., count]` int64."""
    lead = u8.shape[:-1]
    shifts = _shifts(8, u8.device)
    b = ((u8.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(*lead, -1)[..., :count * bits]
    weights = 1 << _shifts(bits, u8.device, torch.int64)
    return (b.reshape(*lead, count, bits).to(torch.int64) * weights).sum(-1)


def packed_copy(rows: torch.Tensor) -> torch.Tensor:
    """A packed copy (row stride = row length), so the bytes can be reinterpreted as wider dtypes.

    `.contiguous()` is not enough: a [1, n] slice counts as contiguous while keeping the parent's stride.
    """
    return torch.empty(rows.shape, dtype=rows.dtype, device=rows.device).copy_(rows)


def _u32_from_bytes(rows: torch.Tensor) -> torch.Tensor:
    """[W, 4] uint8 -> [W] int64 (little endian), without reinterpreting memory (alignment/endianness safe)."""
    shifts = _const("u32", rows.device, lambda: torch.tensor([0, 8, 16, 24], dtype=torch.int64))
    return (rows.to(torch.int64) << shifts).sum(-1)


def _u32_to_bytes(v: torch.Tensor) -> torch.Tensor:
    shifts = _const("u32", v.device, lambda: torch.tensor([0, 8, 16, 24], dtype=torch.int64))
    return ((v.reshape(-1, 1) >> shifts) & 255).to(torch.uint8).reshape(-1)


@dataclass(frozen=True)
class GroupSpec:
    """Wire layout of one chunk group: N chunks of `numel` coefficients, k picks per chunk."""
    n_chunks: int
    numel: int
    k: int
    value_bits: int

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.numel)))

    @property
    def count_bits(self) -> int:
        return self.k.bit_length() if self.value_bits == 1 else 0

    @property
    def index_bytes(self) -> int:
        return math.ceil(self.n_chunks * self.k * self.index_bits / 8)

    @property
    def count_bytes(self) -> int:
        return math.ceil(self.n_chunks * self.count_bits / 8)

    @property
    def value_bytes(self) -> int:
        return math.ceil(self.n_chunks * self.k / 8) if self.value_bits == 1 else self.n_chunks * self.k * 2

    @property
    def nbytes(self) -> int:
        return self.index_bytes + self.count_bytes + self.value_bytes


class Framing:
    """The 32-byte header every payload kind starts with, its checksum, and the checks of a gathered batch.

    `magic` tells payload kinds apart (b"DMO1": DeMo picks, b"DLC1": DiLoCo int8 deltas); the rest of the
    layout is the subclass's. Validation runs on device and leaves one flag per (rank, check).
    """

    magic = MAGIC

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        if self.nbytes >= 2**32:
            raise ValueError(f"payload of {self.nbytes} bytes does not fit the u32 length field")
        self._pos_weights: dict[str, torch.Tensor] = {}

    # ---- checksum --------------------------------------------------------------------------------
    def _weights(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._pos_weights:
            w = torch.arange(self.nbytes, dtype=torch.int64) % 65521 + 1
            w[28:32] = 0  # the checksum field itself
            self._pos_weights[key] = w.to(device)
        return self._pos_weights[key]

    def checksum(self, bufs: torch.Tensor) -> torch.Tensor:
        """[W, nbytes] uint8 -> [W] int64 checksums (exact integer arithmetic: same on every device)."""
        return ((bufs.to(torch.int64) + 1) * self._weights(bufs.device)).sum(-1) & 0xFFFFFFFF

    def seal(self, buf: torch.Tensor) -> torch.Tensor:
        """Write the checksum of a (possibly edited) payload into its header, in place; returns it."""
        buf[28:32] = _u32_to_bytes(self.checksum(buf.unsqueeze(0)))
        return buf

    def header(self, rank: int, step: int | torch.Tensor, weight: float | torch.Tensor, device) -> torch.Tensor:
        """The header bytes (checksum 0 until `seal`); `weight` may be a 0-d float64 device tensor, `step` a 0-d
        int64 one: then no host bytes are copied (the fixed fields come from a cached device template), so a
        CUDA graph can capture the encode and replay it with the step and weight it reads at replay."""
        if isinstance(step, torch.Tensor):
            template = _const(f"head{self.magic!r}/{rank}/{self.nbytes}", device, lambda: torch.frombuffer(
                bytearray(_HEADER.pack(self.magic, rank, 0, 0.0, self.nbytes, 0)), dtype=torch.uint8))
            head = template.clone()
            head[8:16] = step.to(device=device, dtype=torch.int64).reshape(1).view(torch.uint8)
        else:
            head = to_device(torch.frombuffer(bytearray(_HEADER.pack(self.magic, rank, step, 0.0, self.nbytes, 0)),
                                              dtype=torch.uint8), device)
        w = torch.as_tensor(weight, dtype=torch.float64, device=device).reshape(1)
        head[16:24] = w.view(torch.uint8)
        return head

    def header_reasons(self, has_step: bool) -> list[str]:
        """What each header check says when it fails, in the order of `Sections.header_flags`' columns."""
        return [f"bad magic (not a {self.magic.decode()} payload)",
                "sender rank field does not match its position in the all-gather",
                f"length field differs from the expected {self.nbytes} bytes",
                "checksum mismatch",
                "abstained (NaN weight: the sender failed before the exchange)",
                "weight is infinite",
                "weight is not > 0 (a payload's weight is the tokens its sender trained on)",
                f"weight above {MAX_WEIGHT:.0f} (2^40 tokens: more than any step holds)",
                ] + (["header step differs from this step (a stale or replayed payload)"] if has_step else [])

    def check_header(self, gathered: torch.Tensor, validate: bool, step: int | torch.Tensor | None = None,
                     sections: "Sections | None" = None) -> tuple[torch.Tensor, list]:
        """Shape check (raises), then (weights [W] float64, [(reason, ok [W] bool)] when `validate`).

        `step` (an int or a 0-d int64 tensor on the payloads' device, which a CUDA graph can read at replay):
        the step every header must carry; None skips that check. `sections` computes the flags (torch ops by
        default; `kernels.TritonSections`: two kernels for all of them)."""
        if gathered.dim() != 2 or gathered.shape[1] != self.nbytes:
            raise PayloadError(-1, f"gathered payloads have shape {tuple(gathered.shape)}, "
                                   f"expected [world_size, {self.nbytes}]")
        if not validate:
            W = gathered.shape[0]
            return packed_copy(gathered[:, 16:24]).view(torch.float64).reshape(W), []
        weights64, ok = (sections or TORCH_SECTIONS).header_flags(self, gathered, step)
        return weights64, [(reason, ok[:, c]) for c, reason in enumerate(self.header_reasons(step is not None))]

    @staticmethod
    def raise_first_failure(checks: list) -> None:
        """One host sync: raise `PayloadError` for the lowest bad rank and its first failed check."""
        if checks:
            Framing.raise_flags(torch.stack([c for _, c in checks], 1), [r for r, _ in checks])

    @staticmethod
    def raise_flags(ok: torch.Tensor, reasons: list[str]) -> None:
        """`ok` [W, checks] bool (on any device; one host sync) -> `PayloadError` for the lowest bad rank."""
        ok = ok.cpu()
        if not bool(ok.all()):
            bad_rank = int((~ok).any(1).nonzero()[0, 0])
            bad_check = int((~ok[bad_rank]).nonzero()[0, 0])
            raise PayloadError(bad_rank, reasons[bad_check])


class Sections:
    """How a payload's parts are written and read on device, with torch ops (any device): each chunk group's
    section (`pack`, `unpack`), and the header with its checksum (`seal`, `header_flags`).

    `compression.kernels.TritonSections` does the same for sign payloads in one kernel per group and
    direction on CUDA, and the header in two kernels each way; `takes(spec)` says which groups an
    implementation handles (the rest come here). Both give the same bytes, and the same indices, values,
    masks and check flags from them.
    """

    def seal(self, framing: "Framing", buf: torch.Tensor, rank: int, step: int | torch.Tensor,
             weight: float | torch.Tensor, bad: torch.Tensor | None = None) -> torch.Tensor:
        """Write the header and the checksum into `buf` (`[nbytes]` uint8, the sections already in place).
        `bad` (int counts of non-finite values, any shape): where one is nonzero the weight is written as NaN
        (the payload abstains; every receiver refuses it, nobody waits). Returns ok (0-d bool: nothing bad)."""
        ok = (bad == 0).all() if bad is not None else torch.ones((), dtype=torch.bool, device=buf.device)
        if bad is not None:
            weight = torch.as_tensor(weight, dtype=torch.float64, device=buf.device).masked_fill(~ok, float("nan"))
        buf[:HEADER_BYTES] = framing.header(rank, step, weight, buf.device)
        framing.seal(buf)
        return ok

    def header_flags(self, framing: "Framing", gathered: torch.Tensor, step: int | torch.Tensor | None):
        """`[W, nbytes]` payloads -> (weights [W] float64, ok [W, C] bool), one column per
        `framing.header_reasons(step is not None)`."""
        W, dev = gathered.shape[0], gathered.device
        weights64 = packed_copy(gathered[:, 16:24]).view(torch.float64).reshape(W)
        magic = _const(f"magic{framing.magic!r}", dev,
                       lambda: torch.frombuffer(bytearray(framing.magic), dtype=torch.uint8))
        nan = torch.isnan(weights64)
        cols = [(gathered[:, :4] == magic).all(1),
                _u32_from_bytes(gathered[:, 4:8]) == _shifts(W, dev, torch.int64),
                _u32_from_bytes(gathered[:, 24:28]) == framing.nbytes,
                _u32_from_bytes(gathered[:, 28:32]) == framing.checksum(gathered),
                ~nan,
                torch.isfinite(weights64) | nan,
                (weights64 > 0) | nan,
                ~(weights64 > MAX_WEIGHT)]
        if step is not None:
            steps = packed_copy(gathered[:, 8:16]).view(torch.int64).reshape(W)
            cols.append(steps == step)
        return weights64, torch.stack(cols, 1)

    def takes(self, spec: GroupSpec) -> bool:
        return True

    def pack(self, idx: torch.Tensor, val: torch.Tensor, spec: GroupSpec, out: torch.Tensor) -> None:
        """Write the group's section (`[N, k]` picks sorted by |value| descending) into `out`, uint8
        `[spec.nbytes]`."""
        parts = [pack_bits(idx, spec.index_bits)]
        if spec.value_bits == 1:
            parts += [pack_bits((val != 0).sum(1), spec.count_bits), pack_bits(val < 0, 1)]
        else:
            parts.append(val.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(-1))
        torch.cat(parts, out=out)

    def unpack(self, sec: torch.Tensor, spec: GroupSpec, validate: bool, clamp: bool):
        """`[W, spec.nbytes]` sections -> (indices [W, N, k] int64, values [W, N, k] float32, weight masks
        [W, N, k], ok [W, 3] bool or None): the checks of `WireFormat.check_reasons`, in that order.
        `clamp` clamps the indices into the chunk (implementations may always do it)."""
        W, N, k, dev = sec.shape[0], spec.n_chunks, spec.k, sec.device
        ib, cb = spec.index_bytes, spec.count_bytes
        idx = unpack_bits(sec[:, :ib], spec.index_bits, N * k).view(W, N, k)
        if spec.value_bits == 1:
            counts = unpack_bits(sec[:, ib:ib + cb], spec.count_bits, N).view(W, N, 1)
            signs = unpack_bits(sec[:, ib + cb:], 1, N * k).view(W, N, k)
            mask = (_shifts(k, dev, torch.int64) < counts).to(torch.float32)
            vals = (1.0 - 2.0 * signs.to(torch.float32)) * mask
            first = (counts <= k).flatten(1).all(1) if validate else None
        else:
            vals = packed_copy(sec[:, ib:]).view(torch.bfloat16).view(W, N, k).to(torch.float32)
            mask = torch.ones_like(vals)
            first = torch.isfinite(vals).flatten(1).all(1) if validate else None
        ok = None
        if validate:
            srt = idx.sort(-1).values
            ok = torch.stack([first, (idx < spec.numel).flatten(1).all(1),
                              (srt[..., 1:] != srt[..., :-1]).flatten(1).all(1)], 1)
        return (idx.clamp(0, spec.numel - 1) if clamp else idx), vals, mask, ok


TORCH_SECTIONS = Sections()


class WireFormat(Framing):
    """Fixed layout of one worker's DeMo payload for a given model, topk and value_bits."""

    def __init__(self, groups: list[GroupSpec]):
        if any(g.value_bits not in (1, 16) for g in groups):
            raise ValueError("value_bits must be 1 or 16")
        self.groups = groups
        super().__init__(HEADER_BYTES + sum(g.nbytes for g in groups))

    # ---- encode ----------------------------------------------------------------------------------
    def encode(self, indices: list[torch.Tensor], values: list[torch.Tensor], rank: int, step: int | torch.Tensor,
               weight: float | torch.Tensor, sections: Sections = TORCH_SECTIONS) -> torch.Tensor:
        """Per-group picks (`[N, k]` indices, `[N, k]` values sorted by |value| descending) -> uint8 payload.

        `weight` may be a 0-d float64 device tensor (e.g. NaN to poison a payload without a host sync), `step` a
        0-d int64 device tensor (`header`). `sections` packs the groups it takes (the others go through torch ops): the bytes are the same.
        """
        return self.encode_checked(indices, values, rank, step, weight, sections)[0]

    def encode_checked(self, indices: list[torch.Tensor], values: list[torch.Tensor], rank: int,
                       step: int | torch.Tensor, weight: float | torch.Tensor, sections: Sections = TORCH_SECTIONS,
                       bad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode`, and where `bad` (int counts of non-finite values) has a nonzero, the weight written as NaN:
        (payload, ok as a 0-d bool tensor). No host sync."""
        device = indices[0].device if indices else torch.device("cpu")
        buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        off = HEADER_BYTES
        for spec, idx, val in zip(self.groups, indices, values):
            (sections if sections.takes(spec) else TORCH_SECTIONS).pack(idx, val, spec, buf[off:off + spec.nbytes])
            off += spec.nbytes
        return buf, sections.seal(self, buf, rank, step, weight, bad)

    # ---- decode + validate -----------------------------------------------------------------------
    def decode(self, gathered: torch.Tensor, validate: bool = True, defer: bool = False,
               sections: Sections = TORCH_SECTIONS, step: int | torch.Tensor | None = None):
        """`[W, nbytes]` payloads in rank order -> (weights [W] f32, per group (indices [W,N,k], values [W,N,k])).

        Values of picks past a chunk's nonzero count are 0 and their weight mask is 0 (`masks` per group).
        `defer=True` raises nothing and returns the checks too, `(weights, groups, checks)`, for a caller
        that runs this without a host sync (a CUDA graph) and calls `raise_flags` itself; indices are then
        clamped into range, so unchecked data can be computed on safely before it is refused.
        `sections` unpacks the groups it takes (same results as the torch ops). `step`: the step every
        header must carry (`Framing.check_header`).
        """
        weights64, checks = self.check_header(gathered, validate, step, sections)
        out, off = [], HEADER_BYTES
        for gi, spec in enumerate(self.groups):
            impl = sections if sections.takes(spec) else TORCH_SECTIONS
            idx, vals, mask, ok = impl.unpack(gathered[:, off:off + spec.nbytes], spec, validate, clamp=defer)
            off += spec.nbytes
            if validate:
                checks += [(reason, ok[:, c]) for c, reason in enumerate(self.check_reasons(gi))]
            out.append((idx, vals, mask))
        if defer:
            return weights64.to(torch.float32), out, checks
        self.raise_first_failure(checks)  # the one host sync of validation
        return weights64.to(torch.float32), out

    def check_reasons(self, gi: int) -> list[str]:
        """What each column of a group's `ok` flags checks (`Sections.unpack`)."""
        spec = self.groups[gi]
        return [f"group {gi}: nonzero count above topk={spec.k}" if spec.value_bits == 1 else
                f"group {gi}: non-finite value",
                f"group {gi}: index out of range (chunk has {spec.numel} coefficients)",
                f"group {gi}: duplicate index within a chunk"]
