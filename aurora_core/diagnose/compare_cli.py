"""``aurora compare BEFORE AFTER``: the deployment gate.

Exit status: 0 no significant regression, 1 a stage regressed beyond the threshold, 2 bad input,
3 load not matched (only with --fail-on-unmatched-load; otherwise 0 with a warning).
"""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    parser.add_argument("before", metavar="BEFORE", help="run directory or .sqlite run file (baseline)")
    parser.add_argument("after", metavar="AFTER", help="run directory or .sqlite run file (candidate)")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="relative p50/p99 increase that counts as a regression (default 0.10)")
    parser.add_argument("--alpha", type=float, default=0.01, help="Mann-Whitney significance level (default 0.01)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--load-tolerance", type=float, default=0.10,
                        help="largest relative difference in arrival rate that still counts as matched load")
    parser.add_argument("--fail-on-unmatched-load", action="store_true",
                        help="exit 3 when the load was not matched (default: warn and exit 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    parser.add_argument("--html", metavar="FILE", help="also write an HTML page")


def run(args) -> int:
    from .compare import compare
    from .report import render_section, text_compare

    try:
        res = compare(args.before, args.after, threshold=args.threshold, alpha=args.alpha, n_boot=args.boot,
                      load_tolerance=args.load_tolerance)
    except (FileNotFoundError, ValueError) as e:
        print(f"aurora compare: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else text_compare(res))
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write("<!doctype html><meta charset='utf-8'><title>aurora compare</title>\n")
            f.write(render_section(res))
    if res["verdict"] == "regression":
        return 1
    if res["verdict"] == "load not matched" and args.fail_on_unmatched_load:
        return 3
    return 0
