"""``aurora convert RUN... --store ROOT``: old run files (run.aurora.sqlite) into a store, one segment each."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or .sqlite run files")
    parser.add_argument("--store", required=True, metavar="ROOT",
                        help="store root to write into (ROOT/region=R/host=H/, from each run's meta)")


def run(args) -> int:
    from . import convert

    for r in args.runs:
        try:
            where = convert(r, args.store)
        except (FileNotFoundError, ValueError) as e:
            print(f"aurora convert: error: {e}", file=sys.stderr)
            return 2
        print(f"{r} -> {where}")
    return 0
