"""DeMo-style decoupled momentum sync (Peng, Quesnelle, Kingma 2024, arXiv 2411.19870), batched and deterministic.

Per step, with lr passed by the caller (the caller owns the schedule):
    m <- decay * m + lr * grad                       (lr folded into the momentum, as in the reference)
    X  = C_h @ m_chunk @ C_w^T                       (orthonormal DCT-II on every chunk, one bmm per chunk shape)
    top-k |X| per chunk -> (index, value)            -> one packed uint8 payload (compression.codec)
    m <- m - idct(own top-k, unquantized)            (error feedback: what was not sent stays in momentum)
    all-gather payloads, validate, decode: per coefficient, the weight-weighted mean over the ranks that
    picked it; update = sign(idct(mean));  p <- p * (1 - lr * wd) - lr * update
Promises (besides the `Sync` contract):
- replicas that start equal stay bitwise equal: the update is computed only from the gathered bytes
  (own payload included, never local floats) with plain reductions in a fixed order (a pairwise comparison
  of the picks, or a rank-ordered scatter_add over indices validated unique per chunk, so no two adds
  race), on the same kind of device and torch build;
- no per-tensor compute loop: one foreach copy in, one transform per chunk shape, one foreach add out;
  the per-parameter views those foreach calls take are built once (`ViewCache`), and the chunk buffers
  are persistent (momentum and its successor swap at commit; two update buffers), so a step costs a few
  hundred dispatcher calls on GPT-2-small, not ~1,500;
- on CUDA (`sync.kernels=auto`) the chunk groups `compression.kernels` supports go through fused Triton
  kernels instead (encode reads `.grad` in place; commit decodes the consensus straight into the
  parameters), and decode + validation + consensus are replayed as one CUDA graph; same contract, same
  wire bytes, picks equal to the torch path's but for near ties;
- `delayed_apply`: the consensus of step N is applied at step N+1 (Psyche-style; the first commit applies
  only weight decay). With a blocking Communicator this changes semantics only; it is what lets an
  asynchronous collective overlap the next forward/backward.
"""
from __future__ import annotations

import time

import torch

import compression.kernels as kernels
from compression.codec import TORCH_SECTIONS, GroupSpec, WireFormat
from compression.communicator import Communicator
from compression.config import SyncConfig, sync_option_problem
from compression.dct import ChunkPlan, ViewCache, dct2, dct_basis, sparse_idct2
from compression.sync import ExchangeStats, Sync, capture_graph


def encode_chunks(m: torch.Tensor, ch: torch.Tensor, cw: torch.Tensor, k: int):
    """Top-k DCT coefficients of every chunk of `m` ([N, h, w]); `m` becomes the error-feedback residual.

    Returns (indices [N, k], values [N, k] sorted by |value| descending); afterwards m = m - idct(picks).
    """
    coef = dct2(m, ch, cw).reshape(m.shape[0], -1)
    idx = coef.abs().topk(k, dim=1, sorted=True).indices  # sorted: zero picks (if any) come last
    val = coef.gather(1, idx)
    m.sub_(sparse_idct2(idx, val, ch, cw))  # subtract the unquantized picks: the rest stays local
    return idx, val


PAIRWISE_MAX_PICKS = 64  # W*k up to this: compare picks pairwise (E^2 <= 4096); above: a dense coefficient grid


_LOWER: dict[tuple[int, str], torch.Tensor] = {}


def _strictly_lower(n: int, device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _LOWER:
        _LOWER[key] = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)
    return _LOWER[key]


