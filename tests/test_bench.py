"""``aurora bench``: end-to-end CLI runs on the CPU, and the evidence rules behind the bottleneck verdict."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from aurora_core import bench
from aurora_core import loadgen as lg
from aurora_core.records import RequestRecord

# Small batches keep the pipeline's warm-up short on a 2-core machine.
FAST = ["--max-batch-size", "4", "--calibrate-s", "1.5", "--quiet"]


def _bench(out, *extra, timeout=600):
    cmd = [sys.executable, "-m", "aurora_core.cli", "bench", "--out", str(out), *FAST, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def invalid_run(tmp_path_factory):
    """A Server run that cannot meet --min-queries: INVALID whatever the machine's speed."""
    out = tmp_path_factory.mktemp("bench") / "run"
    return out, _bench(out, "--duration", "3", "--min-queries", "1000000", "--label", "v-test", "--region", "ci")


def test_bench_short_run_writes_table_run_file_and_report(invalid_run):
    out, p = invalid_run
    assert p.returncode == 1, p.stdout + p.stderr
    # the table, the telemetry summary and the verdict line
    for needle in ("throughput", "latency (ms, from scheduled send)", "end to end", "compute", "telemetry",
                   "GPU SM clock", "n/a (no GPU)", "CPU steal", "INVALID", "bottleneck:", "wall time"):
        assert needle in p.stdout, (needle, p.stdout)
    doc = json.loads((out / "summary.json").read_text())
    assert doc["verdict"] == "INVALID" and any(r.startswith("FAILED") and "queries" in r for r in doc["reasons"])
    s = doc["summary"]
    assert s["scenario"] == "server" and doc["capacity"] > 0
    assert doc["rate"] == pytest.approx(0.5 * doc["capacity"])
    assert s["completed_ok"] > 0 and set(s["stages_ms"]) >= {"queue", "decode", "preprocess", "compute"}
    assert doc["bottleneck"].split(":")[0] in ("preprocessing-bound", "compute-bound", "queueing/load-bound",
                                                "hardware-throttled", "CPU-contended")
    # the run file holds exactly the measured requests (not the calibration) and the telemetry
    from aurora_core.recorder import load_run

    run = load_run(str(out))
    assert run.n_requests == s["queries"]
    assert run.meta["label"] == "v-test" and run.meta["region"] == "ci"
    assert run.meta["bench"]["verdict"] == "INVALID"
    assert ("cpu", "cpu_util_pct") in run.samples
    html = (out / "report.html").read_text()
    for alt in ("timeline", "stages", "cdf"):
        assert f"<img alt='{alt}' src='data:image/png;base64," in html
    assert "INVALID" in html


def test_bench_report_opens_in_chromium(invalid_run, tmp_path):
    from test_report_browser import CHROMIUM, load_in_chromium

    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    page = load_in_chromium(invalid_run[0] / "report.html", tmp_path)
    assert page["errors"] == []
    assert {"timeline", "stages", "cdf"} <= {alt for alt, _, _, _ in page["images"]}
    assert all(w > 100 for _, w, _, _ in page["images"]), page["images"]


def test_bench_valid_run_exits_zero(tmp_path):
    """Rules loose enough that only an error could fail them: exit code 0 and VALID."""
    p = _bench(tmp_path / "ok", "--scenario", "closed_loop", "--concurrency", "4", "--duration", "2",
               "--min-duration", "0", "--min-queries", "1", "--stability-tol", "1e9", "--min-window-queries", "0", "--slo-ms", "1e9",
               "--no-report")
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert doc["verdict"] == "VALID" and doc["summary"]["scenario"] == "closed_loop"
    assert not (tmp_path / "ok" / "report.html").exists()


def test_bench_usage_error_exits_two(tmp_path):
    p = _bench(tmp_path / "x", "--scenario", "replay")
    assert p.returncode == 2 and "--replay PATH" in p.stderr


# --- evidence rules ----------------------------------------------------------------------------


def test_parse_steps():
    assert bench.parse_steps("0:40,60:+20%", 100, 120) == [(0.0, 40.0), (60.0, 120.0)]
    assert bench.parse_steps("30:-50%", 100, 60) == [(0.0, 100.0), (30.0, 50.0)]
    assert bench.parse_steps(None, 50, 60) == [(0.0, 50.0), (30.0, 60.0)]


def test_busy_is_union_of_intervals():
    recs = [RequestRecord(compute_start_ns=a, compute_end_ns=b) for a, b in [(1, 10), (5, 20), (30, 40), (35, 38)]]
    assert bench._busy(recs, "compute_start_ns", "compute_end_ns", 0, 100) == pytest.approx(0.29)
    assert bench._busy(recs, "compute_start_ns", "compute_end_ns", 10, 35) == pytest.approx(15 / 25)


