"""The typed config: presets, overrides, and one-line errors naming the key and the fix."""
import subprocess
import sys

import pytest

from elastic.config import ConfigError, describe_options, load_config, redact_secrets, to_yaml


def test_defaults_and_dotlist_overrides():
    cfg = load_config("tiny", ["train.steps=7", "sync.name=demo", "run.name=x1"])
    assert cfg.train.steps == 7 and cfg.sync.name == "demo" and cfg.run.name == "x1"
    assert cfg.train.workers == 2


def test_unknown_key_names_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["train.stepz=5"])
    msg = str(e.value)
    assert "train.stepz" in msg and "steps" in msg and "\n" not in msg


def test_wrong_type_names_the_key_and_the_type():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["train.steps=many"])
    assert "train.steps" in str(e.value) and "int" in str(e.value)


def test_bad_value_is_explained():
    with pytest.raises(ConfigError, match="sync.value_bits"):
        load_config("tiny", ["sync.value_bits=3"])
    with pytest.raises(ConfigError, match="train.min_workers"):
        load_config("tiny", ["train.min_workers=5"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("nope")


def test_yaml_file_with_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepss: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.stepss'"):
        load_config(str(p))


def test_secrets_never_rendered():
    cfg = load_config("tiny", ["data.storage_options={key: AKIAFAKE, secret: hunter2-SECRET, endpoint_url: http://x}"])
    text = to_yaml(cfg)
    assert "hunter2-SECRET" not in text and "AKIAFAKE" not in text and "http://x" in text
    assert redact_secrets({"auth_token": "t", "tokenizer": "gpt2"}) == {"auth_token": "***", "tokenizer": "gpt2"}


def test_help_lists_every_option_with_default():
    out = subprocess.run([sys.executable, "-m", "elastic", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for key, _, _ in describe_options():
        assert key in out.stdout


def test_cli_config_error_is_one_line_exit_2():
    out = subprocess.run([sys.executable, "-m", "elastic", "show-config", "train.bogus=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: override train.bogus: unknown key")


def test_missing_data_stops_before_ray_starts_with_the_url(tmp_path):
    out = subprocess.run([sys.executable, "-m", "elastic", "train", f"run.dir={tmp_path}",
                          f"data.source={tmp_path}/nothing/*.parquet"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "no parquet files match" in out.stderr and "nothing" in out.stderr
    assert "Started a local Ray" not in out.stderr


def test_file_without_text_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["hello"]}), tmp_path / "000_00000.parquet")
    out = subprocess.run([sys.executable, "-m", "elastic", "train", f"run.dir={tmp_path}",
                          f"data.source={tmp_path}/*.parquet"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "000_00000.parquet" in out.stderr and "text" in out.stderr


def test_show_config_keeps_token_counts_readable():
    """Redaction matches whole credential keys: `batch_tokens` & co. are counts, not credentials."""
    out = subprocess.run([sys.executable, "-m", "elastic", "show-config", "--config", "gpt2-small"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "batch_tokens: 16384" in out.stdout
    for key in ("micro_batch_tokens", "eval_tokens", "max_doc_tokens"):
        line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith(key + ":"))
        assert "***" not in line, line


@pytest.mark.parametrize("preset", ["tiny", "gpt2-small"])
def test_saved_config_reloads_to_the_same_run_config(tmp_path, preset):
    cfg = load_config(preset, ["run.name=reload", "train.eval_tokens=4096", "data.max_doc_tokens=1000",
                               "data.storage_options={endpoint_url: http://127.0.0.1:9000, anon: true}"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_credentials_are_redacted_by_whole_key_and_inside_urls():
    data = {"storage_options": {"key": "AKIAFAKE", "secret": "s3cr3t", "token": "tok", "session_token": "st",
                                "aws_secret_access_key": "x", "sas_token": "sv=1&sig=abc", "accountKey": "k",
                                "password": "pw", "client_kwargs": {"region_name": "eu"},
                                "endpoint_url": "http://admin:hunter2@minio:9000",
                                "connection_string": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=K==",
                                "url": "https://a.blob.core.windows.net/c?sv=2020&sig=SIGNATURE&se=1",
                                "conn": "AccountName=a;AccountKey=K2==;EndpointSuffix=core.windows.net"},
            "batch_tokens": 16384, "micro_batch_tokens": 8192, "eval_tokens": 4096, "max_doc_tokens": 100,
            "tokenizer": "gpt2", "text_column": "text"}
    out = redact_secrets(data)
    so = out["storage_options"]
    for k in ("key", "secret", "token", "session_token", "aws_secret_access_key", "sas_token", "accountKey",
              "password", "connection_string"):
        assert so[k] == "***", k
    assert so["endpoint_url"] == "http://admin:***@minio:9000"
    assert "SIGNATURE" not in so["url"] and "sv=2020" in so["url"]
    assert "K2==" not in so["conn"] and "AccountName=a" in so["conn"]
    assert so["client_kwargs"] == {"region_name": "eu"}
    assert {k: out[k] for k in ("batch_tokens", "micro_batch_tokens", "eval_tokens", "max_doc_tokens",
                                 "tokenizer", "text_column")} == {k: data[k] for k in (
        "batch_tokens", "micro_batch_tokens", "eval_tokens", "max_doc_tokens", "tokenizer", "text_column")}


@pytest.mark.parametrize("override,key,fix", [
    ("model.n_head=0", "model.n_head", ">= 1"),
    ("model.n_embd=130", "model.n_embd", "divisible by model.n_head"),
    ("train.step_timeout_s=0", "train.step_timeout_s", "> 0"),
    ("train.step_timeout_s=-5", "train.step_timeout_s", "> 0"),
    ("train.collective_timeout_s=-1", "train.collective_timeout_s", "or 0 for"),
    ("train.pause_timeout_s=0", "train.pause_timeout_s", "> 0"),
    ("train.pause_timeout_s=-10", "train.pause_timeout_s", "> 0"),
    ("train.start_wait_s=-1", "train.start_wait_s", ">= 0"),
    ("train.hang_factor=0", "train.hang_factor", "> 0"),
    ("train.eval_tokens=0", "train.eval_tokens", "data.val_source=null"),
    ("train.eval_every=-1", "train.eval_every", ">= 0"),
])
def test_invalid_values_name_the_key_and_the_fix(override, key, fix):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])  # n_head=0 used to be a ZeroDivisionError
    msg = str(e.value)
    assert msg.startswith(key) and fix in msg and "\n" not in msg, msg


def test_eval_tokens_zero_is_fine_without_a_held_out_set():
    assert load_config("tiny", ["train.eval_tokens=0", "data.val_source=null"]).train.eval_tokens == 0


def test_file_with_a_non_string_text_column_stops_before_ray_starts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "000_00000.parquet")
    out = subprocess.run([sys.executable, "-m", "elastic", "train", f"run.dir={tmp_path}",
                          f"data.source={tmp_path}/*.parquet"], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "000_00000.parquet: column 'text' holds int64" in out.stderr
    assert "Started a local Ray" not in out.stderr
