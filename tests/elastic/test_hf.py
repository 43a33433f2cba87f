"""Hugging Face models (model.hf), tokenizers (data.tokenizer=hf:) and `python -m elastic export`, without Ray.

The end-to-end run (demo sync, a worker killed, export, load in transformers) is test_hf_run.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from datasets import pack  # noqa: E402
from datasets.tokenizer import TokenizerError, get_tokenizer  # noqa: E402
from elastic.checkpoint import CheckpointStore, to_bytes  # noqa: E402
from elastic.config import ConfigError, checkpoint_uri, load_config, run_dir, to_dict, to_yaml  # noqa: E402
from elastic.export import ExportError, export_run  # noqa: E402
from elastic.fingerprint import params_fingerprint  # noqa: E402
from elastic.model import HFModelError, build_model  # noqa: E402

from .hf_testkit import build_llama_dir, build_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama_dir(tmp_path_factory.mktemp("llama"))


def _cfg(llama, *extra):
    return load_config("tiny", [f"model.hf={llama}", f"data.tokenizer=hf:{llama}", *extra])


def test_hf_tokenizer_eot_vocab_and_no_forged_boundaries(llama):
    tok = get_tokenizer(f"hf:{llama}")
    assert tok.eot_token == "<|endoftext|>" and tok.vocab_size == 301
    ids = tok.encode("Hello world")
    assert tok.decode(ids) == "Hello world" and all(0 <= i < tok.vocab_size for i in ids)
    # the EOT string inside a document is text, not the boundary id
    assert tok.eot not in tok.encode("to be <|endoftext|> or not")
    assert tok.encode_batch(["Hello world", "thee"]) == [ids, tok.encode("thee")]
    # the EOT id separates documents in packing
    inputs, targets = pack([tok.encode("to be"), tok.encode("or not")], 8, tok.eot)
    assert tok.eot in inputs.tolist()[0] + targets.tolist()[0]
    # a file path works as well as its directory
    assert get_tokenizer(f"hf:{llama}/tokenizer.json").eot == tok.eot


def test_hf_tokenizer_bad_input_names_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json there"):
        get_tokenizer(f"hf:{tmp_path}/missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="is not a tokenizer.json"):
        get_tokenizer(f"hf:{tmp_path}")
    with pytest.raises(ConfigError, match="must be gpt2, bytes or hf:PATH"):
        load_config("tiny", ["data.tokenizer=sentencepiece"])


def test_hf_model_same_seed_same_bits_and_the_gpt_loss(llama):
    cfg = _cfg(llama)
    a, b, c = (build_model(cfg.model, 301, s) for s in (0, 0, 1))
    fp = [params_fingerprint(list(m.parameters())) for m in (a, b, c)]
    assert fp[0] == fp[1] != fp[2]
    assert a.shape.n_embd == 48 and a.shape.tie_embeddings and a.warmup_attention() is None
    # tied: one parameter for the embedding and the head; shapes that do not tile by 64
    assert a.hf.lm_head.weight is a.hf.model.embed_tokens.weight
    assert (301, 48) in [tuple(p.shape) for p in a.parameters()]
    x = torch.randint(0, 301, (2, 16))
    y = x.clone()
    y[0, :5] = -1  # padding is ignored, as in the built-in GPT
    logits, loss = a(x, y)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 301), y.view(-1), ignore_index=-1)
    assert logits.shape == (2, 16, 301) and torch.allclose(loss, ref)


def test_hf_model_bad_input_names_the_fix(llama, tmp_path):
    with pytest.raises(HFModelError, match="has no config.json"):
        build_model(load_config("tiny", [f"model.hf={tmp_path}"]).model, 257, 0)
    with pytest.raises(HFModelError, match="smaller than the tokenizer's 50257"):
        build_model(_cfg(llama).model, 50257, 0)
    with pytest.raises(HFModelError, match="holds no \\*.safetensors"):
        build_model(_cfg(llama, "model.hf_weights=true").model, 301, 0)


def test_hf_weights_load_from_the_directory(llama, tmp_path):
    trained = build_model(_cfg(llama).model, 301, 7)
    d = tmp_path / "with-weights"
    trained.hf.save_pretrained(str(d))
    (d / "tokenizer.json").write_bytes((llama / "tokenizer.json").read_bytes())
    loaded = build_model(load_config("tiny", [f"model.hf={d}", "model.hf_weights=true"]).model, 301, 0)
    assert params_fingerprint(list(loaded.parameters())) == params_fingerprint(list(trained.parameters()))


def _fake_run(tmp_path, name, overrides, seed=3):
    """A run directory with config.yaml and one checkpoint of a perturbed model, as training leaves them."""
    cfg = load_config("tiny", [f"run.dir={tmp_path}", f"run.name={name}", *overrides])
    tok = get_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tok.vocab_size, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rd = run_dir(cfg)
    rd.mkdir(parents=True)
    (rd / "config.yaml").write_text(to_yaml(cfg))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    CheckpointStore(checkpoint_uri(cfg)).write(5, {"step": 5, "config": to_dict(cfg)}, {"model.pt": to_bytes(state)})
    return rd, model.eval(), tok


@pytest.mark.parametrize("kind", ["hf", "gpt-untied", "gpt-tied-gpt2"])
def test_export_gives_equal_logits_in_transformers(kind, llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = {
        "hf": [f"model.hf={llama}", f"data.tokenizer=hf:{llama}"],
        "gpt-untied": ["data.tokenizer=bytes", "model.tie_embeddings=false", "model.n_embd=48", "model.n_head=4"],
        "gpt-tied-gpt2": ["data.tokenizer=gpt2", "model.n_embd=32", "model.n_head=2", "model.n_layer=1"],
    }[kind]
    rd, model, tok = _fake_run(tmp_path, kind, overrides)
    out = tmp_path / "export"
    info = export_run(rd, out)
    assert info["step"] == 5 and (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if kind == "hf" else "GPT2LMHeadModel")
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], hf(input_ids=x).logits, atol=1e-5)
    if kind != "gpt-untied":  # the run's tokenizer comes along and encodes the same ids
        assert AutoTokenizer.from_pretrained(str(out))("Hello world").input_ids == tok.encode("Hello world")


def test_export_cli_and_bad_step(llama, tmp_path):
    rd, _, _ = _fake_run(tmp_path, "cli", [f"model.hf={llama}", f"data.tokenizer=hf:{llama}"])
    res = subprocess.run([sys.executable, "-m", "elastic", "export", str(rd), "--out", str(tmp_path / "o"),
                          "--step", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["layout"] == "hf"
    with pytest.raises(ExportError, match="no checkpoint of that step .* kept: \\[5\\]"):
        export_run(rd, tmp_path / "o2", step=7)
    with pytest.raises(ExportError, match="no config.yaml"):
        export_run(tmp_path / "nowhere", tmp_path / "o3")


def test_tokenizer_trained_offline_is_deterministic(tmp_path):
    a, b = build_tokenizer(tmp_path / "a"), build_tokenizer(tmp_path / "b")
    assert a.read_text() == b.read_text()


def test_rows_longer_than_learned_positions_name_the_fix(tmp_path, llama):
    from transformers import GPT2Config

    GPT2Config(vocab_size=301, n_positions=32, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)
    gpt2 = build_model(load_config("tiny", [f"model.hf={tmp_path}"]).model, 301, 0)
    assert gpt2.max_positions == 32 and gpt2(torch.zeros(1, 32, dtype=torch.long))[0].shape == (1, 32, 301)
    with pytest.raises(ValueError, match="exceed the model's 32 learned positions .* lower train.seq_len"):
        gpt2(torch.zeros(1, 33, dtype=torch.long))
    # rotary positions have no such end
    assert build_model(_cfg(llama).model, 301, 0).max_positions is None
