"""``aurora compare BEFORE AFTER``: the deployment gate.

Exit status: 0 no significant regression, 1 a stage regressed beyond the threshold, 2 bad input (a missing
or unreadable run, a side with fewer than 10 ok requests, an out-of-range option, an unwritable --html),
3 not comparable: the load or the environment (a CPU-contended or throttled machine on one side only) was
not matched (only with --fail-on-unmatched; otherwise 0 with a warning). In every case but 2 nothing is
called a regression unless both were matched.
"""

from __future__ import annotations

import json
import sys

from aurora_core.cli import number, unwritable


def add_arguments(parser) -> None:
    parser.epilog = ("exit status: 0 no regression, 1 regression, 2 bad input, 3 load or environment not matched "
                     "(only with --fail-on-unmatched; otherwise 0 with a warning)")
    parser.add_argument("before", metavar="BEFORE", help="run directory, .sqlite run file or store root (baseline)")
    parser.add_argument("after", metavar="AFTER", help="run directory, .sqlite run file or store root (candidate)")
    parser.add_argument("--min-delta-ms", type=number(ge=0), default=None, metavar="MS",
                        help="smallest stage shift in ms (at the interval's lower bound) that counts as a regression "
                             "(default 0.5: below it timer and scheduler granularity move stages run to run)")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="relative p50/p99 increase (>= 0) that counts as a regression (default 0.10)")
    parser.add_argument("--alpha", type=float, default=0.01,
                        help="Mann-Whitney significance level, between 0 and 1 (default 0.01)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples, >= 100 (default 1000)")
    parser.add_argument("--load-tolerance", type=float, default=0.10,
                        help="largest relative difference (>= 0) in arrival rate that still counts as matched load")
    parser.add_argument("--fail-on-unmatched", "--fail-on-unmatched-load", dest="fail_on_unmatched_load",
                        action="store_true",
                        help="exit 3 when the load or the environment (CPU contention, CPU steal, cgroup or GPU "
                             "throttling on one side only) was not matched (default: warn and exit 0)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                        help="change one margin of the environment check (repeatable): others_cores_more, "
                             "steal_more, cgroup_throttled_more or throttled_more, as in aurora diagnose's --set "
                             "(defaults in aurora_core/diagnose/settings.py)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    parser.add_argument("--html", metavar="FILE", help="also write an HTML page")
    from .cli import add_selection

    # Two selections of one store: `aurora compare ROOT ROOT --before-label v1 --after-label v2`, or the hour
    # before and after a time with --before-since/--before-until and --after-since/--after-until.
    add_selection(parser, "before-")
    add_selection(parser, "after-")
    g = parser.add_argument_group("store selection, both sides")
    g.add_argument("--region", action="append", default=None, metavar="R", help="only this region (repeatable)")
    g.add_argument("--host", action="append", default=None, metavar="H", help="only this host (repeatable)")


def run(args) -> int:
    from .compare import ENV_SETTINGS, MIN_DELTA_MS, compare
    from .html import compare_page
    from .report import text_compare
    from .settings import DEFAULTS

    def fail(msg: str) -> int:
        print(f"aurora compare: error: {msg}", file=sys.stderr)
        return 2

    # Checked up front (compare() checks the options before loading anything), so a typo costs no
    # comparison; writing can still fail later.
    if args.html and (why := unwritable(args.html)):
        return fail(f"cannot write --html {args.html}: {why}")
    from .cli import print_warnings

    try:
        settings = DEFAULTS.with_pairs(args.settings, "compare", ENV_SETTINGS)
        before, after = (_side(args, path, side) for path, side in ((args.before, "before"), (args.after, "after")))
        for side in (before, after):
            print_warnings("compare", getattr(side, "warnings", ()))
        res = compare(before, after, threshold=args.threshold, alpha=args.alpha, n_boot=args.boot,
                      min_delta_ms=MIN_DELTA_MS if args.min_delta_ms is None else args.min_delta_ms,
                      load_tolerance=args.load_tolerance, settings=settings)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    print(json.dumps(res, indent=2) if args.json else text_compare(res))
    if args.html:
        try:
            compare_page(res).write(args.html)
        except OSError as e:
            return fail(f"cannot write --html {args.html}: {e.strerror or e}")
    if res["verdict"] == "regression":
        return 1
    if res["verdict"] in ("load not matched", "environment not matched") and args.fail_on_unmatched_load:
        return 3
    return 0


def _side(args, path: str, side: str):
    """A run file as given, or the selection of a store root that the --SIDE-* and shared options make."""
    from aurora_core.store import is_store, open_store, parse_time

    sel = {k: getattr(args, f"{side}_{k}") for k in ("since", "until", "label")}
    shared = {"region": args.region, "host": args.host}
    if not is_store(path):
        given = [f"--{side}-{k}" for k, v in sel.items() if v is not None] + [f"--{k}" for k, v in shared.items() if v]
        if given:
            raise ValueError(f"{', '.join(given)} select within a store, and {path} is not a store root "
                             "(ROOT/region=*/host=*/); `aurora convert` turns a run file into one")
        return path
    st = open_store(path, since=None if sel["since"] is None else parse_time(sel["since"]),
                    until=None if sel["until"] is None else parse_time(sel["until"]), label=sel["label"], **shared)
    st.require(f"compare {side.upper()}")
    return st
