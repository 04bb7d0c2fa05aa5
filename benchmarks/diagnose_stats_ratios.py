"""What dropping scipy and ruptures from the diagnose path saves (issue 14), every figure from this one run.

1. ``import aurora_core.diagnose`` in a fresh interpreter (time and peak RSS, median of --repeat), this
   tree against the tree before ``aurora_core/diagnose/stats.py`` existed (exported with ``git archive``);
   the old tree also imported ruptures on its first ``detect``, so that is timed with it.
2. ``detect`` on one simulated series of ~300 intervals (``tests/test_incidents.simulate_run``, a latency
   step in the middle), and its change-point search alone: ruptures' PELT and scipy's tests (the old
   functions, patched in) against ``diagnose.stats``. Timed round-robin, median of --repeat; the two
   detections must agree.

Run: PYTHONPATH=. python benchmarks/diagnose_stats_ratios.py [--old-rev REV] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from test_incidents import simulate_run  # noqa: E402

from aurora_core.diagnose import spikes  # noqa: E402
from aurora_core.recorder import load_run  # noqa: E402

# Peak RSS from VmHWM: ru_maxrss would carry over this (large) process's peak through fork and exec.
IMPORT = ("import re, time; t = time.perf_counter(); import aurora_core.diagnose{extra}; "
          "print(time.perf_counter() - t, "
          "int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)")


def import_cost(tree: str, extra: str, repeat: int) -> tuple[float, float]:
    """Median (seconds, peak RSS MB) of importing aurora_core.diagnose from ``tree`` in a fresh interpreter."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", IMPORT.format(extra=extra)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": tree}, cwd=tree, timeout=120)
        runs.append(tuple(float(v) for v in out.stdout.split()))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def old_functions():
    """The calls spikes made before diagnose.stats, to patch in."""
    import ruptures as rpt
    from scipy import stats

    def pelt(x, pen, min_size, jump=1):
        return rpt.Pelt(model="l2", min_size=min_size, jump=jump).fit(x).predict(pen=pen)

    def ttest(v, base):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(stats.ttest_ind(v, base, equal_var=True, alternative="greater").pvalue)

    return {"pelt_l2": pelt, "ttest_greater_p": ttest,
            "mannwhitney_greater_p": lambda a, b: float(stats.mannwhitneyu(a, b, alternative="greater").pvalue),
            "fisher_greater_p": lambda kv, nv, kb, nb: float(
                stats.fisher_exact([[kv, nv - kv], [kb, nb - kb]], alternative="greater")[1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", default=None, help="tree without diagnose.stats (default: the parent of the "
                                                     "commit that added it)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rev = args.old_rev or subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "aurora_core/diagnose/stats.py"], cwd=ROOT,
        capture_output=True, text=True, check=True).stdout.split()[-1] + "^"
    out: dict = {"old_rev": subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True,
                                           text=True, check=True).stdout.strip(),
                 "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        subprocess.run(f"git archive {rev} aurora_core | tar -x -C {old}", shell=True, cwd=ROOT, check=True)
        (t_old, rss_old), (t_new, rss_new) = (import_cost(str(old), ", ruptures", args.repeat),
                                              import_cost(str(ROOT), "", args.repeat))
        out["import_s"] = {"old": round(t_old, 3), "new": round(t_new, 3), "ratio": round(t_old / t_new, 1)}
        out["import_peak_rss_mb"] = {"old": round(rss_old), "new": round(rss_new)}

        rng = np.random.default_rng(0)
        arrivals = np.cumsum(rng.exponential(1 / 150, 15_000))
        path = simulate_run(Path(tmp) / "run", arrivals, meta={"label": "v1"}, cpu_ms=1.0, max_batch=8, seed=0,
                            item_ms=lambda t: 3.0 if 40 <= t < 60 else 1.0)
        series = spikes.build_series([load_run(path)])[0]
        iv = spikes.intervals(series, spikes.auto_interval(series))
        out["intervals"] = int(np.count_nonzero(~np.isnan(iv.p99_ms)))
        patch = old_functions()

        def old_detect():
            with mock.patch.multiple(spikes, **patch):
                return spikes.detect(series)

        def old_cp():
            with mock.patch.multiple(spikes, **patch):
                return spikes.change_points(iv)

        timed = {"detect": (old_detect, lambda: spikes.detect(series)),
                 "change_points": (old_cp, lambda: spikes.change_points(iv))}
        a, b = old_detect(), spikes.detect(series)
        assert a.segments == b.segments and a.baseline == b.baseline and [
            replace(w, p_value=0) for w in a.windows] == [replace(w, p_value=0) for w in b.windows], "detections differ"
        assert all(math.isclose(x.p_value, y.p_value, rel_tol=1e-9) for x, y in zip(a.windows, b.windows, strict=True))
        out["windows"] = [(round(w.start_s, 1), round(w.end_s, 1)) for w in b.windows]
        for name, (f_old, f_new) in timed.items():
            t = {"old": [], "new": []}
            for _ in range(args.repeat):
                for k, f in (("old", f_old), ("new", f_new)):
                    s = time.perf_counter()
                    f()
                    t[k].append(time.perf_counter() - s)
            mo, mn = statistics.median(t["old"]), statistics.median(t["new"])
            out[f"{name}_ms"] = {"old": round(mo * 1e3, 1), "new": round(mn * 1e3, 1), "ratio": round(mo / mn, 1)}
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
