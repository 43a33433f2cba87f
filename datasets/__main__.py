"""`python -m datasets ...`: prepare-sample, inspect, replay, bench.

Errors of the data source (no files, unreachable endpoint, bad schema) print one line naming the problem
and exit 2; no traceback from deep inside pyarrow.
"""
from __future__ import annotations

import argparse
import json
import sys


def _storage_options(arg: str | None) -> dict:
    return json.loads(arg) if arg else {}


def cmd_prepare_sample(args) -> int:
    from datasets.sample import build_corpus

    summary = build_corpus(args.corpus, args.dest)
    print(json.dumps({"dest": args.dest, **summary}, indent=None if args.json else 2))
    return 0


def cmd_inspect(args) -> int:
    from datasets.sources import discover

    shards = discover(args.url, _storage_options(args.storage_options))
    files = [{"path": s.path, "bytes": s.size, "rows": s.rows, "row_groups": s.num_row_groups,
              "estimated_tokens": s.token_estimate} for s in shards]
    schemas = sorted({s.schema_names for s in shards})
    out = {"url": args.url, "files": len(shards), "rows": sum(s.rows for s in shards),
           "row_groups": sum(s.num_row_groups for s in shards), "bytes": sum(s.size for s in shards),
           "estimated_tokens": sum(s.token_estimate for s in shards),
           "schemas": [list(names) for names in schemas], "per_file": files}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['url']}: {out['files']} files, {out['rows']} rows, {out['row_groups']} row groups, "
              f"{out['bytes'] / 1e6:.1f} MB, ~{out['estimated_tokens']:,} tokens (footer estimate)")
        for names in out["schemas"]:
            print("  columns:", ", ".join(names))
        for f in files:
            print(f"  {f['path']}  rows={f['rows']} row_groups={f['row_groups']} bytes={f['bytes']}")
    return 0


def cmd_replay(args) -> int:
    from datasets.replay import replay
    from datasets.sources import discover

    shards = discover(args.url, _storage_options(args.storage_options))
    sizes = [int(x) for x in args.world_sizes.split(",") if x.strip()]
    out = replay(shards, sizes, seed=args.seed, steps_per_phase=args.steps_per_phase,
                 tokens_per_rank=args.tokens_per_rank)
    if args.json:
        print(json.dumps(out))
    else:
        for p in out["phases"]:
            print(f"world {p['world_size']}: {p['steps_committed']} steps committed, aborted step {p['aborted_step']}")
        print(f"documents={out['documents']} delivered_once={out['delivered_once']} "
              f"duplicated={out['duplicated']} skipped={out['skipped']} epoch_complete={out['epoch_complete']}")
    ok = out["duplicated"] == 0 and out["skipped"] == 0 and out["epoch_complete"]
    return 0 if ok else 1


def cmd_bench(args) -> int:
    from datasets.bench import bench

    rows = bench(args.url, seconds=args.seconds, tokenizer=args.tokenizer, s3_moto=args.s3_moto,
                 storage_options=_storage_options(args.storage_options))
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['url']}: {r['tokens_per_s']:,} tokens/s ({r['tokenizer']}), {r['text_mb_per_s']} MB/s text, "
                  f"{r['x_h100_gpt2_small_worker']}x an H100 GPT-2-small worker, {r['seconds']} s")
    return 0


def cmd_bench_plan(args) -> int:
    from datasets.bench import bench_plan

    out = bench_plan(args.shards, args.row_groups, args.rows)
    print(json.dumps(out) if args.json else
          f"{out['row_groups']:,} row groups, {out['documents']:,} documents: plan built in {out['plan_build_s']} s, "
          f"assign+commit {out['assign_commit_ms_median']} ms/step (median of {out['steps']}), state JSON bytes "
          f"by epoch fraction {out['state_json_bytes_at_epoch_fraction']}, peak RSS {out['peak_rss_gb']} GB")
    return 0 if out["duplicated"] == 0 and out["skipped"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare-sample", help="write the Shakespeare sample as FineWeb parquet into DEST/{train,val}")
    p.add_argument("dest")
    p.add_argument("--corpus", default="shakespeare", choices=("shakespeare", "kjv"),
                   help="shakespeare (the bundled sample) or kjv (the King James Bible, a second real-text corpus)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_prepare_sample)

    for name, fn, helptext in (("inspect", cmd_inspect, "files, rows, row groups, schema, estimated tokens"),
                               ("replay", cmd_replay, "dry-run the data plan through world sizes with deaths"),
                               ("bench", cmd_bench, "reader tokens/s from local files (and S3 with --s3-moto)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("url", help="fsspec URL or glob, or 'sample' / 'sample-val'")
        p.add_argument("--json", action="store_true")
        p.add_argument("--storage-options", default=None, help="JSON dict for fsspec (endpoint_url, key, ...)")
        p.set_defaults(fn=fn)
        if name == "replay":
            p.add_argument("--world-sizes", default="2,3,1")
            p.add_argument("--steps-per-phase", type=int, default=None)
            p.add_argument("--tokens-per-rank", type=int, default=8192)
            p.add_argument("--seed", type=int, default=1234)
        if name == "bench":
            p.add_argument("--seconds", type=float, default=5.0)
            p.add_argument("--tokenizer", default="gpt2")
            p.add_argument("--s3-moto", action="store_true")

    p = sub.add_parser("bench-plan", help="the data plan over one epoch of a synthetic FineWeb-sized shard list")
    p.add_argument("--shards", type=int, default=2500)
    p.add_argument("--row-groups", type=int, default=100, help="per shard")
    p.add_argument("--rows", type=int, default=1000, help="documents per row group")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bench_plan)

    args = ap.parse_args(argv)
    from datasets.plan import PlanError
    from datasets.sample import SampleBuildError
    from datasets.sources import DataSourceError
    try:
        return args.fn(args)
    except (DataSourceError, PlanError, SampleBuildError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
