"""Load generator overhead: how fast the issuer can send, and how far its sends drift from the schedule.

The issuer is one Python thread, so its ceiling bounds what ``aurora bench`` can offer in process; send
drift at a given rate says whether a measured tail belongs to the system or to the load generator.

Run: python -m pytest benchmarks/bench_loadgen.py --benchmark-only --benchmark-columns=median,iqr,rounds
     (CI: --benchmark-disable as a smoke test). queries/s and drift percentiles go in extra_info.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from aurora_core import loadgen as lg


class NoopTarget:
    """Completes every query at once, on the issuer's thread: pure load-generator cost."""

    def submit(self, payload):
        f = cf.Future()
        f.set_result(payload)
        return f


@pytest.mark.parametrize("scenario", ["offline_20k", "server_2000qps_2s", "closed_loop_8_1s"])
def test_issuer(benchmark, scenario):
    sc = {"offline_20k": lg.Scenario.offline(20_000),
          "server_2000qps_2s": lg.Scenario.server(2000, 2.0, seed=0),
          "closed_loop_8_1s": lg.Scenario.closed_loop(8, 1.0)}[scenario]
    benchmark.group = "loadgen issuer"
    res = benchmark.pedantic(lambda: lg.LoadGenerator(NoopTarget(), [b"x"]).run(sc), rounds=3, iterations=1)
    s = lg.summarize(res)
    benchmark.extra_info.update({"queries": s["queries"], "queries_per_s": round(s["throughput"], 1),
                                 "drift_p99_ms": round(s["send_drift_ms"]["p99"], 3),
                                 "drift_max_ms": round(s["send_drift_ms"]["max"], 3)})
    assert s["completed_ok"] == s["queries"] > 0
