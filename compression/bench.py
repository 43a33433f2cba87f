"""`python -m compression bench`: bytes on the wire and codec time of the demo sync vs fused AdamW.

Owns the two GPT-2-shaped presets it measures (a local nanoGPT-like module: compression must not import
`elastic`). Promises: bytes come from the real wire layout of the model's parameters; times are medians
over `--steps` after warm-up, with the device synchronized around every timed region.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from compression.communicator import run_threads
from compression.config import SyncConfig
from compression.dct import ChunkPlan
from compression.demo import DemoSync, demo_wire_format


@dataclass(frozen=True)
class GPTShape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int = 50304      # GPT-2's 50257 padded to a multiple of 64 (clean 64x64 chunks)
    block: int = 1024


PRESETS = {
    "micro": GPTShape(n_layer=1, n_embd=64, n_head=2, vocab=1024, block=64),  # smoke tests of the command
    "tiny": GPTShape(n_layer=4, n_embd=256, n_head=4, block=256),
    "gpt2-small": GPTShape(n_layer=12, n_embd=768, n_head=12, block=1024),  # 163M with the untied head
}


class Block(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.n_head = s.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(s.n_embd), nn.LayerNorm(s.n_embd)
        self.c_attn, self.c_proj = nn.Linear(s.n_embd, 3 * s.n_embd), nn.Linear(s.n_embd, s.n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(s.n_embd, 4 * s.n_embd), nn.Linear(4 * s.n_embd, s.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT-shaped (biases on, untied lm head) so the parameter shapes match the reference figures."""

    def __init__(self, s: GPTShape):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(s.vocab, s.n_embd), nn.Embedding(s.block, s.n_embd)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd)
        self.lm_head = nn.Linear(s.n_embd, s.vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def param_shapes(preset: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a preset without allocating it."""
    with torch.device("meta"):
        return [tuple(p.shape) for p in GPT(PRESETS[preset]).parameters()]


def wire_bytes(shapes, cfg: SyncConfig) -> int:
    return demo_wire_format(ChunkPlan(shapes, cfg.chunk), cfg.topk, cfg.value_bits).nbytes


def _timed(fn, device, steps: int, warmup: int = 1) -> list[float]:
    """Wall ms of `fn()` per call (CUDA events on GPU, perf_counter on CPU)."""
    out = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            out.append(ms)
    return out


def bench(device: str, model: str, steps: int, workers: int, topk: int, value_bits: int, batch: int | None,
          full_step: bool, kernels: str = "auto") -> dict:
    dev = torch.device(device)
    shape = PRESETS[model]
    torch.manual_seed(0)
    cfg = SyncConfig(name="demo", topk=topk, value_bits=value_bits, kernels=kernels)
    net = GPT(shape).to(dev)
    params = list(net.parameters())
    numel = sum(p.numel() for p in params)
    res = {"model": model, "device": device, "machine": _machine(dev), "torch": torch.__version__,
           "params": numel, "world_size": workers, "topk": topk, "value_bits": value_bits, "steps": steps,
           "kernels": kernels}

    def demo_rank(comm):
        ps = params if comm.rank == 0 else [p.detach().clone().requires_grad_() for p in params]
        g = torch.Generator(device=dev).manual_seed(1 + comm.rank)
        # two gradient sets used in turn: new tensors every step, as `zero_grad(set_to_none=True)` gives
        grad_sets = [[torch.randn(p.shape, device=dev, generator=g) * 1e-3 for p in ps] for _ in range(2)]
        sync = DemoSync(cfg, ps, comm)
        rows = []
        for i in range(steps + 1):
            for p, gr in zip(ps, grad_sets[i % 2]):
                p.grad = gr
            st = sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1)
            commit = _timed(sync.commit, dev, 1, warmup=0)[0]
            if i:  # the first step warms up allocator and kernels
                rows.append((st.codec_ms, st.comm_ms, commit))
        prof = {}
        if comm.world_size == 1:  # the profiler sees every thread: count only when this is the only rank
            for p, gr in zip(ps, grad_sets[(steps + 1) % 2]):
                p.grad = gr
            prof = profile_step(lambda: (sync.exchange(lr=1e-3, weight=1.0, weight_decay=0.1), sync.commit()),
                                dev.type == "cuda")
        return st, rows, prof, sum(sync.fused)

    st, rows, prof, fused = run_threads(workers, demo_rank, timeout=3600)[0]
    codec = statistics.median(r[0] for r in rows)
    commit = statistics.median(r[2] for r in rows)
    res.update(bytes_sent_per_worker=st.bytes_sent, bytes_received_per_worker=st.bytes_received,
               dense_bf16_bytes=st.dense_equivalent_bytes,
               ratio_vs_dense_bf16=round(st.dense_equivalent_bytes / st.bytes_sent, 1),
               codec_ms=round(codec, 2), apply_ms=round(commit, 2), codec_plus_apply_ms=round(codec + commit, 2),
               comm_ms=round(statistics.median(r[1] for r in rows), 2), fused_groups=fused, **prof)

    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type in ("cuda", "cpu"))
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adamw = statistics.median(_timed(opt.step, dev, steps))
    res["adamw_fused_step_ms"] = round(adamw, 2)
    res["codec_vs_adamw_step"] = round((codec + commit) / adamw, 2)
    if full_step:
        B = batch or (8 if dev.type == "cuda" else 1)
        T = shape.block
        x = torch.randint(0, shape.vocab, (B, T), device=dev)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

        def train_step():
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = net(x, x)
            loss.backward()
            opt.step()

        full = statistics.median(_timed(train_step, dev, steps))
        res.update(batch=f"{B}x{T}", full_adamw_step_ms=round(full, 2),
                   codec_pct_of_full_adamw_step=round(100 * (codec + commit) / full, 1))
    return res


def bench_shards(device: str, model: str, steps: int, shards: int, topk: int, value_bits: int,
                 kernels: str = "auto") -> dict:
    """sync.hierarchy=node's codec on one rank: encode + decode of shard 0 of `shards` (1/shards of every chunk
    group, `compression.hierarchy.ShardCodec`) against the same code on the whole chunk set (shards=1), on the
    same gradients; one node (the decode sees its own payload). Medians over `steps` after two warm-up rounds, the
    two timed in turn."""
    from compression.hierarchy import ShardCodec

    dev = torch.device(device)
    cfg = SyncConfig(name="demo", topk=topk, value_bits=value_bits, kernels=kernels)  # torch ops + Triton sections
    shapes = param_shapes(model)
    plan = ChunkPlan(shapes, cfg.chunk)
    g = torch.Generator(device=dev).manual_seed(1)
    chunks = plan.gather([torch.randn(s, device=dev, generator=g) * 1e-3 for s in shapes], dev)
    weight = torch.ones((), dtype=torch.float64, device=dev)
    res = {"model": model, "device": device, "machine": _machine(dev), "torch": torch.__version__, "shards": shards,
           "topk": topk, "value_bits": value_bits, "steps": steps, "kernels": kernels}
    steppers = {}
    for name, count in (("whole", 1), ("shard", shards)):
        codec = ShardCodec(cfg, plan, 0, count, dev)

        def step(codec=codec, count=iter(range(1 << 62))):
            n = next(count)  # a new step number every time, as in a run (the headers carry it)
            payload, new_m, _ = codec.encode(chunks, 1e-3, weight, 0, n)
            codec.decode(payload.unsqueeze(0), n)
            codec.momentum = new_m

        steppers[name] = step
        res[f"{name}_payload_bytes"] = codec.wire.nbytes
        res["sections"] = type(codec.sections).__name__  # TritonSections: the payload packed by kernels
        res["cuda_graphs"] = codec.graphed  # encode and decode replayed as CUDA graphs
    # whole and shard in turn, so both see the same machine load (a shared CPU's load swings by 2x in a minute)
    times = {name: [] for name in steppers}
    for i in range(steps + 2):
        for name, step in steppers.items():
            ms = _timed(step, dev, 1, warmup=0)[0]
            if i >= 2:  # the first two rounds warm up (compile; with CUDA graphs: run eagerly, then capture)
                times[name].append(ms)
    for name, ms in times.items():
        res[f"{name}_codec_ms"] = round(statistics.median(ms), 3)
    res["shard_vs_whole"] = round(res["shard_codec_ms"] / res["whole_codec_ms"], 3)
    # where the time goes, one step each: the ops dispatched from the host and, on CUDA, the kernels and their
    # GPU time (what does not halve with the shard shows as kernels of equal count and size in both)
    for name, step in steppers.items():
        res[f"{name}_profile"] = profile_step(step, dev.type == "cuda")
    return res


def profile_step(fn, cuda: bool) -> dict:
    """One `fn()` under the torch profiler: `dispatched_ops_per_step`, the top-level aten ops it dispatches
    (views included: on a GPU each costs host time, and every one that computes is a kernel launch), and
    on CUDA the GPU time of its kernels (`gpu_kernel_ms_per_step`) with the largest ones by name."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    out = {"dispatched_ops_per_step": sum(
        1 for e in events
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))}
    if cuda:
        by_name: dict[str, float] = {}
        launches = 0
        for e in events:
            if e.device_type.name == "CUDA":
                by_name[e.name[:90]] = by_name.get(e.name[:90], 0.0) + e.device_time_total / 1e3
                launches += 1
        out["gpu_kernel_ms_per_step"] = round(sum(by_name.values()), 3)
        out["gpu_kernels_per_step"] = launches
        out["gpu_top_kernels_ms"] = {k: round(v, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:8]}
    return out


