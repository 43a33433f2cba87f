"""Command line of the clusters package.

    python -m clusters validate FILE...            # Ray's schema + raydistro's rules; exit 1 on any error
    python -m clusters validate --shipped          # every cluster file this package ships
    python -m clusters local up [FILE]             # simulated autoscaling cluster (default clusters/local.yaml)
    python -m clusters local status
    python -m clusters local down [--keep-logs]
"""

from __future__ import annotations

import argparse
import sys

from clusters import SHIPPED_FILES
from clusters.local import DEFAULT_CONFIG, LocalClusterError, down, state_path, status, up
from clusters.validate import validate_file


def _validate(args: argparse.Namespace) -> int:
    files = list(args.files) + ([str(p) for p in SHIPPED_FILES] if args.shipped else [])
    if not files:
        print("validate: name at least one FILE (or --shipped)", file=sys.stderr)
        return 2
    bad = 0
    for f in files:
        problems = validate_file(f)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            bad += 1
        else:
            print(f"{f}: ok")
    return 1 if bad else 0


def _local(args: argparse.Namespace) -> int:
    try:
        if args.action == "up":
            c = up(args.file or DEFAULT_CONFIG)
            print(f"local cluster up (leader pid {c.leader_pid}, RAY_TMPDIR={c.tmpdir})")
            print(f"export RAY_ADDRESS={c.address} RAY_AUTH_MODE=disabled")
            print(f"dashboard: {c.dashboard_url}")
            print(f"jobs:      ray job submit --address {c.dashboard_url} --working-dir . -- "
                  "python -m elastic train --config ...")
            print(f"state:     {state_path()}")
        elif args.action == "down":
            pids = down(keep_logs=args.keep_logs)
            print(f"stopped {len(pids)} processes" + (f": {pids}" if pids else " (no local cluster)"))
        else:
            print(status())
    except LocalClusterError as e:
        print(f"clusters local {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check cluster YAMLs / RayCluster CRs")
    v.add_argument("files", nargs="*")
    v.add_argument("--shipped", action="store_true", help="also check every file clusters/ ships")
    v.set_defaults(func=_validate)
    loc = sub.add_parser("local", help="the simulated autoscaling cluster on this machine")
    loc.add_argument("action", choices=["up", "down", "status"])
    loc.add_argument("file", nargs="?", help="cluster YAML for `up` (default clusters/local.yaml)")
    loc.add_argument("--keep-logs", action="store_true", help="`down`: keep the RAY_TMPDIR logs")
    loc.set_defaults(func=_local)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