def pairwise_mean(idx: torch.Tensor, wval: torch.Tensor, wmask: torch.Tensor) -> torch.Tensor:
    """Weighted mean per picked coefficient, from `[W, N, k]` picks -> `[N, W*k]` (0 for repeats of a pick).

    For every pick e: sum over the picks e' of the same chunk with the same index (all ranks, fixed order)
    of weight*value, divided by the sum of weights. A coefficient picked by several ranks keeps its mean
    at its first occurrence (rank order) and 0 at the others, so the inverse DCT counts it once.
    Plain tensor reductions, no atomics: bitwise reproducible.
    """
    W, N, k = idx.shape
    flat = lambda t: t.permute(1, 0, 2).reshape(N, W * k)  # noqa: E731
    i, v, m = flat(idx), flat(wval), flat(wmask)
    same = i.unsqueeze(2) == i.unsqueeze(1)                                   # [N, E, E]
    num = (same * v.unsqueeze(1)).sum(-1)
    den = (same * m.unsqueeze(1)).sum(-1)
    earlier = _strictly_lower(W * k, idx.device)
    first = ~(same & earlier).any(-1)
    return torch.where(first & (den > 0), num / den.clamp_min(torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def grid_mean(idx: torch.Tensor, wval: torch.Tensor, wmask: torch.Tensor, numel: int) -> torch.Tensor:
    """Same result layout as `pairwise_mean`, through a dense `[N, numel]` grid (for many ranks x picks)."""
    W, N, k = idx.shape
    num = torch.zeros(N, numel, device=idx.device)
    den = torch.zeros_like(num)
    for r in range(W):  # fixed rank order; indices unique per chunk (validated) -> no racing adds
        num.scatter_add_(1, idx[r], wval[r])
        den.scatter_add_(1, idx[r], wmask[r])
    num.div_(den.clamp_min_(torch.finfo(num.dtype).tiny))
    coef = []
    for r in range(W):  # read the mean at each rank's picks, zeroing it so repeats count once
        coef.append(num.gather(1, idx[r]))
        num.scatter_(1, idx[r], 0.0)
    return torch.stack(coef, 1).view(N, W * k)


def consensus_picks(idx: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, numel: int,
                    fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`[W, N, k]` picks of every rank and `[W]` weights -> (flat indices `[N, W*k]`, the weighted mean at each
    pick): `kernels.fused_consensus` for a fused group with up to `PAIRWISE_MAX_PICKS` picks per chunk,
    otherwise `pairwise_mean` or, for more picks, `grid_mean`."""
    W, N, k = idx.shape
    if fused and W * k <= PAIRWISE_MAX_PICKS:  # one kernel, same layout
        return kernels.fused_consensus(idx, vals, mask, weights)
    wv, wm = vals * weights.view(W, 1, 1), mask * weights.view(W, 1, 1)
    coef = pairwise_mean(idx, wv, wm) if W * k <= PAIRWISE_MAX_PICKS else grid_mean(idx, wv, wm, numel)
    return idx.permute(1, 0, 2).reshape(N, W * k), coef


def demo_wire_format(plan: ChunkPlan, topk: int, value_bits: int) -> WireFormat:
    """The payload layout for a chunk plan (k is capped at the chunk size for tiny chunks)."""
    return WireFormat([GroupSpec(g.n_chunks, g.numel, min(topk, g.numel), value_bits) for g in plan.groups])


class DemoSync(Sync):
    def __init__(self, cfg: SyncConfig, params: list[torch.Tensor], comm: Communicator):
        problem = sync_option_problem(cfg, "demo")
        if problem:
            raise ValueError(problem)
        if any(not p.is_contiguous() for p in params):
            raise ValueError("demo sync needs contiguous parameters (updates are applied through views)")
        self.cfg, self.params, self.comm = cfg, params, comm
        self.device = params[0].device
        self.plan = ChunkPlan([tuple(p.shape) for p in params], cfg.chunk)
        self.wire = demo_wire_format(self.plan, cfg.topk, cfg.value_bits)
        self.ks = [spec.k for spec in self.wire.groups]
        self.bases = [(dct_basis(g.h, self.device), dct_basis(g.w, self.device)) for g in self.plan.groups]
        # groups the fused kernels take read the gradients and write the parameters themselves (through
        # offset tables); the others go through torch ops on per-parameter views
        self.fused = self._fused_groups(cfg.kernels)
        # with the kernels on, the payload's sign sections are packed and unpacked by one kernel each too
        self._sections = kernels.TritonSections() if any(self.fused) else TORCH_SECTIONS
        # sign updates are exact in any float dtype: bf16 halves their memory traffic for the kernels;
        # on the torch path the params' dtype saves a conversion at commit
        self.update_dtype = (torch.bfloat16 if any(self.fused) and cfg.update == "sign" else
                             params[0].dtype if len({p.dtype for p in params}) == 1 else torch.float32)
        self.momentum = self._buffers(torch.float32)
        self.held: list[torch.Tensor] | None = None  # delayed_apply: consensus waiting for the next commit
        self.step_count = 0
        self._pending = None
        self._undo = None  # what undo() restores after a commit(keep_undo=True)
        self._undo_params: list[torch.Tensor] | None = None  # the parameters' copy it restores (allocated once)
        # persistent buffers with their per-parameter views built once: the next momentum (gradients are
        # gathered into it, it becomes the momentum at commit and the old momentum the next scratch) and
        # two update buffers (one may be held for a delayed apply while the other is written)
        self._scratch = self._buffers(torch.float32)
        self._applied = [f and kernels.supports_apply(g.w) for f, g in zip(self.fused, self.plan.groups)]
        # kernel-applied groups whose update is not held for the next commit skip the dense update buffer
        # (an empty one stands in): commit decodes their consensus picks straight into the parameters
        self._decode_at_commit = [a and not cfg.delayed_apply for a in self._applied]
        self._updates = [[torch.zeros(0 if skip else g.n_chunks, g.h, g.w, device=self.device, dtype=self.update_dtype)
                          for g, skip in zip(self.plan.groups, self._decode_at_commit)] for _ in range(2)]
        # where each fused group's chunks sit inside the gradients and the parameters, and where those are
        self._tables = {gi: kernels.TileTable(self.plan.groups[gi].slots, self.device)
                        for gi, f in enumerate(self.fused) if f}
        self._grad_addrs, self._param_addrs = kernels.Addresses(self.device), kernels.Addresses(self.device)
        torch_in = [gi for gi, f in enumerate(self.fused) if not f]
        torch_out = [gi for gi, a in enumerate(self._applied) if not a]
        in_slots = [s for gi in torch_in for s in self.plan.groups[gi].slots]
        out_slots = [s for gi in torch_out for s in self.plan.groups[gi].slots]
        self._grad_tiles = ViewCache(lambda ts: [s.tiles(ts[s.index]) for s in in_slots], retain=False)
        self._in_views = {id(b): ViewCache(lambda bs: [v for gi in torch_in for v in self.plan.group_views(bs, gi)])
                          for b in (self.momentum, self._scratch)}
        self._param_tiles = ViewCache(lambda ts: [s.tiles(ts[s.index]) for s in out_slots])
        self._out_views = {id(b): ViewCache(lambda bs: [v for gi in torch_out for v in self.plan.group_views(bs, gi)])
                           for b in self._updates}
        self._torch_params = [self.params[s.index] for s in out_slots]
        # CUDA: decode + validation + consensus replayed as CUDA graphs (see `_decode_graphed`)
        self._graphs: dict | None = {} if self.device.type == "cuda" and any(self.fused) else None
        # the step every received header must carry (a device tensor: the CUDA graph reads it at replay)
        self._expect_step = torch.zeros((), dtype=torch.int64, device=self.device)

    def _fused_groups(self, mode: str) -> list[bool]:
        """Per chunk group: whether `compression.kernels` encodes and decodes it (`sync.kernels`)."""
        if mode not in ("auto", "torch", "triton"):
            raise ValueError(f"sync.kernels: '{mode}' must be auto, torch or triton")
        none = [False] * len(self.plan.groups)
        if mode == "torch" or (mode == "auto" and self.device.type != "cuda"):
            return none
        dtypes = {p.dtype for p in self.params}
        problem = ("Triton does not import here or the device is a CPU (pip install triton; on CPU only with "
                   "TRITON_INTERPRET=1); use auto or torch" if not kernels.available(self.device) else
                   f"the fused kernels read float32 gradients; these parameters are {sorted(map(str, dtypes))} "
                   "(use sync.kernels=torch)" if dtypes != {torch.float32} else None)
        if problem:
            if mode == "auto":
                return none
            raise ValueError(f"sync.kernels=triton: {problem}")
        return [kernels.supports(g.h, g.w, k) for g, k in zip(self.plan.groups, self.ks)]

    def _buffers(self, dtype) -> list[torch.Tensor]:
        return [torch.zeros(g.n_chunks, g.h, g.w, device=self.device, dtype=dtype) for g in self.plan.groups]

    @property
    def payload_bytes(self) -> int:
        return self.wire.nbytes

    # ---- the two phases -----------------------------------------------------------------------------
    def exchange(self, lr: float, weight: float, weight_decay: float = 0.0, boundary: bool = False,
                 step: int | None = None) -> ExchangeStats:
        self._pending = None
        self._undo = None  # a new step writes the buffers an undo would restore
        t0 = time.perf_counter()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                 for p in self.params]
        # the new momentum decay * m + lr * grad, then the residual, in the scratch buffer (m stays committed):
        # two passes over the model (scale m into it, add the gradients' tiles), no separate gather
        # (fused groups: the kernel does all of this and the top-k in one pass over m and the gradients)
        new_m = self._scratch
        for gi, (m, g) in enumerate(zip(self.momentum, new_m)):
            if not self.fused[gi]:
                torch.mul(m, self.cfg.decay, out=g)
        if not all(self.fused):
            torch._foreach_add_(self._in_views[id(new_m)](new_m), self._grad_tiles(grads), alpha=lr)
        grad_deltas = self._grad_addrs.deltas(grads) if self._tables else None
        picks_i, picks_v = [], []
        # the non-finite counts, one buffer for the seal: per chunk of a fused group, one slot per torch group
        slots = [g.n_chunks if f else 1 for g, f in zip(self.plan.groups, self.fused)]
        bad = torch.empty(sum(slots), dtype=torch.int32, device=self.device)  # every group writes its slots
        for gi, (g, (ch, cw), k, b) in enumerate(zip(new_m, self.bases, self.ks, bad.split(slots))):
            if self.fused[gi]:
                idx, val, _ = kernels.fused_encode(self.momentum[gi], g, grads, grad_deltas, self._tables[gi],
                                                   ch, cw, k, self.cfg.decay, lr, bad=b)
            else:
                idx, val = encode_chunks(g, ch, cw, k)
                b.copy_((~torch.isfinite(val)).sum())
            picks_i.append(idx)
            picks_v.append(val)
        # a non-finite momentum poisons our payload's weight (NaN) instead of raising here: every rank,
        # us included, then rejects it in validation, so nobody is left waiting in the collective
        seq = self.step_count if step is None else int(step)  # every peer's header must carry it
        self._expect_step.fill_(seq)
        payload, _ = self.wire.encode_checked(picks_i, picks_v, self.comm.rank, self._expect_step, float(weight),
                                              self._sections, bad)
        gathered, t1, t2 = self._timed(self.comm.allgather, payload)
        update = self._updates[1] if self.held is self._updates[0] else self._updates[0]
        if self._graphs is None:
            weights, groups = self.wire.decode(gathered, validate=self.cfg.validate_payloads,
                                               sections=self._sections, step=self._expect_step)
            sparse = {gi: self._consensus(weights, idx, vals, mask, gi, out=update[gi])
                      for gi, (idx, vals, mask) in enumerate(groups)}
        else:
            sparse = self._decode_graphed(gathered, update)
        self._sync_device(self.device)
        t3 = time.perf_counter()
        sparse = {gi: picks for gi, picks in sparse.items() if picks is not None}
        self._pending = (new_m, update, sparse, float(lr) * self.cfg.lr_scale, float(weight_decay))
        W, nb = gathered.shape[0], self.wire.nbytes
        return ExchangeStats(bytes_sent=nb, bytes_received=(W - 1) * nb, dense_equivalent_bytes=self.plan.numel * 2,
                             codec_ms=((t1 - t0) + (t3 - t2)) * 1e3, comm_ms=(t2 - t1) * 1e3,
                             collective_input_bytes=nb)

    def _decode_into(self, gathered: torch.Tensor, update: list[torch.Tensor]) -> tuple[list, dict]:
        """Decode and consensus without a host sync: (the validation checks, not yet looked at; the consensus
        picks of the groups whose update is applied straight from them)."""
        weights, groups, checks = self.wire.decode(gathered, validate=self.cfg.validate_payloads, defer=True,
                                                   sections=self._sections, step=self._expect_step)
        sparse = {gi: self._consensus(weights, idx, vals, mask, gi, out=update[gi])
                  for gi, (idx, vals, mask) in enumerate(groups)}
        return checks, sparse

    def _decode_graphed(self, gathered: torch.Tensor, update: list[torch.Tensor]) -> dict:
        """Decode, validation and consensus as one CUDA graph replay (a few hundred small kernels would
        otherwise cost more host time than GPU time), then one host sync to read the checks.

        One graph per (world size, target update buffer), for the current world size only: the first use
        runs eagerly (compiles, builds the constants), the second captures. The consensus is computed before the checks are read, on clamped
        indices; a failed check raises here and the update is never marked pending.
        """
        key = (gathered.shape[0], id(update))
        entry = self._graphs.get(key)
        if entry is None:
            # a new world size: graphs of the old one go (each holds its own memory pool)
            self._graphs = {k: v for k, v in self._graphs.items() if k[0] == key[0]}
            checks, sparse = self._decode_into(gathered, update)
            self._graphs[key] = "warm"
            self.wire.raise_first_failure(checks)
            return sparse
        if entry == "warm":
            static_in = gathered.clone()

            def decode():
                checks, sparse = self._decode_into(static_in, update)  # the graph's own output tensors
                return checks, sparse, torch.stack([c for _, c in checks], 1) if checks else None

            graph, (checks, sparse, flags) = capture_graph(self.device, decode)
            entry = self._graphs[key] = (graph, static_in, flags, [r for r, _ in checks], sparse)
        graph, static_in, flags, reasons, sparse = entry
        static_in.copy_(gathered)
        graph.replay()
        if flags is not None:
            self.wire.raise_flags(flags, reasons)
        return sparse

    def _consensus(self, weights, idx, vals, mask, gi, out: torch.Tensor):
        """out = sign(idct(weighted mean over the ranks that picked each coefficient)), `[N, h, w]`.

        Groups decoded at commit (`_decode_at_commit`) write nothing here and return their picks,
        (flat indices [N, W*k], weighted means [N, W*k]); the others return None."""
        g, (ch, cw) = self.plan.groups[gi], self.bases[gi]
        flat_idx, coef = consensus_picks(idx, vals, mask, weights, g.numel, self.fused[gi])
        if self._decode_at_commit[gi]:
            return flat_idx, coef
        if self.fused[gi]:
            kernels.fused_decode(flat_idx, coef, ch, cw, out, rms=self.cfg.update == "rms")
            return None
        x = sparse_idct2(flat_idx, coef, ch, cw)
        if self.cfg.update == "rms":  # unit RMS per chunk: the smooth decoded direction, no sign harmonics
            rms = x.square().mean(dim=(1, 2), keepdim=True).sqrt_()
            out.copy_(torch.where(rms > 0, x / rms.clamp_min(1e-30), torch.zeros_like(x)))
        elif out.dtype == x.dtype:
            torch.sign(x, out=out)
        else:
            out.copy_(x.sign_())
        return None

    supports_undo = True

    def commit(self, keep_undo: bool = False) -> None:
        if self._pending is None:
            raise RuntimeError("commit() without a successful exchange()")
        self._undo = None
        if keep_undo:  # a device copy of the parameters; the rest is references the commit only re-points
            with torch.no_grad():
                if self._undo_params is None:
                    self._undo_params = [torch.empty_like(p) for p in self.params]
                torch._foreach_copy_(self._undo_params, [p.detach() for p in self.params])
            self._undo = (self._pending, self.momentum, self._scratch, self.held, self.step_count)
        new_m, update, sparse, lr, wd = self._pending
        if self.cfg.delayed_apply:
            update, self.held = self.held, update
        with torch.no_grad():
            if update is None:  # the first commit of delayed_apply: weight decay only
                if wd:
                    torch._foreach_mul_(self.params, 1.0 - lr * wd)
            else:
                deltas = self._param_addrs.deltas(self.params) if any(self._applied) else None
                for gi in (gi for gi, a in enumerate(self._applied) if a):  # decay and update in one pass
                    if gi in sparse:  # decode and apply in one pass: the update is never stored
                        ch, cw = self.bases[gi]
                        kernels.fused_decode_apply(*sparse[gi], ch, cw, self.params, deltas, self._tables[gi], lr,
                                                   1.0 - lr * wd, rms=self.cfg.update == "rms")
                    else:
                        kernels.fused_apply(update[gi], self.params, deltas, self._tables[gi], lr, 1.0 - lr * wd)
                if self._torch_params:
                    if wd:
                        torch._foreach_mul_(self._torch_params, 1.0 - lr * wd)
                    tiles = self._param_tiles(self.params)
                    ups = self._out_views[id(update)](update)
                    torch._foreach_add_(tiles, [u if u.dtype == t.dtype else u.to(t.dtype) for u, t in zip(ups, tiles)],
                                        alpha=-lr)
        self.momentum, self._scratch = new_m, self.momentum
        self.step_count += 1
        self._pending = None

    def abort(self) -> None:
        self._pending = None

    def undo(self) -> None:
        """Back to just before the last commit(keep_undo=True): parameters, momentum, held update, step count
        and the pending update, bit for bit."""
        if self._undo is None:
            raise RuntimeError("undo() without a commit(keep_undo=True) to undo")
        (self._pending, self.momentum, self._scratch, self.held, self.step_count), self._undo = self._undo, None
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.params], self._undo_params)

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self, on_device: bool = False) -> dict:
        # scatter builds new parameter-shaped tensors: on the device they are already a copy
        move = (lambda t: t.detach()) if on_device else (lambda t: t.detach().cpu())
        sd = {"strategy": "demo", "step_count": self.step_count,
              "momentum": [move(t) for t in self.plan.scatter(self.momentum)]}
        if self.held is not None:
            sd["held_update"] = [move(t) for t in self.plan.scatter(self.held)]
        return sd

    def state_layout(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        shapes = [tuple(s) for s in self.plan.shapes]
        out = [(s, self.momentum[0].dtype) for s in shapes]
        if self.cfg.delayed_apply:  # the held consensus, once the first step has run
            out += [(s, self.update_dtype) for s in shapes]
        return out

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("strategy") != "demo":
            raise ValueError(f"load_state_dict: state of strategy '{sd.get('strategy')}' given to demo")
        mom = sd["momentum"]
        shapes = [tuple(t.shape) for t in mom]
        if shapes != self.plan.shapes:
            raise ValueError(f"load_state_dict: momentum shapes {shapes[:3]}... do not match parameters")
        loaded = self.plan.gather([t.to(self.device) for t in mom], self.device)
        torch._foreach_copy_(self.momentum, loaded)  # into the persistent buffer: its views stay valid
        held = sd.get("held_update")
        self.held = None
        if held is not None:  # into a persistent update buffer too (its views and tables stay valid)
            loaded = self.plan.gather([t.to(self.device) for t in held], self.device, dtype=self.update_dtype)
            torch._foreach_copy_(self._updates[0], loaded)
            self.held = self._updates[0]
        self.step_count = int(sd["step_count"])
        self._pending = None
        self._undo = None
