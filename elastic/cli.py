"""`python -m elastic`: train, show-config, scale, status, export, and the benchmarks.

The command line only: it parses arguments, hands each command to the module that does it (`train`, `scale`
and `status` to the driver, elastic/driver.py) and turns the errors a user can fix into exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from datasets import DataSourceError, PlanStateMismatch, SampleBuildError, TokenizerError
from elastic.config import ConfigError, DEFAULT_PRESET, describe_options, load_config, preset_names, to_yaml
from elastic.driver import RunAlreadyLive, preflight, scale, status, train
from elastic.progress import json_only_stdout

DATA_ERRORS = (DataSourceError, SampleBuildError, TokenizerError, PlanStateMismatch)


def _options_epilog() -> str:
    lines = ["options (key=value overrides, dotted; defaults shown):"]
    for key, typ, default in describe_options():
        lines.append(f"  {key:<38} {typ:<22} {default}")
    lines.append("")
    lines.append(f"presets (--config): {', '.join(preset_names())}, or a path to a YAML file")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m elastic", description="raydistro: elastic LLM training on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("train", help="train (resumes runs/<run.name> if it has a checkpoint)",
                       epilog=_options_epilog(), formatter_class=fmt)
    t.add_argument("--config", default=DEFAULT_PRESET, help="preset name or YAML path (default: %(default)s)")
    t.add_argument("--json", action="store_true", help="print summary.json to stdout at the end")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=50 sync.name=demo")
    s = sub.add_parser("show-config", help="print the resolved config", epilog=_options_epilog(), formatter_class=fmt)
    s.add_argument("--config", default=DEFAULT_PRESET)
    s.add_argument("overrides", nargs="*")
    sc = sub.add_parser("scale", help="ask a running run for N workers")
    sc.add_argument("run")
    sc.add_argument("workers", type=int)
    sc.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    sc.add_argument("--namespace", default="raydistro")
    st = sub.add_parser("status", help="where a running run is: step, world size, generation, state, loss")
    st.add_argument("run")
    st.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    st.add_argument("--namespace", default="raydistro")
    st.add_argument("--json", action="store_true")
    b = sub.add_parser("bench-converge", help="train each --syncs strategy on the same data; compare val loss and bytes",
                       epilog=_options_epilog(), formatter_class=fmt)
    b.add_argument("--config", default=DEFAULT_PRESET)
    b.add_argument("--json", action="store_true")
    b.add_argument("--syncs", default="dense,demo", help="comma separated: dense first, then any of demo, diloco")
    b.add_argument("--record", action="store_true", help="append the result to docs/BENCHMARKS.md")
    b.add_argument("overrides", nargs="*")
    r = sub.add_parser("bench-recovery", help="seconds from a death to the next step, and from new capacity "
                                              "to its first contributed step (simulated nodes)")
    r.add_argument("--events", type=int, default=5)
    r.add_argument("--json", action="store_true")
    r.add_argument("--record", action="store_true", help="append the result to docs/BENCHMARKS.md")
    r.add_argument("overrides", nargs="*")
    ex = sub.add_parser("export", help="a run's weights as a Hugging Face model dir (safetensors + config)")
    ex.add_argument("run_dir", help="the run directory, runs/<run.name>")
    ex.add_argument("--out", required=True, help="directory to write (AutoModelForCausalLM.from_pretrained loads it)")
    ex.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    ex.add_argument("--checkpoint", default=None, help="checkpoint URI if not the run's checkpoint.dir")
    from elastic.bench.gpu import add_parser as add_bench_gpu

    add_bench_gpu(sub)
    from elastic.bench.converge_gpu import add_parser as add_converge_gpu

    add_converge_gpu(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        if args.command == "show-config":
            print(to_yaml(load_config(args.config, args.overrides)), end="")
            return 0
        if args.command == "train":
            cfg = load_config(args.config, args.overrides)
            discovered = preflight(cfg)
            with json_only_stdout(args.json):
                summary = train(cfg, progress_stream=sys.stderr if args.json else None, discovered=discovered)
            if args.json:
                print(json.dumps(summary, indent=1, default=str))
            return 0 if summary.get("state") in ("FINISHED", "STOPPED") else 1
        if args.command == "export":
            from elastic.export import ExportError, export_run

            try:
                info = export_run(args.run_dir, args.out, step=args.step, checkpoint=args.checkpoint)
            except ExportError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(json.dumps(info, indent=1))
            return 0
        if args.command == "scale":
            return scale(args.run, args.workers, args.address, args.namespace)
        if args.command == "status":
            return status(args.run, args.address, args.namespace, args.json)
        if args.command == "bench-converge":
            from elastic.bench.runs import bench_converge, dumps

            with json_only_stdout(True):
                result = bench_converge(args.config, args.overrides, args.syncs.split(","), record=args.record)
            print(dumps(result))
            return 0
        if args.command == "bench-gpu":
            from elastic.bench.gpu import main as bench_gpu

            return bench_gpu(args)
        if args.command == "bench-converge-gpu":
            from elastic.bench.converge_gpu import main as converge_gpu

            return converge_gpu(args)
        if args.command == "bench-recovery":
            from elastic.bench.runs import bench_recovery, dumps

            with json_only_stdout(True):
                result = bench_recovery(args.events, args.overrides, record=args.record)
            print(dumps(result))
            return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (*DATA_ERRORS, RunAlreadyLive) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2
