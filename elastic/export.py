"""`python -m elastic export RUN_DIR --out DIR [--step N]`: a run's weights as a Hugging Face model directory.

What it writes to DIR: `model.safetensors` + `config.json` (+ `generation_config.json`), loadable with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`, the tokenizer files where the run's tokenizer has
them, and `raydistro_export.json` (which run, step and checkpoint the weights come from).

- `model.hf=PATH` runs: the HF model of PATH's config.json with the trained weights (state_dict keys are the
  model's own: the training wrapper's `hf.` prefix is dropped). Tokenizer: `data.tokenizer=hf:...`'s
  tokenizer.json (and tokenizer_config.json beside it).
- built-in GPT runs: GPT-2's layout (`GPT2LMHeadModel`): Linear weights become Conv1D weights (transposed),
  `qkv` is `c_attn`, tied or untied heads as trained, exact-erf GELU (`activation_function: gelu`), the padded
  vocabulary. Tokenizer: GPT-2's vocab.json/merges.txt for `data.tokenizer=gpt2` (the files the training
  read); `bytes` has no HF tokenizer and gets none.

Checkpoints are read only through `CheckpointStore.load_latest()/read(step)`, `tensor_file("model.pt")` and
`meta`: the newest valid one by default, or the one of `--step N`. Offline: no hub is contacted.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from elastic.checkpoint import CheckpointError, CheckpointStore
from elastic.model import HF_PREFIX, hf_config, hf_offline

EXPORT_INFO = "raydistro_export.json"


class ExportError(RuntimeError):
    """The run cannot be exported; the message names what is missing and what to do."""


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir}: no config.yaml; give the run directory (runs/<run.name>) that "
                          "`python -m elastic train` wrote")
    return yaml.safe_load(path.read_text()) or {}


def _checkpoint_uri(run_dir: Path, cfg: dict, override: str | None) -> str:
    if override:
        return override
    d = ((cfg.get("checkpoint") or {}).get("dir") or "")
    return d or str(run_dir / "checkpoints")


def load_checkpoint(run_dir: str | Path, step: int | None = None, checkpoint: str | None = None,
                    storage_options: dict | None = None):
    """(the checkpoint, the run's config as a plain dict): the newest valid one, or step `step`'s."""
    run_dir = Path(run_dir).expanduser().resolve()
    cfg = _run_config(run_dir)
    uri = _checkpoint_uri(run_dir, cfg, checkpoint)
    if storage_options is None:  # saved configs carry no credentials ('***'): the environment has them
        saved = (cfg.get("checkpoint") or {}).get("storage_options") or {}
        storage_options = {k: v for k, v in saved.items() if v != "***"}
    store = CheckpointStore(uri, storage_options=storage_options)
    if step is None:
        ckpt = store.load_latest()
        if ckpt is None:
            raise ExportError(f"{uri}: no valid checkpoint; train first (every run ends with one)")
    else:
        if step not in store.steps():
            raise ExportError(f"--step {step}: no checkpoint of that step in {uri}; kept: {store.steps() or 'none'} "
                              "(checkpoint.keep prunes older ones)")
        try:
            ckpt = store.read(step)
        except (CheckpointError, FileNotFoundError) as e:
            have = store.steps()
            raise ExportError(f"--step {step}: {e}; checkpoints kept in {uri}: {have or 'none'}") from None
    cfg = ckpt.meta.get("config") or cfg
    return ckpt, cfg


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, checkpoint: str | None = None,
               storage_options: dict | None = None) -> dict:
    """Write the run's weights (newest checkpoint, or `step`'s) to `out` as an HF model; returns what it wrote."""
    hf_offline()
    ckpt, cfg = load_checkpoint(run_dir, step, checkpoint, storage_options)
    state = ckpt.tensor_file("model.pt")
    mcfg, tokenizer = cfg.get("model") or {}, (cfg.get("data") or {}).get("tokenizer", "gpt2")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if mcfg.get("hf"):
        model = _hf_model(state, mcfg)
        layout = "hf"
    else:
        model = gpt_to_gpt2(state, mcfg, _eot(tokenizer))
        layout = "gpt2"
    model.save_pretrained(str(out))
    tok_files = _export_tokenizer(tokenizer, out)
    info = {"run": cfg.get("run", {}).get("name"), "step": ckpt.step, "checkpoint": ckpt.uri, "layout": layout,
            "architecture": type(model).__name__, "tokenizer": tokenizer, "tokenizer_files": tok_files,
            "files": sorted(p.name for p in out.iterdir() if p.name != EXPORT_INFO)}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    return info


def _hf_model(state: dict, mcfg: dict):
    import transformers

    own = {k[len(HF_PREFIX):]: v for k, v in state.items() if k.startswith(HF_PREFIX)}
    if not own:
        raise ExportError(f"the checkpoint's model.pt has no '{HF_PREFIX}*' parameters, but the run's config names "
                          f"model.hf={mcfg['hf']}: was the checkpoint written by another run?")
    try:
        config = hf_config(mcfg["hf"], int(mcfg.get("vocab_size") or 0))
    except ValueError as e:
        raise ExportError(f"{e} (export needs the model directory the run trained with)") from None
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=own[next(iter(own))].dtype)
    _load_exact(model, own)
    return model


def _load_exact(model, state: dict) -> None:
    """Load `state`; every parameter of `model` must come from it (tied ones may appear once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ExportError(f"checkpoint and {type(model).__name__} disagree: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


def _eot(tokenizer: str) -> int:
    from datasets import get_tokenizer

    return get_tokenizer(tokenizer).eot


# built-in GPT name -> GPT-2 name; the Linear weights among them are transposed into Conv1D's (in, out)
_GPT2_NAMES = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
               "fc": "mlp.c_fc", "out": "mlp.c_proj"}
_CONV1D = ("attn.qkv", "attn.proj", "fc", "out")


def gpt_to_gpt2(state: dict, mcfg: dict, eot: int):
    """`GPT2LMHeadModel` holding the built-in GPT's weights (`state`): same logits for the same input ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    wte = state["wte.weight"]
    vocab, n_embd = wte.shape
    tie = bool(mcfg.get("tie_embeddings", True))
    config = GPT2Config(vocab_size=int(vocab), n_positions=int(state["wpe.weight"].shape[0]), n_embd=int(n_embd),
                        n_layer=int(mcfg["n_layer"]), n_head=int(mcfg["n_head"]), activation_function="gelu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=tie, bos_token_id=eot, eos_token_id=eot)
    out = {"transformer.wte.weight": wte, "transformer.wpe.weight": state["wpe.weight"],
           "transformer.ln_f.weight": state["ln_f.weight"], "transformer.ln_f.bias": state["ln_f.bias"],
           "lm_head.weight": state["lm_head.weight"] if not tie else wte}
    for key, value in state.items():
        if not key.startswith("blocks."):
            continue
        _, i, rest = key.split(".", 2)
        module, leaf = rest.rsplit(".", 1)
        name = f"transformer.h.{i}.{_GPT2_NAMES.get(module, module)}.{leaf}"
        out[name] = value.t().contiguous() if module in _CONV1D and leaf == "weight" else value
    model = GPT2LMHeadModel(config)
    _load_exact(model, out)
    return model.float()


def _export_tokenizer(tokenizer: str, out: Path) -> list[str]:
    """Copy the run's tokenizer files next to the weights, where there are any."""
    if tokenizer.startswith("hf:"):
        from datasets.tokenizer import HFTokenizer

        tok = HFTokenizer(tokenizer[3:])
        src = Path(tok.path)
        files = [src] + [p for p in (src.parent / "tokenizer_config.json", src.parent / "special_tokens_map.json")
                         if p.is_file()]
        for f in files:
            shutil.copyfile(f, out / f.name)
        if not (out / "tokenizer_config.json").exists():
            (out / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eot_token}))
        return sorted({f.name for f in files} | {"tokenizer_config.json"})
    if tokenizer == "gpt2":
        from datasets.tokenizer import gpt2_vocabulary_files

        vocab_bpe, encoder_json = gpt2_vocabulary_files()
        shutil.copyfile(encoder_json, out / "vocab.json")
        shutil.copyfile(vocab_bpe, out / "merges.txt")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "model_max_length": 1024}))
        return ["merges.txt", "tokenizer_config.json", "vocab.json"]
    return []
