import hashlib

import pytest
import torch

from datasets.packing import pack
from datasets.tokenizer import (GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256, TokenizerError, get_tokenizer,
                                gpt2_vocabulary_files)


def test_gpt2_vocabulary_files_match_pinned_sha256():
    vocab_bpe, encoder_json = gpt2_vocabulary_files()
    assert hashlib.sha256(open(vocab_bpe, "rb").read()).hexdigest() == GPT2_VOCAB_BPE_SHA256
    assert hashlib.sha256(open(encoder_json, "rb").read()).hexdigest() == GPT2_ENCODER_JSON_SHA256


def test_gpt2_offline_gives_gpt2_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot == 50256 and tok.vocab_size == 50257
    assert tok.encode_batch(["Hello world", " the"]) == [[15496, 995], [262]]
    text = "To be, or not to be: that is the question."
    assert tok.decode(tok.encode(text)) == text


def test_document_text_cannot_forge_end_of_text():
    tok = get_tokenizer("gpt2")
    assert 50256 not in tok.encode("a <|endoftext|> b")


def test_byte_tokenizer():
    tok = get_tokenizer("bytes")
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.eot == 256 and tok.vocab_size == 257
    assert tok.decode([104, 195, 169, 256]) == "hé"


def test_unknown_tokenizer_names_the_choices():
    with pytest.raises(TokenizerError, match="gpt2.*bytes"):
        get_tokenizer("sentencepiece")


def test_pack_uses_every_token_once_and_pads_last_row():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    inputs, targets = pack(docs, seq_len=4, eot=0)
    # stream: 0 1 2 3 0 4 5 0 6 7 8 9 10 0 -> 13 targets -> 4 rows
    assert inputs.shape == targets.shape == (4, 4)
    real = targets[targets >= 0].tolist()
    assert real == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert (targets == -1).sum().item() == 3
    assert inputs.flatten()[:13].tolist() == [0, 1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10]
    assert str(inputs.dtype) == "torch.int64"


def test_pack_of_nothing_is_empty():
    inputs, targets = pack([], seq_len=8, eot=0)
    assert inputs.shape == (0, 8) and targets.shape == (0, 8)


def test_pack_windows_cut_the_stream_at_any_token_and_train_each_target_once():
    from datasets.packing import WindowMismatch

    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]  # stream: 0 1 2 3 0 4 5 6 7 8 0 9 0 10 11 12 13 0
    whole_x, whole_y = pack(docs, 4, eot=0)                       # 17 slots: 5 rows, the last one padded
    assert whole_x.shape == (5, 4)
    # three ranks at 2 / 2 / 1 rows: the second starts inside the second document, the third inside the fourth
    parts = [pack(docs, 4, 0, skip=0, rows=2), pack(docs[1:], 4, 0, skip=4, rows=2, expect_slots=13),
             pack(docs[3:], 4, 0, skip=4, rows=1, expect_slots=5)]
    assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
    assert torch.equal(torch.cat([y for _, y in parts]), whole_y)
    assert parts[2][1].tolist() == [[0, -1, -1, -1]]  # only the step's end pads
    with pytest.raises(WindowMismatch, match="cut for 14 target slots but its 3 documents have 13"):
        pack(docs[1:], 4, 0, skip=4, rows=2, expect_slots=14)
    with pytest.raises(ValueError, match="outside a stream of 5 slots"):
        pack(docs[3:], 4, 0, skip=5, rows=1)
