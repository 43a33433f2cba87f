"""A replica's state on its way from a live peer to a joiner (or to a replica being repaired), bit for bit.

`pack_state(state, codec)` turns a state dict (a model's `state_dict`, a sync's nested `state_dict` of tensors,
numbers and lists) into a `PackedState`; `unpack_state(packed)` gives back a state dict whose tensors equal the
originals bit for bit: the join's fingerprint check (`Coordinator._give_state`) proves it on every join. Plain
torch and pyarrow, no Ray: the worker packs, the object store carries the bytes, the joiner unpacks.

What makes it smaller, all lossless (bf16 or any rounding would break the replicas' bit-identity):
- **Shared tensors once.** Tensors that are views of the same storage (tied embeddings: `wte.weight` is
  `lm_head.weight`) are sent once; the unpacked dict holds one tensor under every name, as `load_state_dict`
  expects. For `tiny` that halves the model state (53.2 -> 27.4 MB: the 6.4M-entry embedding is most of it).
- **Byte planes + zstd** (`codec="zstd"`, pyarrow's, level 1): the bytes of each tensor are regrouped by byte
  position (all first bytes, then all second bytes, ...), so the sign/exponent bytes of fp32 weights, which
  repeat, sit together and compress; the low mantissa bytes do not. Measured on `tiny`'s trained weights: 85% of
  the bytes (27.4 -> 23.2 MB) for ~5 ms/MB to pack and ~2 ms/MB to unpack on a 2-core CPU. At 100 Mbit/s that
  saves ~12 ms of wire per MB for ~7 ms of CPU; it breaks even near 200 Mbit/s per link and does not pay on
  faster ones: `train.state_codec=none` there (the shared tensors are sent once either way).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

CODECS = ("zstd", "none")
ZSTD_LEVEL = 1  # higher levels gain <2% on float weights and cost 1.5-3x the time


@dataclass
class _TensorRef:
    """Where a tensor stood in the state: its index in `PackedState.tensors`."""
    index: int


@dataclass
class _TensorMeta:
    dtype: str           # torch dtype name, e.g. "float32"
    shape: tuple
    offset: int          # in the decompressed buffer
    nbytes: int
    planes: int          # element size: the bytes are stored as this many planes


@dataclass
class PackedState:
    """A state dict with its tensors' bytes in one (compressed) buffer. `skeleton`: the state with each
    distinct tensor replaced by a `_TensorRef` (aliases share one); `raw_bytes`: what the tensors would take as
    a plain state dict (aliases counted each time, as a pickled `state_dict` of copies carries them)."""
    skeleton: Any
    tensors: list[_TensorMeta]
    blob: bytes                      # on its way between workers: the refs of its pieces (elastic.worker.in_pieces)
    codec: str
    raw_bytes: int
    buffer_bytes: int    # distinct tensors' bytes, before compression
    pack_s: float = 0.0

    @property
    def wire_bytes(self) -> int:
        return len(self.blob)

    def meta(self) -> dict:
        """What the transfer costs, for the coordinator's record (without fetching the blob)."""
        return {"raw_bytes": self.raw_bytes, "buffer_bytes": self.buffer_bytes, "wire_bytes": self.wire_bytes,
                "codec": self.codec, "pack_s": round(self.pack_s, 4)}


@dataclass
class _Packer:
    codec: str
    parts: list = field(default_factory=list)     # uint8 arrays (byte planes), in buffer order
    tensors: list = field(default_factory=list)
    seen: dict = field(default_factory=dict)      # storage identity -> _TensorRef
    offset: int = 0
    raw_bytes: int = 0

    def walk(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.add(obj)
        if isinstance(obj, dict):
            out = {k: self.walk(v) for k, v in obj.items()}
            return out if type(obj) is dict else type(obj)(out)  # an OrderedDict stays one
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.walk(v) for v in obj)
        return obj

    def add(self, t: torch.Tensor) -> _TensorRef:
        t = t.detach()
        self.raw_bytes += t.numel() * t.element_size()
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype) if t.numel() else None
        if key is not None and key in self.seen:
            return self.seen[key]
        size = t.element_size()
        flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()  # copies only if not on CPU
        # byte planes: element i's byte j goes to plane j (bfloat16/float16 too: the high byte is sign+exponent)
        planes = flat.reshape(-1, size).T.copy() if size > 1 and self.codec != "none" else flat.copy()
        ref = _TensorRef(len(self.tensors))
        self.tensors.append(_TensorMeta(str(t.dtype).removeprefix("torch."), tuple(t.shape), self.offset,
                                        flat.size, size if size > 1 and self.codec != "none" else 1))
        self.parts.append(planes.reshape(-1))
        self.offset += flat.size
        if key is not None:
            self.seen[key] = ref
        return ref


