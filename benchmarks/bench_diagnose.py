"""Diagnosis correctness figures on simulated runs (issue 18): null cases and a step held to the end.

    PYTHONPATH=. python benchmarks/bench_diagnose.py

Runs come from ``tests/test_incidents.simulate_run`` (seeded Poisson arrivals through a small queueing
model of the pipeline, written through the real Recorder), so the figures are the same on any machine.
To compare with an earlier tree, export it (``git archive REV aurora_core tests | tar -x -C DIR``) and run
this file with ``PYTHONPATH=DIR``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_incidents import simulate_run  # noqa: E402

from aurora_core.diagnose import diagnose  # noqa: E402
from aurora_core.loadgen import poisson_schedule, step_schedule  # noqa: E402
from aurora_core.recorder import load_run  # noqa: E402


def null_rates(d: Path, rate: float, max_batch: int, item: float, offered: bool) -> str:
    """20 seeds each: two back-to-back 6 s runs of one configuration, and one steady 60 s run."""
    meta = {"offered_rate_per_s": rate} if offered else {}
    out = {"pair": [0, 0], "long": [0, 0]}
    for seed in range(20):
        runs = [load_run(simulate_run(d / f"{n}{seed}", poisson_schedule(rate, 6, seed=2 * seed + k) / 1e9,
                                      meta={"label": "v1", "host": "h", **meta}, item_ms=lambda t: item,
                                      max_batch=max_batch, seed=2 * seed + k)) for k, n in enumerate("ab")]
        ra, rb = runs
        rb.meta["wall_minus_mono_ns"] = (ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].max()) + 25_000_000
                                         - int(rb.requests["arrival_ns"].min()))
        long = simulate_run(d / f"long{seed}", poisson_schedule(rate, 60, seed=seed + 500) / 1e9,
                            meta={"label": "v1", **meta}, item_ms=lambda t: item, max_batch=max_batch, seed=seed)
        for kind, res in (("pair", diagnose(runs)), ("long", diagnose([long]))):
            ws = [w for s in res.data["series"] for w in s["windows"]]
            out[kind][0] += bool(ws)
            out[kind][1] += any(w["verdict"] != "inconclusive" for w in ws)
    return "; ".join(f"{k}: windows {a}/20, claims {b}/20" for k, (a, b) in out.items())


def step_held(d: Path) -> str:
    """+20% at 10 s of 20 s, one request at a time at 0.8 of capacity; seeds 0-4 x widths auto/0.1/0.25/0.5."""
    found = plateau = n = 0
    for seed in range(5):
        run = simulate_run(d / f"step{seed}", step_schedule([(0, 100), (10, 120)], 20, seed=seed) / 1e9,
                           meta={"label": "v1"}, item_ms=lambda t: 6.0, max_batch=1, seed=1)
        for width in (None, 0.1, 0.25, 0.5):
            s = diagnose([run], interval_s=width).data["series"][0]
            n += 1
            found += any(w["start_s"] <= 14 < w["end_s"] and w["verdict"] == "load" for w in s["windows"])
            plateau += s["baseline"]["start_s"] >= 10
    return f"'load' window over the step {found}/{n}; saturated plateau taken as the baseline {plateau}/{n}"


def main() -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        print("step held to the end:", step_held(d))
        for cfg in ((40, 8, 8.0, False), (60, 8, 8.0, False), (60, 8, 8.0, True), (90, 1, 6.0, False),
                    (100, 1, 6.0, False), (100, 1, 6.0, True)):
            rate, mb, item, offered = cfg
            sub = d / f"null{rate}-{mb}-{offered}"
            print(f"null {rate}/s, max batch {mb}, {item:g} ms/item{', offered rate in meta' if offered else ''}: "
                  f"{null_rates(sub, *cfg)}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s; counts only, deterministic)")


if __name__ == "__main__":
    main()
