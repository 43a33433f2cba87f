"""The model every worker holds a replica of: a small GPT in plain torch (nanoGPT's shape), or any Hugging
Face causal LM from a local directory (`model.hf=PATH`, wrapped by `HFCausalLM`).

The built-in GPT's vocabulary is padded to a multiple of 64 so DCT chunks tile every matrix evenly (the codec
also takes shapes that do not tile: it cuts them into the largest divisors, as it must for HF models).

What the worker uses of a model, whichever it is: `model(x, y) -> (logits, loss)` (loss: mean cross-entropy
over targets >= 0), `model.shape.n_embd`, and `model.warmup_attention()` (an attention layer to build
cuDNN graphs with, or None to skip that).

`CompiledLoss` (`train.compile`) is that loss through `torch.compile`, one graph for every micro-batch row
count; the worker and bench-gpu's baselines both train through it.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("raydistro.model")


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    return (vocab_size + multiple - 1) // multiple * multiple


@dataclass
class GPTShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    dropout: float = 0.0
    tie_embeddings: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.n_head = s.n_head
        self.qkv = nn.Linear(s.n_embd, 3 * s.n_embd)
        self.proj = nn.Linear(s.n_embd, s.n_embd)
        self.dropout = s.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.ln1 = nn.LayerNorm(s.n_embd)
        self.attn = CausalSelfAttention(s)
        self.ln2 = nn.LayerNorm(s.n_embd)
        self.fc = nn.Linear(s.n_embd, 4 * s.n_embd)
        self.out = nn.Linear(4 * s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.shape = s
        self.wte = nn.Embedding(s.vocab_size, s.n_embd)
        self.wpe = nn.Embedding(s.block_size, s.n_embd)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd)
        self.lm_head = nn.Linear(s.n_embd, s.vocab_size, bias=False)
        if s.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * s.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        # mean over real tokens; padding carries target -1
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def warmup_attention(self) -> nn.Module:
        """The layer `elastic.attention.AttentionShapes` runs to build cuDNN graphs before training."""
        return self.blocks[0].attn


def build_model(model_cfg, tokenizer_vocab: int, seed: int) -> nn.Module:
    """Build the model from the `model` config section; same seed -> bit-identical initial replicas.

    `model.hf=PATH`: a Hugging Face causal LM (`HFCausalLM`), else the built-in GPT."""
    if getattr(model_cfg, "hf", ""):
        return build_hf_model(model_cfg, tokenizer_vocab, seed)
    vocab = model_cfg.vocab_size or padded_vocab(tokenizer_vocab)
    if vocab < tokenizer_vocab:
        raise ValueError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    shape = GPTShape(model_cfg.n_layer, model_cfg.n_head, model_cfg.n_embd, model_cfg.block_size,
                     vocab, model_cfg.dropout, model_cfg.tie_embeddings)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT(shape)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


# ---- Hugging Face causal LMs (model.hf=PATH) ----------------------------------------------------------

HF_PREFIX = "hf."  # the wrapper's state_dict keys are the HF model's own behind this prefix


class HFModelError(ValueError):
    """model.hf names something that cannot be loaded; the message says what and how to fix it."""


def hf_offline() -> None:
    """Never reach a hub: every HF library call in this process stays on the local disk."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _transformers():
    hf_offline()
    try:
        import transformers
    except ImportError as e:
        raise HFModelError("model.hf needs the `transformers` package: pip install -e '.[hf]' "
                           "(transformers, safetensors, tokenizers)") from e
    return transformers


