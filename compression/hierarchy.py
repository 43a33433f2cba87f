"""`sync.hierarchy=node`: dense inside a node, DeMo-compressed across nodes (issue 20).

Owns: the node topology (`node_topology`: ranks' node ids -> local groups, cross-node groups, each rank's
shard), the shard split of the chunk set (`shard_ranges`), one shard's codec (`ShardCodec`) and the strategy
over two communicators (`HierarchicalDemoSync`, built by `compression.registry.build_sync` from `NodeGroups`).

Per step, on a node of G ranks among N nodes, with S = the smallest G of any node (the shard count):
    1. local all-reduce (dense, fp32) of the token-weighted gradients and the weights: every rank of the node
       holds the node's weighted mean gradient g and its token count T;
    2. local rank s < S owns shard s (a contiguous 1/S of every chunk group): m_s <- decay*m_s + lr*g_s, DCT,
       top-k, error feedback on m_s, one payload (weight T) -> all-gather with the owners of shard s on the
       other nodes (its cross group: N ranks) -> validate, decode the consensus of shard s (sign or rms);
    3. local all-gather of the decoded shards (int8 signs, or fp32 for rms) with a status block each, so every
       rank of the node holds the same full update, or the same refusal.
So a node sends one payload's worth off the node per step (S shards of ~1/S each, plus S headers) instead of
G payloads, and each rank encodes and decodes 1/S of the chunks. Ranks with local rank >= S (a node with more
ranks than the smallest node) are dense-only members: they all-reduce and apply, and encode nothing.

Promises (the `Sync` contract, plus):
- replicas stay bitwise equal: every rank applies the update decoded from the same gathered bytes by the same
  ops (each shard is decoded on one rank per node, from the bytes every node's owner of that shard gathered);
- momentum / error feedback: shard s's momentum lives on the rank that owns it and only there (each chunk has
  exactly one momentum per node, updated with the node's mean gradient, minus what that rank sent). When the
  topology changes (`rebind`, a collective of the node's new group), the node's momentum is handed to the new
  owners, so only the chunks of a rank that left the node start from zero (demo's momentum is an unsent
  residual that decays in ~1/(1-decay) steps; joiners start at zero in flat demo too);
- a bad payload or an abstaining rank never half-applies: every collective of the step runs on every rank
  whatever failed (an abstainer poisons its node's reduction; the owners then poison their payloads), and
  every rank of every node raises `PayloadError` after the last collective, with nothing pending. A payload
  refused for a NaN weight names nobody (-1: its node abstained; the abstainer reports itself), any other
  refusal names the sending owner's global rank;
- `state_dict` is flat demo's (`strategy: demo`, param-shaped momentum, zeros outside this rank's shard),
  so checkpoints load into either hierarchy.
On a GPU the shard's codec runs flat demo's fused Triton kernels, its encode and decode each replayed as a CUDA
graph (`ShardCodec`); elsewhere torch ops.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

import compression.kernels as kernels
from compression.codec import TORCH_SECTIONS, GroupSpec, PayloadError, Sections, WireFormat
from compression.communicator import Communicator, ThreadCommunicator, run_rank_threads
from compression.config import SyncConfig, sync_option_problem
from compression.dct import ChunkPlan, dct_basis, sparse_idct2
from compression.demo import consensus_picks, encode_chunks
from compression.sync import ExchangeStats, Sync, capture_graph

T = TypeVar("T")

STATUS_BYTES = 256  # per local rank in the decoded-shard all-gather: ok (i64), bad sender (i64), reason (utf-8)
ABSTAINED = "abstained"  # codec's reason for a NaN weight starts with this


# ---- topology (pure) -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where one global rank sits: its node, its rank inside the node, the shard it owns (-1: dense-only)."""
    rank: int
    node: int
    local_rank: int
    shard: int


@dataclass(frozen=True)
class NodeTopology:
    """Groups as sorted tuples of global ranks (sorted: torch.distributed numbers a group's ranks in sorted
    order). `local_groups[n]`: node n's ranks; `cross_groups[s]`: the owner of shard s on every node."""
    local_groups: tuple[tuple[int, ...], ...]
    cross_groups: tuple[tuple[int, ...], ...]
    placements: tuple[Placement, ...]

    @property
    def shards(self) -> int:
        return len(self.cross_groups)

    @property
    def nodes(self) -> int:
        return len(self.local_groups)


