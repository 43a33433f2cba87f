"""A tiny Llama-style Hugging Face model directory with its own tokenizer, built offline by the tests.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the bundled sample corpus (real
Shakespeare text); its vocabulary (300 + EOS) and the model's widths (48, 80, grouped-query 4/2 heads) do not
tile by 64, its embeddings are tied and its positions rotary: the shapes the issue asks the codec to handle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

VOCAB = 301  # 300 merges/bytes + <|endoftext|>


def sample_texts(n: int = 60) -> list[str]:
    import pyarrow.parquet as pq

    from datasets.sample import ensure_sample

    d = ensure_sample("train")
    texts: list[str] = []
    for f in sorted(Path(d).glob("*.parquet")):
        texts += pq.read_table(f, columns=["text"]).column("text").to_pylist()
        if len(texts) >= n:
            break
    return texts[:n]


def build_tokenizer(dest: str | Path) -> Path:
    """`dest/tokenizer.json` (+ tokenizer_config.json naming the EOS): a byte-level BPE of VOCAB ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_texts(), trainer=trainer)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "model_max_length": 64}))
    return dest / "tokenizer.json"


def build_llama_dir(dest: str | Path, vocab: int | None = None, tie: bool = True, tokenizer: bool = True) -> Path:
    """A directory with a tiny LlamaForCausalLM config.json (and the tokenizer above): what `model.hf=` and
    `data.tokenizer=hf:` take."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import LlamaConfig

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    eos = 0
    if tokenizer:
        build_tokenizer(dest)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(dest / "tokenizer.json"))
        vocab, eos = vocab or tok.get_vocab_size(), tok.token_to_id("<|endoftext|>")
    LlamaConfig(vocab_size=vocab or VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=tie, eos_token_id=eos, bos_token_id=eos,
                rope_theta=10000.0).save_pretrained(dest)
    return dest