def _machine(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compression bench", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1, help="ranks as threads of this process (bytes are per worker)")
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--value-bits", type=int, default=1, choices=[1, 16])
    ap.add_argument("--batch", type=int, default=None, help="sequences per full step (default 8 on cuda, 1 on cpu)")
    ap.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                    help="sync.kernels: fused Triton kernels (auto on CUDA) or the torch reference path")
    ap.add_argument("--no-full-step", action="store_true", help="skip the fwd+bwd+AdamW timing")
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: indented)")
    ap.add_argument("--shards", type=int, default=0, help="sync.hierarchy=node: time the codec of one shard of 1/G "
                    "of the chunks against the whole chunk set (G local ranks per node), instead of the rest")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    if a.shards:
        if a.shards < 1:
            ap.error(f"--shards {a.shards}: must be >= 1 (the local ranks per node)")
        res = bench_shards(a.device, a.model, a.steps, a.shards, a.topk, a.value_bits, a.kernels)
        print(json.dumps(res) if a.json else json.dumps(res, indent=2))
        return 0
    res = bench(a.device, a.model, a.steps, a.workers, a.topk, a.value_bits, a.batch, not a.no_full_step, a.kernels)
    print(json.dumps(res) if a.json else json.dumps(res, indent=2))
    return 0