def node_topology(node_ids: Sequence[str]) -> NodeTopology:
    """Rank r's node is `node_ids[r]`. Nodes are numbered by their lowest rank, local ranks follow global rank
    order, and the shard count is the smallest node's rank count: on every node, local ranks 0..S-1 own shards
    0..S-1 and the rest are dense-only members (so every cross group has one rank per node, and a node with
    more GPUs than the smallest still sends exactly one payload's worth)."""
    if not node_ids:
        raise ValueError("node_topology: no ranks given")
    if any(not n for n in node_ids):
        raise ValueError(f"node_topology: a rank has no node id ({list(node_ids)}); every member must report its "
                         "Ray node id")
    order: dict[str, list[int]] = {}
    for r, n in enumerate(node_ids):
        order.setdefault(n, []).append(r)
    local = tuple(tuple(ranks) for ranks in order.values())
    shards = min(len(g) for g in local)
    cross = tuple(tuple(sorted(g[s] for g in local)) for s in range(shards))
    places = [None] * len(node_ids)
    for n, g in enumerate(local):
        for lr, r in enumerate(g):
            places[r] = Placement(r, n, lr, lr if lr < shards else -1)
    return NodeTopology(local, cross, tuple(places))  # type: ignore[arg-type]


def shard_ranges(plan: ChunkPlan, shard: int, shards: int) -> list[tuple[int, int]]:
    """Chunks [a, b) of every chunk group that shard `shard` of `shards` owns: a contiguous 1/shards of each
    group, so every shard's payload is about 1/shards of the whole one."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in [0, {shards})")
    return [(g.n_chunks * shard // shards, g.n_chunks * (shard + 1) // shards) for g in plan.groups]


# ---- one shard's codec ---------------------------------------------------------------------------------------
class ShardCodec:
    """Demo's encode and decode (compression.demo's math) on one shard of the chunk set; holds that shard's
    momentum and the decoded update's buffer (`out_flat`, per group `out`). `python -m compression bench
    --shards G` times it against the whole set (shards=1).

    On CUDA (`sync.kernels=auto`) it runs flat demo's fused kernels: the encode (momentum, DCT, top-k, error
    feedback in one pass, reading the shard's chunks of the gathered gradient through
    `TileTable.chunk_layout`), the decode, and the payload sections; elsewhere, or with `sync.kernels=torch`,
    torch ops. `fused` forces the choice (tests run the kernels under Triton's interpreter).

    With the fused kernels on a GPU, the encode and the decode (validation and consensus included) each run as
    a CUDA graph replay, as flat demo's decode does: one shard is ~1/G of the GPU work, but the ~100 kernels
    of a step cost the same host time whatever their size, so without graphs a shard costs almost what the
    whole set costs. What a replay reads is copied into fixed buffers first (the shard's gradient scaled by
    lr, the weight, the step, the gathered payloads); the momentum alternates between two fixed sets (the
    encode reads one and writes the other; `commit` makes the new one current). Keys: the encode per (cross
    rank, momentum set), the decode per shape of the gathered payloads (the world size). The first use of a
    key runs eagerly (compiles, builds the constants), the second captures. `graphs` forces the choice (False:
    every step eager)."""

    def __init__(self, cfg: SyncConfig, plan: ChunkPlan, shard: int, shards: int, device, sections: Sections | None = None,
                 fused: bool | None = None, out_dtype: torch.dtype = torch.int8, graphs: bool | None = None):
        self.cfg, self.plan, self.device = cfg, plan, torch.device(device)
        if fused is None:
            fused = cfg.kernels != "torch" and self.device.type == "cuda" and kernels.available(self.device)
        # the payload's sign sections: packed and unpacked (with their checks) by one Triton kernel per group,
        # as flat demo does with its kernels on; the ~55 torch ops per group they replace cost as much host time
        # for one shard as for the whole set. Same bytes either way (tests/compression/test_kernels.py)
        self.sections = sections or (kernels.TritonSections() if fused else TORCH_SECTIONS)
        self.shard, self.shards = shard, shards
        self.ranges = shard_ranges(plan, shard, shards)
        self.live = [gi for gi, (a, b) in enumerate(self.ranges) if b > a]
        specs = [GroupSpec(b - a, plan.groups[gi].numel, min(cfg.topk, plan.groups[gi].numel), cfg.value_bits)
                 for gi, (a, b) in ((gi, self.ranges[gi]) for gi in self.live)]
        self.wire = WireFormat(specs)
        self.bases = {gi: (dct_basis(plan.groups[gi].h, self.device), dct_basis(plan.groups[gi].w, self.device))
                      for gi in self.live}
        self.momentum = self._buffers(torch.float32)
        self.ks = {gi: spec.k for gi, spec in zip(self.live, self.wire.groups)}
        # the live groups the fused kernels take (chunk sides powers of two in [16, 128])
        self.tables = {gi: kernels.TileTable.chunk_layout(b - a, plan.groups[gi].h, plan.groups[gi].w, self.device)
                       for gi, (a, b) in ((gi, self.ranges[gi]) for gi in self.live)
                       if fused and kernels.supports(plan.groups[gi].h, plan.groups[gi].w, self.ks[gi])}
        self._no_delta = torch.zeros(1, dtype=torch.int64, device=self.device)  # one source tensor: offset 0
        # the decoded update of this shard: one flat buffer (what the hierarchy all-gathers in the node), per group
        # a `[b - a, h, w]` view; every decode overwrites it
        sizes = [(b - a) * g.numel for g, (a, b) in zip(plan.groups, self.ranges)]
        self.out_flat = torch.zeros(sum(sizes), dtype=out_dtype, device=self.device)
        self.out = [v.view(b - a, g.h, g.w) for v, g, (a, b) in zip(self.out_flat.split(sizes), plan.groups, self.ranges)]
        if graphs is None:
            graphs = bool(self.tables) and self.device.type == "cuda"
        self.graphed = bool(graphs)
        self._graphs: dict | None = {} if graphs else None
        if graphs:
            self._m_sets = (self.momentum, self._buffers(torch.float32))
            self._src = self._buffers(torch.float32)     # lr * the shard's gradient chunks
            self._weight = torch.zeros((), dtype=torch.float64, device=self.device)
            self._step = torch.zeros((), dtype=torch.int64, device=self.device)  # the step the headers carry
            self._step_value = 0  # what `_step` holds (the encode and decode of a step fill it once)
            self._gathered: torch.Tensor | None = None  # the payloads the decode graph reads

    def _buffers(self, dtype) -> list[torch.Tensor]:
        return [torch.zeros(b - a, g.h, g.w, device=self.device, dtype=dtype) for g, (a, b) in zip(self.plan.groups, self.ranges)]

    def _set_step(self, step: int) -> None:
        if step != self._step_value:
            self._step.fill_(step)
            self._step_value = step

    def _replay(self, key, fn: Callable[[], T]) -> T:
        """`fn()` as a CUDA graph under `key`: eager on the key's first use, captured on its second, replayed
        from then on (its outputs are the graph's fixed tensors, overwritten by the next replay). Off CUDA (tests
        of the buffer handling) every call is eager."""
        if self.device.type != "cuda":
            return fn()
        entry = self._graphs.get(key)
        if entry is None:
            self._graphs[key] = "warm"
            return fn()
        if entry == "warm":
            entry = self._graphs[key] = capture_graph(self.device, fn)
        graph, out = entry
        graph.replay()
        return out

    def encode(self, chunks: list[torch.Tensor], lr: float, weight: torch.Tensor, rank: int, step: int):
        """`chunks`: the whole model's gradient in chunk layout (one `[N, h, w]` per group). Returns (payload,
        the new momentum of this shard: the residual after error feedback, finite flag as a 0-d bool tensor).
        The committed momentum is untouched. A non-finite momentum or weight poisons the payload's weight.
        With graphs on, the payload and the new momentum are fixed buffers: the payload is overwritten by the
        next encode, the new momentum by the encode after the next commit."""
        if self._graphs is None:
            src = [g[a:b] for g, (a, b) in zip(chunks, self.ranges)]
            new_m = [torch.empty_like(m) for m in self.momentum]
            return self._encode_into(self.momentum, new_m, src, lr, weight, rank, step)
        for dst, g, (a, b) in zip(self._src, chunks, self.ranges):
            if b > a:
                torch.mul(g[a:b], lr, out=dst)
        if isinstance(weight, torch.Tensor):
            self._weight.copy_(weight)
        else:
            self._weight.fill_(float(weight))
        self._set_step(step)
        m_in = self.momentum
        if m_in is not self._m_sets[0] and m_in is not self._m_sets[1]:  # set from outside: adopt its values
            torch._foreach_copy_(self._m_sets[0], m_in)
            m_in = self.momentum = self._m_sets[0]
        which = 0 if m_in is self._m_sets[0] else 1
        m_out = self._m_sets[1 - which]
        return self._replay(("encode", rank, which), lambda: self._encode_into(
            m_in, m_out, self._src, 1.0, self._weight, rank, self._step))

    def _encode_into(self, m_in, m_out, src, lr, weight, rank, step):
        """m_out <- the residual of decay * m_in + lr * src after the picks; (payload, m_out, ok)."""
        idx, val = [], []
        # one buffer of non-finite counts (per chunk of the fused groups, one per torch group) that the seal
        # reads: any nonzero makes the payload's weight NaN
        slots = [src[gi].shape[0] if gi in self.tables else 1 for gi in self.live]
        bad = torch.empty(sum(slots), dtype=torch.int32, device=self.device)  # every live group writes its slots
        bads = dict(zip(self.live, bad.split(slots)))
        for gi, (g, m, nm) in enumerate(zip(src, m_in, m_out)):
            if gi in self.tables:
                i, v, _ = kernels.fused_encode(m, nm, [g.to(torch.float32).contiguous()], self._no_delta,
                                               self.tables[gi], *self.bases[gi], self.ks[gi], self.cfg.decay, lr,
                                               bad=bads[gi])
                idx.append(i)
                val.append(v)
                continue
            torch.mul(m, self.cfg.decay, out=nm)
            nm.add_(g, alpha=lr)
            if gi in self.bases:
                ch, cw = self.bases[gi]
                i, v = encode_chunks(nm, ch, cw, self.ks[gi])
                idx.append(i)
                val.append(v)
                bads[gi].copy_((~torch.isfinite(v)).sum())
        payload, ok = self.wire.encode_checked(idx, val, rank, step, weight, self.sections, bad)
        return payload, m_out, ok

    def decode(self, gathered: torch.Tensor, step: int) -> list[torch.Tensor]:
        """Validate the `[N, nbytes]` payloads of this shard (raises `PayloadError(cross rank, reason)`) and
        write sign (or unit-RMS) of the consensus of every live group into `out` (`[b - a, h, w]` per group),
        which it returns. With graphs on, the consensus is computed on clamped indices before the checks are
        read: after a refusal `out` holds garbage (the hierarchy sends a refusal, not `out`)."""
        if self._graphs is None:
            weights, groups = self.wire.decode(gathered, validate=self.cfg.validate_payloads, step=step,
                                               sections=self.sections)
            self._consensus(weights, groups)
            return self.out
        if self._gathered is None or self._gathered.shape != gathered.shape:  # a new world size: the old graph goes
            self._graphs = {k: v for k, v in self._graphs.items() if k[0] != "decode"}
            self._gathered = torch.empty_like(gathered)  # what the decode graph reads (a bad shape: decode refuses)
        self._gathered.copy_(gathered)
        self._set_step(step)

        def run():
            weights, groups, checks = self.wire.decode(self._gathered, validate=self.cfg.validate_payloads,
                                                       defer=True, step=self._step, sections=self.sections)
            self._consensus(weights, groups)
            return (torch.stack([c for _, c in checks], 1) if checks else None), [r for r, _ in checks]

        flags, reasons = self._replay(("decode", tuple(gathered.shape)), run)
        if flags is not None:
            self.wire.raise_flags(flags, reasons)
        return self.out

    def _consensus(self, weights: torch.Tensor, groups: list) -> None:
        for li, (idx, vals, mask) in enumerate(groups):
            gi = self.live[li]
            (ch, cw), numel, out = self.bases[gi], self.plan.groups[gi].numel, self.out[gi]
            flat, coef = consensus_picks(idx, vals, mask, weights, numel, gi in self.tables)
            if gi in self.tables:
                kernels.fused_decode(flat, coef, ch, cw, out, rms=self.cfg.update == "rms")
                continue
            x = sparse_idct2(flat, coef, ch, cw)
            if self.cfg.update == "rms":
                rms = x.square().mean(dim=(1, 2), keepdim=True).sqrt_()
                out.copy_(torch.where(rms > 0, x / rms.clamp_min(1e-30), torch.zeros_like(x)))
            else:
                out.copy_(x.sign_())


# ---- the strategy --------------------------------------------------------------------------------------------
@dataclass
class NodeGroups:
    """One rank's communicators under `sync.hierarchy=node` (what `build_sync` and `rebind` take).

    `local`: the ranks of this node; `cross`: the owners of shard `shard` on every node (None for a dense-only
    rank); `cross_ranks[i]`: the global rank of cross rank i (to name a bad sender); `shards`: S."""
    local: Communicator
    cross: Communicator | None
    shard: int
    shards: int
    cross_ranks: tuple[int, ...] = ()

    @property
    def rank(self) -> int:  # what a caller that treats this as a communicator sees: the node-local rank
        return self.local.rank


def _status(ok: bool, sender: int = -1, reason: str = "") -> torch.Tensor:
    head = torch.tensor([1 if ok else 0, sender], dtype=torch.int64).view(torch.uint8)
    text = reason.encode()[:STATUS_BYTES - 16]
    return torch.cat([head, torch.frombuffer(bytearray(text.ljust(STATUS_BYTES - 16, b"\0")), dtype=torch.uint8)])


def _read_status(block: torch.Tensor) -> tuple[bool, int, str]:
    head = block[:16].clone().view(torch.int64)
    return bool(head[0]), int(head[1]), bytes(block[16:STATUS_BYTES].tolist()).rstrip(b"\0").decode(errors="replace")


class HierarchicalDemoSync(Sync):
    """Demo across nodes, dense inside them; see the module docstring for the step and its promises."""

    supports_undo = True

    def __init__(self, cfg: SyncConfig, params: list[torch.Tensor], comm: NodeGroups | None):
        """`comm` None: built before its groups exist (a worker pinning checkpoint buffers); `rebind` binds it.
        Built with `comm`, this is a collective of the node's group, like `rebind`."""
        problem = sync_option_problem(cfg, "demo")
        if problem:
            raise ValueError(problem)
        if comm is not None and not isinstance(comm, NodeGroups):
            raise ValueError("sync.hierarchy=node: build_sync needs compression.hierarchy.NodeGroups (the node's "
                             f"group and the shard's cross-node group), got {type(comm).__name__}")
        if any(not p.is_contiguous() for p in params):
            raise ValueError("demo sync needs contiguous parameters (updates are applied through views)")
        self.cfg, self.params = cfg, params
        self.device = params[0].device
        self.plan = ChunkPlan([tuple(p.shape) for p in params], cfg.chunk)
        self.numel = self.plan.numel
        # sign updates are exact in int8 (a quarter of fp32's in-node bytes); rms needs fp32
        self.wire_dtype = torch.float32 if cfg.update == "rms" else torch.int8
        self.step_count = 0
        self._pending = None
        self._undo = None  # what undo() restores after a commit(keep_undo=True)
        self._undo_params: list[torch.Tensor] | None = None
        self.codec: ShardCodec | None = None
        self.groups: NodeGroups | None = None
        self.S = 0
        if comm is not None:  # the same collective as a rebind: a new rank takes part in its node's hand-off
            self.rebind(comm)

    # ---- topology ----------------------------------------------------------------------------------------
    def _bind(self, groups: NodeGroups, old: list[torch.Tensor] | None) -> None:
        """Adopt `groups`; `old`: the previous full-size momentum (chunk layout) to keep this shard's part of."""
        if groups.shards < 1 or groups.local.world_size < groups.shards:
            raise ValueError(f"hierarchy: {groups.shards} shards but a node of {groups.local.world_size} ranks")
        if (groups.shard >= 0) != (groups.cross is not None):
            raise ValueError("hierarchy: a shard owner needs a cross-node communicator, a dense-only rank none")
        self.groups, self.comm = groups, groups.local
        self.S = groups.shards
        self.ranges = [shard_ranges(self.plan, s, self.S) for s in range(self.S)]
        # the decoded-shard all-gather: one block per local rank, sized for the largest shard
        self.shard_elems = [sum((b - a) * g.numel for g, (a, b) in zip(self.plan.groups, r)) for r in self.ranges]
        self.block_bytes = STATUS_BYTES + max(self.shard_elems) * self.wire_dtype.itemsize
        self.codec = (ShardCodec(self.cfg, self.plan, groups.shard, self.S, self.device, out_dtype=self.wire_dtype)
                      if groups.shard >= 0 else None)
        if self.codec is not None and old is not None:
            for m, full, (a, b) in zip(self.codec.momentum, old, self.codec.ranges):
                m.copy_(full[a:b])

    def _full_momentum(self) -> list[torch.Tensor]:
        """This rank's momentum in the whole model's chunk layout (zeros outside its shard)."""
        full = [torch.zeros(g.n_chunks, g.h, g.w, device=self.device) for g in self.plan.groups]
        if self.codec is not None:
            for f, m, (a, b) in zip(full, self.codec.momentum, self.codec.ranges):
                f[a:b] = m
        return full

    def rebind(self, comm: NodeGroups) -> None:
        """A new topology after a membership change. A collective of the node's new group (every member calls
        rebind, as every member joins a generation): the node's momentum is summed over its members (each holds
        its old shard, zeros elsewhere: shards are disjoint, so the sum is exact) and every owner keeps its new
        shard of it. So chunks that move between surviving ranks keep their momentum; only the chunks of a rank
        that left the node start from zero (and a node of joiners starts at zero, as flat demo's joiners do)."""
        if not isinstance(comm, NodeGroups):
            raise ValueError(f"sync.hierarchy=node: rebind needs NodeGroups, got {type(comm).__name__}")
        self._pending = self._undo = None
        full = self._full_momentum()
        if comm.local.world_size > 1:
            flat = torch.cat([f.reshape(-1) for f in full])
            comm.local.allreduce_(flat)
            full = [t.view_as(f) for t, f in zip(flat.split([f.numel() for f in full]), full)]
        self._bind(comm, full)

    # ---- the two phases ----------------------------------------------------------------------------------
    def exchange(self, lr: float, weight: float, weight_decay: float = 0.0, boundary: bool = False,
                 step: int | None = None) -> ExchangeStats:
        self._pending = None
        self._undo = None  # a new step: what an undo would restore is final
        if self.groups is None:
            raise RuntimeError("exchange() before the sync was bound to its groups (rebind)")
        seq = self.step_count if step is None else int(step)
        local, cross, G = self.groups.local, self.groups.cross, self.groups.local.world_size
        t0 = time.perf_counter()
        comm_s = 0.0
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        # 1. dense in the node: token-weighted gradients and the weight itself in one fp32 bucket
        bucket = torch.cat([g.reshape(-1).float() for g in grads] + [torch.ones(1, device=self.device)])
        bucket.mul_(float(weight))
        if G > 1:
            _, t1, t2 = self._timed(local.allreduce_, bucket)
            comm_s += t2 - t1
        total = bucket[-1].to(torch.float64)
        # whether the node's sum is usable, kept on device (a host read here would wait for the all-reduce):
        # a bad node sends weight NaN (abstains) and learns its verdict with the shards' statuses below
        node_ok_t = torch.isfinite(bucket).all() & (total > 0)
        mean = bucket[:-1] / bucket[-1]
        # 2. the shard this rank owns, across nodes
        status = _status(True)
        new_m, block = None, torch.zeros(self.block_bytes - STATUS_BYTES, dtype=torch.uint8, device=self.device)
        cross_bytes = cross_recv = 0
        if self.codec is not None:
            sizes = [p.numel() for p in self.params]
            chunks = self.plan.gather([m.view_as(p) for m, p in zip(mean.split(sizes), self.params)], self.device)
            weight_t = torch.where(node_ok_t, total, torch.full_like(total, float("nan")))
            payload, new_m, _ = self.codec.encode(chunks, lr, weight_t, cross.rank, seq)
            if cross.world_size > 1:
                gathered, t1, t2 = self._timed(cross.allgather, payload)
                comm_s += t2 - t1
            else:
                gathered = payload.unsqueeze(0)
            cross_bytes, cross_recv = payload.numel(), (cross.world_size - 1) * payload.numel()
            try:
                self.codec.decode(gathered, seq)
                out_flat = self.codec.out_flat
                block[:out_flat.numel() * out_flat.element_size()] = out_flat.view(torch.uint8)
            except PayloadError as e:
                # a NaN weight is a node that abstained: its own abstainer reports itself, nobody is named
                sender = -1 if e.sender_rank < 0 or e.reason.startswith(ABSTAINED) else \
                    self.groups.cross_ranks[e.sender_rank]
                status = _status(False, sender, e.reason)
        # 3. the decoded shards, all-gathered in the node (every rank takes part, whatever failed)
        mine = torch.cat([status.to(self.device), block])
        if G > 1:
            blocks, t1, t2 = self._timed(local.allgather, mine)
            comm_s += t2 - t1
        else:
            blocks = mine.unsqueeze(0)
        # one device->host copy: this node's verdict and every shard's status
        heads = torch.cat([node_ok_t.to(torch.uint8).reshape(1).to(blocks.device),
                           blocks[:self.S, :STATUS_BYTES].reshape(-1)]).cpu()
        if not bool(heads[0]):
            raise PayloadError(-1, "this node's all-reduced gradients are not finite or its total weight is not > 0 "
                                   "(a rank of the node abstained or sent non-finite gradients)")
        for s, block in enumerate(heads[1:].view(self.S, STATUS_BYTES)):
            ok, sender, reason = _read_status(block)
            if not ok:
                raise PayloadError(sender, f"shard {s}/{self.S}: {reason}")
        update = []
        for s in range(self.S):
            raw = blocks[s, STATUS_BYTES:STATUS_BYTES + self.shard_elems[s] * self.wire_dtype.itemsize]
            vals, off = raw.clone().view(self.wire_dtype), 0
            for gi, (g, (a, b)) in enumerate(zip(self.plan.groups, self.ranges[s])):
                n = (b - a) * g.numel
                update.append((gi, a, b, vals[off:off + n].view(b - a, g.h, g.w)))
                off += n
        full = [torch.empty(g.n_chunks, g.h, g.w, device=self.device, dtype=self.params[0].dtype)
                for g in self.plan.groups]
        for gi, a, b, v in update:
            full[gi][a:b] = v
        self._pending = (new_m, full, float(lr) * self.cfg.lr_scale, float(weight_decay))
        t4 = time.perf_counter()
        bucket_bytes = bucket.numel() * bucket.element_size()
        local_bytes = int(2 * (G - 1) / G * bucket_bytes) + (G - 1) * self.block_bytes  # ring all-reduce + all-gather
        return ExchangeStats(bytes_sent=cross_bytes, bytes_received=cross_recv, dense_equivalent_bytes=self.numel * 2,
                             codec_ms=((t4 - t0) - comm_s) * 1e3, comm_ms=comm_s * 1e3,
                             collective_input_bytes=cross_bytes, local_bytes_sent=local_bytes)

    def commit(self, keep_undo: bool = False) -> None:
        """Apply the pending update (no collective: a worker may run it in a thread, `train.apply_ahead`).
        `keep_undo`: keep a copy of the parameters so `undo` can put everything back bit for bit."""
        if self._pending is None:
            raise RuntimeError("commit() without a successful exchange()")
        self._undo = None
        if keep_undo:  # a copy of the parameters; the momentum is only re-pointed, so a reference does
            with torch.no_grad():
                if self._undo_params is None:
                    self._undo_params = [torch.empty_like(p) for p in self.params]
                torch._foreach_copy_(self._undo_params, [p.detach() for p in self.params])
            self._undo = (self._pending, self.codec.momentum if self.codec is not None else None, self.step_count)
        new_m, update, lr, wd = self._pending
        with torch.no_grad():
            if wd:
                torch._foreach_mul_(self.params, 1.0 - lr * wd)
            tiles = self.plan.param_tiles(self.params)
            ups = self.plan.all_group_views(update)
            torch._foreach_add_(tiles, [u if u.dtype == t.dtype else u.to(t.dtype) for u, t in zip(ups, tiles)],
                                alpha=-lr)
        if self.codec is not None:
            self.codec.momentum = new_m
        self.step_count += 1
        self._pending = None

    def abort(self) -> None:
        self._pending = None

    def undo(self) -> None:
        """Back to just before the last commit(keep_undo=True): parameters, momentum, step count and the pending
        update, bit for bit."""
        if self._undo is None:
            raise RuntimeError("undo() without a commit(keep_undo=True) to undo")
        (self._pending, momentum, self.step_count), self._undo = self._undo, None
        if self.codec is not None:
            self.codec.momentum = momentum
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.params], self._undo_params)

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self, on_device: bool = False) -> dict:
        # scatter builds new parameter-shaped tensors: on the device they are already a copy
        move = (lambda t: t.detach()) if on_device else (lambda t: t.detach().cpu())
        return {"strategy": "demo", "step_count": self.step_count,
                "momentum": [move(t) for t in self.plan.scatter(self._full_momentum())]}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("strategy") != "demo":
            raise ValueError(f"load_state_dict: state of strategy '{sd.get('strategy')}' given to demo")
        if sd.get("held_update") is not None:
            raise ValueError("load_state_dict: a delayed_apply state (held update) cannot load into "
                             "sync.hierarchy=node; resume with sync.hierarchy=flat")
        shapes = [tuple(t.shape) for t in sd["momentum"]]
        if shapes != self.plan.shapes:
            raise ValueError(f"load_state_dict: momentum shapes {shapes[:3]}... do not match parameters")
        full = self.plan.gather([t.to(self.device) for t in sd["momentum"]], self.device)
        if self.codec is not None:
            for m, f, (a, b) in zip(self.codec.momentum, full, self.codec.ranges):
                m.copy_(f[a:b])
        self.step_count = int(sd["step_count"])
        self._pending = self._undo = None


# ---- ranks as threads (tests, benchmarks) ----------------------------------------------------------------------
def thread_node_groups(node_ids: Sequence[str], timeout: float = 60.0) -> list[NodeGroups]:
    """`NodeGroups` for ranks as threads of one process (`ThreadCommunicator`s), rank r on node `node_ids[r]`."""
    topo = node_topology(node_ids)
    local = {r: c for g in topo.local_groups for r, c in zip(g, ThreadCommunicator.group(len(g), timeout))}
    cross = {r: c for g in topo.cross_groups for r, c in zip(g, ThreadCommunicator.group(len(g), timeout))}
    out = []
    for p in topo.placements:
        ranks = topo.cross_groups[p.shard] if p.shard >= 0 else ()
        out.append(NodeGroups(local[p.rank], cross.get(p.rank), p.shard, topo.shards, tuple(ranks)))
    return out


def run_node_threads(node_ids: Sequence[str], fn: Callable[[int, NodeGroups], T], timeout: float = 60.0) -> list[T]:
    """Run `fn(rank, groups)` for every rank as a thread; results in rank order. An exception on any rank breaks
    every group (so peers do not hang) and is re-raised here (the lowest rank's)."""
    groups = thread_node_groups(node_ids, timeout)

    def break_all(_rank: int) -> None:
        for g in groups:
            for c in (g.local, g.cross):
                if c is not None:
                    c.abort()

    return run_rank_threads(len(groups), lambda r: fn(r, groups[r]), break_all)