def pack_state(state: Any, codec: str = "zstd") -> PackedState:
    """Pack `state` (nested dicts/lists/tuples of tensors and plain values) for the wire; see the module doc.
    The result holds copies: the caller may change its tensors right after."""
    if codec not in CODECS:
        raise ValueError(f"train.state_codec: '{codec}' must be one of {', '.join(CODECS)}")
    t0 = time.perf_counter()
    p = _Packer(codec)
    skeleton = p.walk(state)
    buf = np.concatenate(p.parts) if p.parts else np.zeros(0, np.uint8)
    if codec == "zstd" and buf.size:
        import pyarrow as pa

        blob = pa.Codec("zstd", compression_level=ZSTD_LEVEL).compress(buf, asbytes=True)
    else:
        blob = buf.tobytes()
    return PackedState(skeleton, p.tensors, blob, codec, p.raw_bytes, int(buf.size), time.perf_counter() - t0)


def unpack_state(packed: PackedState) -> Any:
    """The state `pack_state` packed: every tensor bit-identical to the original, on the CPU, writable;
    tensors that shared storage are one tensor again."""
    if packed.codec == "zstd" and packed.buffer_bytes:
        import pyarrow as pa

        raw = pa.Codec("zstd").decompress(packed.blob, decompressed_size=packed.buffer_bytes, asbytes=True)
    else:
        raw = packed.blob
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size != packed.buffer_bytes:
        raise ValueError(f"packed state: {buf.size} bytes after decompression, expected {packed.buffer_bytes}")
    tensors = []
    for m in packed.tensors:
        part = buf[m.offset:m.offset + m.nbytes]
        # back to element order (a fresh, writable array either way: `raw` is read-only)
        part = np.array(part.reshape(m.planes, -1).T if m.planes > 1 else part, order="C", copy=True)
        data = torch.from_numpy(part.reshape(-1))
        tensors.append(data.view(getattr(torch, m.dtype)).reshape(m.shape))
    return _fill(packed.skeleton, tensors)


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _TensorRef):
        return tensors[obj.index]
    if isinstance(obj, dict):
        out = {k: _fill(v, tensors) for k, v in obj.items()}
        return out if type(obj) is dict else type(obj)(out)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def state_transfer_text(costs: list[dict], pack_s: float, load_s: float) -> str:
    """One line for the run's events: '23.2 MB on the wire (53.2 MB as state dicts, zstd); packed 0.19 s,
    fetched+loaded 2.01 s'. `costs`: the `PackedState.meta()` of every state sent (model, sync);
    `pack_s`: until the source had packed them; `load_s`: until every joiner had fetched and loaded them.
    `elastic.bench.slowlink` parses it (`STATE_TRANSFER_RE`)."""
    wire = sum(c["wire_bytes"] for c in costs)
    raw = sum(c["raw_bytes"] for c in costs)
    codec = ",".join(sorted({c["codec"] for c in costs})) or "none"
    return (f"{wire / 1e6:.2f} MB on the wire ({raw / 1e6:.2f} MB as state dicts, {codec}); packed {pack_s:.2f} s, "
            f"fetched+loaded {load_s:.2f} s")


STATE_TRANSFER_RE = (r"state-from-peer (?P<source>\S+) -> (?P<joiners>\S+): (?P<wire_mb>[\d.]+) MB on the wire "
                     r"\((?P<raw_mb>[\d.]+) MB as state dicts, (?P<codec>[\w,]+)\); packed (?P<pack_s>[\d.]+) s, "
                     r"fetched\+loaded (?P<load_s>[\d.]+) s")
