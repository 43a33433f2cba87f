"""The model every worker holds a replica of: a small GPT in plain torch (nanoGPT's shape), or any Hugging
Face causal LM from a local directory (`model.hf=PATH`, wrapped by `HFCausalLM`).

The built-in GPT's vocabulary is padded to a multiple of 64 so DCT chunks tile every matrix evenly (the codec
also takes shapes that do not tile: it cuts them into the largest divisors, as it must for HF models).

What the worker uses of a model, whichever it is: `model(x, y) -> (logits, loss)` (loss: mean cross-entropy
over targets >= 0), `model.shape.n_embd`, and `model.warmup_attention()` (an attention layer to build
cuDNN graphs with, or None to skip that).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

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

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


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
