"""``aurora diagnose RUN|ROOT [...]``: find latency spike windows in run files or stores and name their cause."""

from __future__ import annotations

import json
import sys

from aurora_core.cli import number, unwritable


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories, .sqlite run files, or store roots (ROOT/region=*/host=*/): several "
                             "hosts/regions, or before and after a deployment")
    add_selection(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    parser.add_argument("--html", metavar="FILE", help="also write an interactive HTML page: the four answers, the fleet, the evidence plots")
    parser.add_argument("--interval", type=number(gt=0), default=None, metavar="S",
                        help="interval width in seconds (> 0) for per-interval p50/p99 (default: automatic, "
                             "about 50 requests an interval)")
    parser.add_argument("--baseline", default=None, metavar="SPAN",
                        help="the span taken as normal: T0:T1 (seconds from the series' first request, as the "
                             "report prints them), label:NAME (the runs with that label) or run:PATH_OR_RUN_ID "
                             "(default: the lowest-latency calm stretch, see the report's 'normal' line); a host without "
                             "such a run takes their wall-clock span, or its default when it had no traffic then")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                        help="change one threshold (repeatable), e.g. --set stage_shift=1.2; the names and "
                             "their defaults are in aurora_core/diagnose/settings.py")
    # Below 1 the ratio gate passes every window and only the one-sided tests are left, exactly as at 1:
    # a value under 1 is a mistake (0 used to turn silently into the default), not a looser setting.
    parser.add_argument("--min-ratio", type=number(ge=1), default=None, metavar="R",
                        help="smallest p50/p99 ratio to the baseline that counts as a spike, >= 1 "
                             "(default 1.3; 1 counts any significant slowdown)")


def add_selection(parser, prefix: str = "") -> None:
    """--since/--until/--region/--host/--label: which part of a store to read."""
    g = parser.add_argument_group("store selection")
    g.add_argument(f"--{prefix}since", metavar="T", default=None,
                   help="first arrival time to read: ISO 8601 (2026-12-05T14:00:00Z; naive is UTC) or Unix seconds")
    g.add_argument(f"--{prefix}until", metavar="T", default=None, help="read arrivals before this time")
    if prefix:
        g.add_argument(f"--{prefix}label", action="append", default=None, metavar="L",
                       help="only segments recorded with this label (repeatable)")
        return
    g.add_argument("--region", action="append", default=None, metavar="R", help="only this region (repeatable)")
    g.add_argument("--host", action="append", default=None, metavar="H", help="only this host (repeatable)")
    g.add_argument("--label", action="append", default=None, metavar="L",
                   help="only segments recorded with this label (repeatable)")


def print_warnings(cmd: str, warnings) -> None:
    for w in warnings:
        print(f"aurora {cmd}: warning: {w}", file=sys.stderr)


def _progress(done: int, total: int, name: str, n: int) -> None:
    """One line per host on a terminal: a fleet takes seconds to a minute."""
    end = "\n" if done == total else ""
    print(f"\raurora diagnose: {done}/{total} host(s) read and judged (last {name}: {n:,} requests)\033[K",
          end=end, file=sys.stderr, flush=True)


def run(args) -> int:
    from . import diagnose
    from .html import diagnose_page
    from .report import text_diagnose
    from .settings import DEFAULTS

    if args.html and (why := unwritable(args.html)):
        print(f"aurora diagnose: error: cannot write --html {args.html}: {why}", file=sys.stderr)
        return 2
    try:
        result = diagnose(args.runs, interval_s=args.interval, min_ratio=args.min_ratio, baseline=args.baseline,
                          settings=DEFAULTS.with_pairs(args.settings), since=args.since, until=args.until,
                          region=args.region, host=args.host, label=args.label,
                          progress=_progress if sys.stderr.isatty() else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"aurora diagnose: error: {e}", file=sys.stderr)
        return 2
    print_warnings("diagnose", (result.data.get("store") or {}).get("warnings", ()))
    if args.json:
        print(json.dumps(result.data, indent=2))
    else:
        from .fromstore import overview_lines

        for ov in (result.data.get("store") or {}).get("overview", ()):
            print("\n".join(overview_lines(ov)))
        print(text_diagnose(result))
    if args.html:
        try:
            diagnose_page(result).write(args.html)
        except OSError as e:
            print(f"aurora diagnose: error: cannot write --html {args.html}: {e.strerror}", file=sys.stderr)
            return 2
    return 0