def hf_config(path: str, vocab_size: int = 0):
    """The model's `PretrainedConfig` from `path/config.json` (offline), vocab_size overridden if given."""
    d = Path(path).expanduser()
    if not (d / "config.json").is_file():
        raise HFModelError(f"model.hf: {path} has no config.json; point it at a local directory holding a "
                           "Hugging Face model's config.json (downloads from a hub are never made)")
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise HFModelError(f"model.hf: {d}/config.json cannot be read by transformers "
                           f"{tf.__version__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if vocab_size:
        config.vocab_size = vocab_size
    return config


@dataclass
class HFShape:
    """What the worker and the summary read of a model's shape (GPTShape's fields that exist for any LM)."""
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    tie_embeddings: bool


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the built-in GPT's interface: `forward(idx, targets) -> (logits, loss)`
    with the same loss (mean over targets >= 0; -1 marks padding), `shape`, `warmup_attention()` (None: HF
    attention kernels vary by model, so cuDNN graphs are not built up front; a new row count builds its
    own on first sight, as with `train.attention_warm_rows=0`). The HF model is `self.hf`; state_dict keys
    are its own with the prefix `hf.` (`export` strips it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        c = model.config
        self.shape = HFShape(
            n_layer=int(getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0)),
            n_head=int(getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0)),
            n_embd=int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0)),
            vocab_size=int(c.vocab_size),
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )
        # learned absolute positions (GPT-2, OPT, ...) end at the config's count; rotary ones (Llama, Qwen, ...) go on
        rotary = any(getattr(c, k, None) for k in ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim"))
        self.max_positions = None if rotary else (getattr(c, "n_positions", None)
                                                  or getattr(c, "max_position_embeddings", None))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        if self.max_positions and idx.size(1) > self.max_positions:
            raise ValueError(f"rows of {idx.size(1)} tokens exceed the model's {self.max_positions} learned positions "
                             "(config.json n_positions/max_position_embeddings); lower train.seq_len")
        logits = self.hf(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def warmup_attention(self) -> None:
        return None


def build_hf_model(model_cfg, tokenizer_vocab: int, seed: int) -> HFCausalLM:
    """`model.hf=PATH`: `AutoModelForCausalLM.from_config` (initialized from `seed`: every replica the same
    bits), or with `model.hf_weights=true` the weights in PATH (safetensors or torch files). float32
    parameters (`train.dtype=bfloat16` autocasts on CUDA, as for the built-in GPT)."""
    path = str(Path(model_cfg.hf).expanduser())
    config = hf_config(path, model_cfg.vocab_size)
    if config.vocab_size < tokenizer_vocab:
        raise HFModelError(
            f"model.hf: {path}/config.json has vocab_size {config.vocab_size}, smaller than the tokenizer's "
            f"{tokenizer_vocab}; use the model's own tokenizer (data.tokenizer=hf:{path}) or set "
            f"model.vocab_size >= {tokenizer_vocab}")
    tf = _transformers()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if getattr(model_cfg, "hf_weights", False):
            if not any(any(Path(path).glob(pat)) for pat in ("*.safetensors", "pytorch_model*.bin")):
                raise HFModelError(f"model.hf_weights=true but {path} holds no *.safetensors or pytorch_model*.bin; "
                                   "put the weights there or drop model.hf_weights to start from random weights")
            model = tf.AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                            trust_remote_code=False, dtype=torch.float32)
        else:
            model = tf.AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)
    except HFModelError:
        raise
    except Exception as e:
        raise HFModelError(f"model.hf: transformers cannot build a causal LM from {path}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        torch.random.set_rng_state(gen_state)
    model = model.float()
    model.train()
    return HFCausalLM(model)


# ---- torch.compile of the training loss (train.compile) ------------------------------------------------

COMPILE_CHOICES = ("auto", "true", "false")


def compile_enabled(setting, device: torch.device) -> bool:
    """`train.compile`: auto -> on for CUDA, off on CPU (inductor's CPU code is slow to build and gains
    little for the tiny models CPUs run here); true / false force it."""
    choice = str(setting).lower()
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"train.compile: '{setting}' must be auto (on for CUDA workers, off on CPU), true or false")
    return device.type == "cuda" if choice == "auto" else choice == "true"


