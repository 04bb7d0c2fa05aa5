"""``aurora diagnose RUN [RUN ...]``: find latency spike windows in run files and name their cause."""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories or .sqlite run files (several hosts/regions, or before and after a deployment)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    parser.add_argument("--html", metavar="FILE", help="also write an HTML page with the evidence plots")
    parser.add_argument("--interval", type=float, default=None, metavar="S",
                        help="interval width in seconds for per-interval p50/p99 (default: automatic)")
    parser.add_argument("--min-ratio", type=float, default=None, metavar="R",
                        help="smallest p50/p99 ratio to the baseline that counts as a spike (default 1.3)")


def run(args) -> int:
    from . import diagnose
    from .report import render_section, text_diagnose
    from .spikes import MIN_RATIO

    try:
        result = diagnose(args.runs, interval_s=args.interval, min_ratio=args.min_ratio or MIN_RATIO)
    except (FileNotFoundError, ValueError) as e:
        print(f"aurora diagnose: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.data, indent=2))
    else:
        print(text_diagnose(result))
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write("<!doctype html><meta charset='utf-8'><title>aurora diagnose</title>\n")
            f.write(render_section(result))
    return 0