def _run(stage_ms: dict[str, float], n=200, rate=100.0, errors=0):
    """A RunResult whose records spend ``stage_ms`` in each stage, sent at ``rate``."""
    t0 = 10**9
    sched = t0 + (np.arange(n) * 1e9 / rate).astype(np.int64)
    recs = []
    for s in sched:
        t = int(s)
        r = RequestRecord(arrival_ns=t, enqueue_ns=t)
        t += int(stage_ms.get("queue", 0) * 1e6)
        r.batch_closed_ns = r.decode_start_ns = t
        t += int(stage_ms.get("decode", 0) * 1e6)
        r.decode_end_ns = r.preprocess_start_ns = t
        t += int(stage_ms.get("preprocess", 0) * 1e6)
        r.preprocess_end_ns = r.compute_start_ns = t
        t += int(stage_ms.get("compute", 0) * 1e6)
        r.compute_end_ns = r.d2h_end_ns = r.completion_ns = t
        recs.append(r)
    done = np.array([r.completion_ns for r in recs], np.int64)
    status = ["overloaded" if i < errors else "ok" for i in range(n)]
    return lg.RunResult(lg.Scenario.server(rate, n / rate), t0, int(done.max()), sched, sched, done, status, recs)


def _tele(**kw):
    _, n = bench.telemetry_summary({})
    n.update(kw)
    return n


def test_bottleneck_saturating_scenarios_name_the_draining_stage():
    res = _run({"queue": 40, "decode": 2, "preprocess": 1, "compute": 9})
    res.scenario = lg.Scenario.offline(len(res.status))
    line, _ = bench.bottleneck(lg.summarize(res), res, _tele(), capacity=None)
    assert line.startswith("compute-bound"), line


@pytest.mark.parametrize("stages,tele,errors,label", [
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9}, {}, 0, "compute-bound"),
    ({"queue": 1, "decode": 8, "preprocess": 3, "compute": 4}, {}, 0, "preprocessing-bound"),
    ({"queue": 40, "decode": 2, "preprocess": 1, "compute": 9}, {}, 0, "queueing/load-bound"),
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9}, {}, 20, "queueing/load-bound"),
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9},
     {"throttle": {"thermal": 0.4, "low_util": 0.9}, "sm_clock_p50": 1400.0, "sm_clock_max": 1980.0,
      "gpu_busy_pct": 95.0}, 0, "hardware-throttled"),
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9}, {"steal": 22.0}, 0, "CPU-contended"),
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9},
     {"cpu_util": 100.0, "proc_cpu": 60.0, "cores": 2, "load1": 7.5}, 0, "CPU-contended"),
    # this process using the whole machine is not contention
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9},
     {"cpu_util": 100.0, "proc_cpu": 195.0, "cores": 2, "load1": 2.5}, 0, "compute-bound"),
    # an idle GPU at low clocks (low_util only) is not throttling
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9},
     {"throttle": {"low_util": 0.9}, "sm_clock_p50": 600.0, "sm_clock_max": 1980.0, "gpu_busy_pct": 10.0}, 0,
     "compute-bound"),
])
def test_bottleneck_rules(stages, tele, errors, label):
    res = _run(stages, errors=errors)
    s = lg.summarize(res)
    line, ev = bench.bottleneck(s, res, _tele(**tele), capacity=150.0)
    assert line.split(":")[0] == label, line
    assert "compute_busy" in ev


def test_telemetry_summary_reads_gpu_and_cpu():
    ts = np.arange(5, dtype=np.int64)
    series = {("gpu0", "sm_clock_mhz"): (ts, np.array([1980, 1980, 1500, 1500, 1500.0])),
              ("gpu0", "sm_clock_max_mhz"): (ts, np.full(5, 1980.0)),
              ("gpu0", "throttle_frac_power"): (ts, np.array([0, 0, 1, 1, 1.0])),
              ("gpu0", "temp_margin_c"): (ts, np.array([10, 8, 6, 5, 4.0])),
              ("gpu0", "temp_c"): (ts, np.full(5, 80.0)),
              ("cpu", "cpu_util_pct"): (ts, np.full(5, 50.0)),
              ("cpu", "steal_pct"): (ts, np.zeros(5))}
    rows, n = bench.telemetry_summary(series)
    d = dict(rows)
    assert d["GPU SM clock (p50 / max)"].startswith("1500 / 1980 MHz")
    assert d["GPU throttled fraction"] == "power 60.0%"
    assert d["GPU temperature margin (min)"].startswith("4 °C")
    assert d["GPU power (mean / limit)"] == "n/a (not reported by this GPU)"
    assert n["cpu_util"] == 50.0
    rows, _ = bench.telemetry_summary({("cpu", "cpu_util_pct"): (ts, np.full(5, 50.0))})
    assert dict(rows)["GPU SM clock (p50 / max)"] == "n/a (no GPU)"