def pad_rows(x: torch.Tensor, y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x`, `y` with rows appended up to `rows`: token 0 as input, -1 (ignored) as target. The loss is the
    mean over targets >= 0 and rows never interact (causal attention within a row, per-token norms), so
    the loss and every gradient are those of the unpadded batch."""
    extra = rows - x.size(0)
    if extra <= 0:
        return x, y
    return (torch.cat([x, x.new_zeros(extra, x.size(1))]), torch.cat([y, y.new_full((extra, y.size(1)), -1)]))


class CompileHeartbeat:
    """Calls `beat` every `every_s` seconds while torch.compile is compiling anywhere in this process (dynamo's
    compile start/end callbacks): a worker that compiles mid-step keeps showing progress to the coordinator's
    liveness watch instead of looking stuck. `compiles` counts the compilations seen."""

    def __init__(self, beat: Callable[[], None] | None, every_s: float = 1.0):
        self.beat, self.every_s = beat, every_s
        self.compiles = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:  # an older torch: no heartbeat, the count stays 0
            return
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, _args) -> None:
        self.compiles += 1
        if self.beat is not None and self._stop is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._tick, args=(self._stop,), name="compile-heartbeat", daemon=True)
            self._thread.start()

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(self.every_s):
            self.beat()

    def _end(self, _args) -> None:
        """Stops the ticker and waits for it: a tick whose wait timed out just before the stop may be inside
        `beat`, and no beat may land after the compilation has ended."""
        stop, thread, self._stop, self._thread = self._stop, self._thread, None, None
        if stop is not None:
            stop.set()
        if thread is not None:
            thread.join(timeout=max(1.0, 2 * self.every_s))


class CompiledLoss:
    """`model(x, y)[1]` (the mean loss; the logits never leave the graph) through `torch.compile`.

    Row counts change from step to step (whole documents, throughput-weighted shares), so the batch
    dimension is marked dynamic: one graph serves every micro-batch of >= 2 rows, and a 1-row micro-batch
    is padded to 2 (`pad_rows`: the same loss and gradients), so nothing recompiles once `warm_up` has run.
    The sequence length stays static (every row is `train.seq_len` long).

    If compiling fails (a model dynamo or inductor cannot take, e.g. some Hugging Face architectures), the
    model runs eagerly from then on, after one warning naming it; an error the eager model raises too
    (bad input, out of memory) is raised as it is and changes nothing. The model's parameters and state
    dict are the module's own (the module is not wrapped: no `_orig_mod.` prefix).

    `heartbeat` is called about every second while anything compiles (`CompileHeartbeat`): inductor may still
    specialize on size thresholds the warm-up did not cross (on CPU: micro-batches of <= 64 vs >= 65 rows of
    64 tokens), and such a recompile mid-step must not look like a stuck worker. It is logged once each."""

    MIN_ROWS = 2  # dynamo specializes a dimension of size 1: such batches are padded to this

    def __init__(self, model: nn.Module, name: str = "", heartbeat: Callable[[], None] | None = None):
        self.model = model
        self.name = name or type(model).__name__
        self.watch = CompileHeartbeat(heartbeat)
        self.fallback = ""  # why it runs eagerly, once compiling failed
        self.warm_up_s = 0.0
        self.warmed = False
        self._compiled = torch.compile(self._loss)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y)[1]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fallback:
            return self._loss(x, y)
        xp, yp = pad_rows(x, y, self.MIN_ROWS)
        seen = self.watch.compiles
        try:
            torch._dynamo.mark_dynamic(xp, 0)
            torch._dynamo.mark_dynamic(yp, 0)
            loss = self._compiled(xp, yp)
            if self.warmed and self.watch.compiles != seen:
                log.warning("train.compile: %s recompiled for a micro-batch of %d rows after its warm-up "
                            "(%d compilations so far)", self.name, xp.size(0), self.watch.compiles)
            return loss
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            loss = self._loss(x, y)  # raises if the model fails eagerly too: then compiling is not to blame
            self.fallback = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.warning("train.compile: torch.compile failed for %s (%s); training it eagerly", self.name,
                        self.fallback)
            return loss

    def warm_up(self, rows: int, seq_len: int, vocab_size: int, device: torch.device, bf16: bool) -> float:
        """Compile now, on random batches of `rows` (a full micro-batch) and of 2 rows x `seq_len` tokens (both
        ends of the dynamic range), forward and backward as a step would (the step's autocast), so no step
        waits for the compiler. Parameters are only read, their
        gradients are put back as they were and the RNG streams are restored: a replica that warmed up
        holds the same bits as one that did not. Returns the seconds it took."""
        if self.fallback or self.warmed:
            return 0.0
        t0 = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None  # the backward would add into the saved tensors in place
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                gen = torch.Generator(device=device).manual_seed(0)
                self.model.train()  # the mode the steps run in (dynamo guards on it)
                for n in sorted({max(rows, self.MIN_ROWS), self.MIN_ROWS}, reverse=True):
                    x = torch.randint(0, vocab_size, (n, seq_len), device=device, generator=gen)
                    y = torch.randint(0, vocab_size, x.shape, device=device, generator=gen)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = self(x, y)
                    try:
                        loss.backward()  # AOTAutograd compiles the backward graph here, at its first use
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as e:
                        if self.fallback:
                            raise
                        self.fallback = (f"backward: {type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''}")[:300]
                        log.warning("train.compile: torch.compile failed for %s (%s); training it eagerly",
                                    self.name, self.fallback)
                    for p in params:
                        p.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        self.warmed = True
        self.warm_up_s = time.perf_counter() - t0
        log.info("train.compile: %s compiled in %.1f s%s", self.name, self.warm_up_s,
                 f" (failed, eager: {self.fallback})" if self.fallback else "")
        return self.warm_up_s
