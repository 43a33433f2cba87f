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
