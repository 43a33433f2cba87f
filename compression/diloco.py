"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105): local AdamW steps, an outer (Nesterov) SGD step every H.

Every rank keeps the global parameters `theta_g` (identical everywhere) and trains its own copy with AdamW
(the inner optimizer, lr from the caller's schedule). Every `inner_steps` steps, or when the caller asks
(`boundary=True`: the last step, a checkpoint):
    delta_r = theta_g - theta_r                            (after this step's inner update)
    int8 per block of 1024, float32 scale = max|block| / 127 -> one payload, one all-gather
    delta   = sum_r w_r dequant(delta_r) / sum_r w_r       (w_r: tokens since the last outer step, rank order)
  or, with `sync.outer_topk=k` (SparseLoCo-style, Sarfi et al. 2025, arXiv 2508.15706):
    e_r     = outer_feedback * e_r + delta_r               (error feedback, per rank, in DeMo's chunk layout)
    the top-k DCT coefficients of every chunk of e_r, bf16 values -> one payload; e_r -= what was picked
    delta   = sum_r w_r idct(picks_r) / sum_r w_r          (rank order)
    buf     = momentum * buf + delta;  theta_g -= outer_lr * (delta + momentum * buf)   (Nesterov, as torch SGD)
    theta_r = theta_g on every rank
Between outer steps nothing is sent.
Promises (besides the `Sync` contract):
- `replica_tensors()` (theta_g and the outer momentum) are bitwise equal on every rank after every step, and
  the parameters too right after an outer step: the outer update is computed only from the gathered bytes
  with elementwise ops and a fixed-order reduction over ranks;
- `exchange` leaves parameters and state untouched: an inner step is applied by `commit` (AdamW on the
  held gradients, as the dense baseline does); an outer step runs the inner step on the live tensors, keeps
  the results, and puts the old values back;
- a non-finite gradient is refused by `exchange` (`PayloadError` naming this rank) before it reaches the
  parameters; a received payload is validated like a DeMo one (size, magic, rank, checksum, weight, step) plus
  finite non-negative scales and int8 values in [-127, 127].
"""
from __future__ import annotations

import math
import time

import torch

from compression.codec import HEADER_BYTES, Framing, PayloadError, packed_copy
from compression.communicator import Communicator
from compression.config import SyncConfig, sync_option_problem
from compression.dct import ChunkPlan, dct2, dct_basis, sparse_idct2
from compression.demo import demo_wire_format
from compression.dense import adamw_layout, adamw_state, adamw_step_on, build_adamw
from compression.sync import ExchangeStats, Sync

BLOCK = 1024  # elements per int8 scale: 0.4% of the payload in scales


class DeltaWire(Framing):
    """Header, then float32 scales (one per block), then the int8 values (padded to whole blocks)."""

    magic = b"DLC1"

    def __init__(self, numel: int, block: int = BLOCK):
        self.numel, self.block = numel, block
        self.n_blocks = math.ceil(numel / block)
        super().__init__(HEADER_BYTES + self.n_blocks * 4 + self.n_blocks * block)

    def encode(self, delta: torch.Tensor, rank: int, step: int, weight: float | torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(self.n_blocks * self.block, device=delta.device)
        padded[:self.numel] = delta
        blocks = padded.view(self.n_blocks, self.block)
        scale = blocks.abs().amax(1) / 127.0
        q = torch.where(scale[:, None] > 0, blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None],
                        torch.zeros_like(blocks)).round_().clamp_(-127, 127).to(torch.int8)
        head = self.header(rank, step, weight, delta.device)
        return self.seal(torch.cat([head, scale.view(torch.uint8), q.view(torch.uint8).reshape(-1)]))

    def decode(self, gathered: torch.Tensor, validate: bool = True,
               step: int | None = None) -> tuple[torch.Tensor, list[tuple]]:
        """`[W, nbytes]` -> (weights [W] float64, per rank (int8 blocks, scales): `delta(q, scale)` dequantizes);
        `step`: the step every header must carry."""
        weights, checks = self.check_header(gathered, validate, step)
        W, off = gathered.shape[0], HEADER_BYTES
        scale = packed_copy(gathered[:, off:off + 4 * self.n_blocks]).view(torch.float32).view(W, self.n_blocks)
        q = gathered[:, off + 4 * self.n_blocks:].view(torch.int8).view(W, self.n_blocks, self.block)
        if validate:
            checks.append(("scale is not finite or negative", (torch.isfinite(scale) & (scale >= 0)).all(1)))
            checks.append(("int8 value -128 (outside the symmetric range)", (q != -128).flatten(1).all(1)))
        self.raise_first_failure(checks)
        return weights, [(q[r], scale[r]) for r in range(W)]

    def delta(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """One rank's `[numel]` float32 delta from its int8 blocks and scales (one rank at a time: W of them
        at once would be W model-sized float tensors)."""
        return (q.to(torch.float32) * scale[:, None]).view(-1)[:self.numel]

    def mean(self, gathered: torch.Tensor, validate: bool, step: int) -> torch.Tensor:
        """The weighted mean `[numel]` of the ranks' deltas (rank order: the same float sums everywhere)."""
        weights, ranks = self.decode(gathered, validate=validate, step=step)
        share = shares(weights)
        mean = torch.zeros(self.numel, device=gathered.device)
        for r, (q, scale) in enumerate(ranks):
            mean.add_(self.delta(q, scale), alpha=share[r])
        return mean


def shares(weights: torch.Tensor) -> list[float]:
    """Each rank's share of the outer step, w_r / sum w (one host sync); a total that is not > 0 is an error."""
    w = weights.double()
    share = (w / w.sum()).tolist()
    if not all(math.isfinite(x) for x in share):
        raise PayloadError(-1, f"total weight {float(w.sum())} of the outer step is not > 0 (no rank trained)")
    return share


class SparseDelta:
    """The outer delta as DeMo's payload: top-k DCT coefficients per chunk (`sync.chunk`), bf16 values.

    What is not sent stays in the rank's error-feedback residual `e` (chunk layout, one `[N, h, w]` buffer per
    chunk group), decayed by `outer_feedback` and added to the next delta, so every part of every rank's
    delta is sent eventually. Bytes per outer step: `nbytes` (12-bit index + 16-bit value per pick)."""

    def __init__(self, shapes: list[tuple[int, ...]], chunk: int, topk: int, device):
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.plan = ChunkPlan(self.shapes, chunk)
        self.wire = demo_wire_format(self.plan, topk, 16)
        self.ks = [g.k for g in self.wire.groups]
        self.bases = [(dct_basis(g.h, device), dct_basis(g.w, device)) for g in self.plan.groups]
        self.device = device

    @property
    def nbytes(self) -> int:
        return self.wire.nbytes

    def zero_feedback(self) -> list[torch.Tensor]:
        return [torch.zeros(g.n_chunks, g.h, g.w, device=self.device) for g in self.plan.groups]

    def encode(self, delta: torch.Tensor, feedback: list[torch.Tensor], decay: float, rank: int, step: int,
               weight: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(payload, the new residual); `feedback` is left as it was (the caller keeps the new one at commit)."""
        chunks = self.plan.gather([v.view(s) for v, s in zip(delta.split(self.sizes), self.shapes)], self.device)
        for c, e in zip(chunks, feedback):
            c.add_(e, alpha=decay)
        picks = []
        for c, (ch, cw), k in zip(chunks, self.bases, self.ks):  # c becomes the residual
            coef = dct2(c, ch, cw).reshape(c.shape[0], -1)
            idx = coef.abs().topk(k, dim=1, sorted=True).indices
            val = coef.gather(1, idx).to(torch.bfloat16).float()  # what peers will decode, bit for bit
            c.sub_(sparse_idct2(idx, val, ch, cw))  # so the residual keeps the bf16 rounding too
            picks.append((idx, val))
        payload = self.wire.encode([i for i, _ in picks], [v for _, v in picks], rank, step, weight)
        return payload, chunks

    def mean(self, gathered: torch.Tensor, validate: bool, step: int) -> torch.Tensor:
        """The weighted mean `[numel]` of the ranks' decoded picks (rank order: the same float sums everywhere)."""
        weights, groups = self.wire.decode(gathered, validate=validate, step=step)
        share = shares(weights)
        out = []
        for (idx, vals, _), (ch, cw), g in zip(groups, self.bases, self.plan.groups):
            x = torch.zeros(g.n_chunks, g.h, g.w, device=gathered.device)
            for r in range(gathered.shape[0]):
                x.add_(sparse_idct2(idx[r], vals[r].float(), ch, cw), alpha=share[r])
            out.append(x)
        return torch.cat([t.reshape(-1) for t in self.plan.scatter(out)])

    def to_params(self, feedback: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.plan.scatter(feedback)

    def from_params(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if [tuple(t.shape) for t in tensors] != self.shapes:
            raise ValueError("load_state_dict: the outer error feedback's shapes do not match the parameters")
        return self.plan.gather([t.to(self.device) for t in tensors], self.device)


class DilocoSync(Sync):
    def __init__(self, cfg: SyncConfig, params: list[torch.Tensor], comm: Communicator):
        problem = sync_option_problem(cfg, "diloco")
        if problem:
            raise ValueError(problem)
        if len({p.device for p in params}) != 1:
            raise ValueError("diloco sync needs all parameters on one device")
        self.cfg, self.params, self.comm = cfg, params, comm
        self.device = params[0].device
        self.numel = sum(p.numel() for p in params)
        # the outer delta's codec: dense int8 blocks, or DCT top-k picks with a per-rank error feedback
        self.sparse = cfg.outer_topk > 0
        self.wire = (SparseDelta([tuple(p.shape) for p in params], cfg.chunk, cfg.outer_topk, self.device)
                     if self.sparse else DeltaWire(self.numel))
        self.feedback = self.wire.zero_feedback() if self.sparse else []
        self.opt = build_adamw(params, tuple(cfg.betas), cfg.eps)
        with torch.no_grad():
            self.theta_g = self._flat(params)
        self.outer_buf = torch.zeros_like(self.theta_g)
        self.phase_weight = 0.0  # tokens this rank trained on since the last outer step
        self.step_count = 0
        self._pending: dict | None = None

    @property
    def payload_bytes(self) -> int:
        return self.wire.nbytes

    def replica_tensors(self) -> list[torch.Tensor]:
        return [self.theta_g, self.outer_buf]

    @staticmethod
    def _flat(tensors) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    # ---- the two phases -----------------------------------------------------------------------------
    def exchange(self, lr: float, weight: float, weight_decay: float = 0.0, boundary: bool = False,
                 step: int | None = None) -> ExchangeStats:
        self._pending = None
        t0 = time.perf_counter()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        weight = float(weight)
        finite = math.isfinite(weight) and bool(torch.stack(
            torch._foreach_norm(grads, ord=float("inf"))).isfinite().all())  # one host sync
        outer = boundary or (self.step_count + 1) % self.cfg.inner_steps == 0
        if not finite and not outer:
            raise PayloadError(self.comm.rank, "non-finite gradient or weight (inner step refused)")
        pending = {"grads": grads, "lr": float(lr), "wd": float(weight_decay),
                   "phase_weight": self.phase_weight + (weight if finite else 0.0)}
        stats = dict(bytes_sent=0, bytes_received=0, comm_ms=0.0, collective_input_bytes=0)
        if outer:
            # a non-finite rank still enters the collective (peers are waiting) with a NaN weight:
            # everyone, this rank included, rejects its payload and nothing is applied
            theta_r, inner_state = self._inner_step_aside(pending)
            delta = self.theta_g - theta_r
            w = pending["phase_weight"] if finite else float("nan")
            seq = self.step_count if step is None else int(step)  # every peer's header must carry it
            if self.sparse:
                payload, pending["feedback"] = self.wire.encode(delta, self.feedback, self.cfg.outer_feedback,
                                                                self.comm.rank, seq, w)
            else:
                payload = self.wire.encode(delta, self.comm.rank, seq, w)
            gathered, t1, t2 = self._timed(self.comm.allgather, payload)
            mean = self.wire.mean(gathered, self.cfg.validate_payloads, seq)
            buf = self.outer_buf * self.cfg.outer_momentum + mean
            theta_g = self.theta_g - self.cfg.outer_lr * (mean + self.cfg.outer_momentum * buf)
            pending.update(inner_state=inner_state, theta_g=theta_g, outer_buf=buf)
            W, nb = gathered.shape[0], self.wire.nbytes
            stats = dict(bytes_sent=nb, bytes_received=(W - 1) * nb, comm_ms=(t2 - t1) * 1e3,
                         collective_input_bytes=nb)
            t0 += t2 - t1  # codec time excludes the collective
        self._sync_device(self.device)
        self._pending = pending
        codec_ms = (time.perf_counter() - t0) * 1e3
        return ExchangeStats(dense_equivalent_bytes=self.numel * 2, codec_ms=codec_ms, **stats)

    def _inner_step_aside(self, pending: dict) -> tuple[torch.Tensor, dict]:
        """Run this step's AdamW update on the live tensors, keep its results, put the old values back."""
        params = self.params
        saved_params = [p.detach().clone() for p in params]
        saved_state = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.opt.state[p].items()}
                       for p in params if p in self.opt.state}
        try:
            adamw_step_on(self.opt, params, pending["grads"], pending["lr"], pending["wd"])
            theta_r = self._flat(params)
            inner_state = {p: dict(self.opt.state[p]) for p in params}
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in params], saved_params)
            for p in params:
                if p in saved_state:
                    self.opt.state[p] = saved_state[p]
                else:
                    self.opt.state.pop(p, None)
        return theta_r, inner_state

    def commit(self) -> None:
        if self._pending is None:
            raise RuntimeError("commit() without a successful exchange()")
        pending, self._pending = self._pending, None
        if "theta_g" in pending:  # outer step: everyone lands on the new global parameters
            for p in self.params:
                self.opt.state[p] = pending["inner_state"][p]
            self.theta_g, self.outer_buf = pending["theta_g"], pending["outer_buf"]
            with torch.no_grad():
                sizes = [p.numel() for p in self.params]
                torch._foreach_copy_([p.detach() for p in self.params],
                                     [v.view_as(p) for v, p in zip(self.theta_g.split(sizes), self.params)])
            self.phase_weight = 0.0
            if self.sparse:
                self.feedback = pending["feedback"]
        else:
            adamw_step_on(self.opt, self.params, pending["grads"], pending["lr"], pending["wd"])
            self.phase_weight = pending["phase_weight"]
        self.step_count += 1

    def abort(self) -> None:
        self._pending = None

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self, on_device: bool = False) -> dict:
        copy = (lambda t: t.detach()) if on_device else (lambda t: t.detach().cpu().clone())
        return {"strategy": "diloco", "step_count": self.step_count, "phase_weight": self.phase_weight,
                "theta_g": copy(self.theta_g), "outer_buf": copy(self.outer_buf),
                "adamw": adamw_state(self.opt, on_device),
                # the unsent residual is this rank's own: a rank that loads another rank's state starts without it
                **({"outer_feedback": [copy(t) for t in self.wire.to_params(self.feedback)],
                    "feedback_rank": self.comm.rank} if self.sparse else {})}

    def state_layout(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [(tuple(self.theta_g.shape), self.theta_g.dtype), (tuple(self.outer_buf.shape), self.outer_buf.dtype),
                *adamw_layout(self.opt),
                *([(s, torch.float32) for s in self.wire.shapes] if self.sparse else [])]

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("strategy") != "diloco":
            raise ValueError(f"load_state_dict: state of strategy '{sd.get('strategy')}' given to diloco")
        if tuple(sd["theta_g"].shape) != (self.numel,):
            raise ValueError(f"load_state_dict: global parameters of {sd['theta_g'].numel()} elements, "
                             f"the model has {self.numel}")
        self.opt.load_state_dict(sd["adamw"])
        self.theta_g = sd["theta_g"].to(self.device, torch.float32).clone()
        self.outer_buf = sd["outer_buf"].to(self.device, torch.float32).clone()
        self.phase_weight = float(sd["phase_weight"])
        self.step_count = int(sd["step_count"])
        if self.sparse:
            # another rank's residual (a joiner taking a live peer's state, a resume onto a rank without its
            # own file) is that rank's debt, not ours: loading it too would send it twice. A state saved
            # without one (int8 outer steps before) has nothing unsent either
            fb = sd.get("outer_feedback")
            own = fb is not None and sd.get("feedback_rank") == self.comm.rank
            self.feedback = self.wire.from_params(fb) if own else self.wire.zero_feedback()
        self._pending = None
