"""Load generator: schedules, coordinated omission, targets, statistics, verdict rules, peak search."""

from __future__ import annotations

import concurrent.futures as cf
import http.server
import json
import math
import threading
import time

import numpy as np
import pytest
from scipy import stats

from aurora_core import loadgen as lg
from aurora_core.records import RequestRecord, now_ns

# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,duration", [(200.0, 100.0), (7.5, 400.0)])
def test_poisson_schedule_rate_and_dispersion(rate, duration):
    t = lg.poisson_schedule(rate, duration, seed=3)
    n = len(t)
    mean = rate * duration
    assert abs(n - mean) < 4 * math.sqrt(mean)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < duration * 1e9
    gaps = np.diff(t) / 1e9
    cv = gaps.std() / gaps.mean()
    assert abs(cv - 1.0) < 4 / math.sqrt(n)  # exponential gaps: CV 1, standard error ~ 1/sqrt(n)
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 1e-3
    # counts per 1 s bin are Poisson: variance/mean ~ 1 (a regular schedule would give ~0)
    counts = np.bincount((t // 1_000_000_000).astype(int), minlength=int(duration))
    assert 0.8 < counts.var() / counts.mean() < 1.25


def test_poisson_schedule_seeded():
    a = lg.poisson_schedule(50, 10, seed=1)
    b = lg.poisson_schedule(50, 10, seed=1)
    c = lg.poisson_schedule(50, 10, seed=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[: min(len(a), len(c))], c[: min(len(a), len(c))])
    assert np.array_equal(lg.Scenario.server(50, 10, seed=1).schedule(), a)


def test_step_schedule_rates():
    t = lg.step_schedule([(0, 100.0), (60, 120.0)], 120, seed=0) / 1e9
    before, after = (t < 60).sum(), (t >= 60).sum()
    assert abs(before - 6000) < 4 * math.sqrt(6000)
    assert abs(after - 7200) < 4 * math.sqrt(7200)
    assert np.all(np.diff(t) >= 0)
    with pytest.raises(ValueError, match="t=0"):
        lg.step_schedule([(5, 1.0)], 10)


def test_replay_schedule_sources(tmp_path):
    p = tmp_path / "arrivals.txt"
    p.write_text("10.5\n10.0\n11.25\n")
    assert lg.replay_schedule(str(p)).tolist() == [0, 500_000_000, 1_250_000_000]
    j = tmp_path / "arrivals.json"
    j.write_text("[2, 3, 5]")
    assert lg.replay_schedule(str(j), speed=2.0).tolist() == [0, 500_000_000, 1_500_000_000]
    sc = lg.Scenario.replay([0.0, 0.1, 0.3])
    assert sc.schedule().tolist() == [0, 100_000_000, 300_000_000]
    assert sc.duration_s == pytest.approx(0.3)


def test_replay_from_recorded_run(tmp_path):
    recorder = pytest.importorskip("aurora_core.recorder", reason="recorder (issue 4) not merged yet")
    rec = recorder.Recorder(path=str(tmp_path / "run"), meta={"label": "t"})
    base = now_ns()
    for i, off in enumerate([0, 20_000_000, 50_000_000]):
        rec(RequestRecord(request_id=i, arrival_ns=base + off, completion_ns=base + off + 1000))
    rec.close()
    assert lg.replay_schedule(str(tmp_path / "run")).tolist() == [0, 20_000_000, 50_000_000]


# --- targets used by the live tests ------------------------------------------------------------


class BlockingTarget:
    """A synchronous client: submit() does the work before returning, like a blocking RPC call.
    The query issued first at or after ``stall_at_s`` takes an extra ``stall_s``."""

    def __init__(self, service_s=0.001, stall_at_s=None, stall_s=1.0):
        self.service_s, self.stall_at_s, self.stall_s = service_s, stall_at_s, stall_s
        self.t0 = None
        self.stalled = False

    def submit(self, payload):
        self.t0 = self.t0 or time.monotonic()
        time.sleep(self.service_s)
        if self.stall_at_s is not None and not self.stalled and time.monotonic() - self.t0 >= self.stall_at_s:
            self.stalled = True
            time.sleep(self.stall_s)
        f = cf.Future()
        f.set_result(payload)
        return f


class PoolTarget:
    """An asynchronous target: ``workers`` threads, each query sleeps ``service_s``, attaches a record."""

    def __init__(self, service_s=0.002, workers=4, fail_every=0):
        self.pool = cf.ThreadPoolExecutor(workers)
        self.service_s, self.fail_every = service_s, fail_every
        self.n = 0
        self.lock = threading.Lock()

    def _work(self, i):
        rec = RequestRecord(request_id=i, arrival_ns=now_ns())
        rec.enqueue_ns = rec.arrival_ns
        rec.batch_closed_ns = now_ns()
        rec.compute_start_ns = now_ns()
        time.sleep(self.service_s)
        rec.compute_end_ns = rec.d2h_end_ns = rec.completion_ns = now_ns()
        if self.fail_every and i % self.fail_every == 0:
            raise RuntimeError("boom")
        return type("Pred", (), {"timings": rec})()

    def submit(self, payload):
        with self.lock:
            self.n += 1
            i = self.n
        return self.pool.submit(self._work, i)


# --- coordinated omission ----------------------------------------------------------------------


def test_stall_inflates_tail_from_scheduled_time():
    """A 1 s stall in a blocking target: the issuer falls behind, and every query due during the stall
    is charged the wait. Measured from the actual send, only the one stalled query would show it."""
    rate = 50.0
    sc = lg.Scenario.server(rate, 3.0, seed=0)
    res = lg.LoadGenerator(BlockingTarget(stall_at_s=1.0, stall_s=1.0), [b"x"]).run(sc)
    assert len(res.status) == len(sc.schedule()) and all(s == "ok" for s in res.status)
    from_sched = res.latency_ns / 1e9
    from_send = res.latency_from_send_ns / 1e9
    # Queries due in the first 0.8 s of the stall waited at least 0.2 s: about 40 of them.
    slow_sched = int((from_sched >= 0.2).sum())
    slow_send = int((from_send >= 0.2).sum())
    assert slow_sched >= 20
    assert slow_send <= 5
    s = lg.summarize(res)
    assert s["latency_ms"]["p95"] >= 200  # ~30% of queries were due during the stall
    assert s["latency_from_send_ms"]["p95"] < s["latency_ms"]["p95"]
    # The issuer kept its schedule: it reports the drift and sent every query, none skipped.
    assert s["send_drift_ms"]["max"] >= 500
    assert res.sent_ns.min() >= res.scheduled_ns.min()


# --- live scenarios ----------------------------------------------------------------------------


def test_server_scenario_live_stats():
    res = lg.LoadGenerator(PoolTarget(fail_every=50), [b"a", b"b"]).run(lg.Scenario.server(200, 1.5, seed=4))
    s = lg.summarize(res)
    n = len(lg.Scenario.server(200, 1.5, seed=4).schedule())
    assert s["queries"] == n
    assert s["errors"] == {"RuntimeError": n // 50}
    assert s["completed_ok"] == n - n // 50
    assert set(s["stages_ms"]) >= {"queue", "compute", "total"}
    assert s["stages_ms"]["compute"]["p50"] >= 2.0  # the target sleeps 2 ms in "compute"
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]
    assert len(s["windows"]) == 6 and sum(w["achieved"] for w in s["windows"]) == s["completed_ok"]


def test_closed_loop_keeps_concurrency():
    target = PoolTarget(service_s=0.01, workers=8)
    inflight, peak = [0], [0]
    lock = threading.Lock()
    orig = target.submit

    def done(_):
        with lock:
            inflight[0] -= 1

    def counting_submit(p):
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        f = orig(p)
        f.add_done_callback(done)
        return f

    target.submit = counting_submit
    res = lg.LoadGenerator(target, [b"x"]).run(lg.Scenario.closed_loop(3, 0.5))
    assert peak[0] == 3
    assert all(s == "ok" for s in res.status) and len(res.status) > 3
    # each new query is due when a slot frees: never before the previous completion in its slot
    assert np.all(res.scheduled_ns[3:] >= res.done_ns[:3].min())


def test_single_stream_is_one_at_a_time():
    res = lg.LoadGenerator(PoolTarget(service_s=0.005), [b"x"]).run(lg.Scenario.single_stream(0.3))
    order = np.argsort(res.sent_ns)
    assert np.all(res.sent_ns[order][1:] >= res.done_ns[order][:-1])


def test_offline_all_due_at_start():
    res = lg.LoadGenerator(PoolTarget(service_s=0.001, workers=2), [b"x"]).run(lg.Scenario.offline(40))
    assert len(set(res.scheduled_ns.tolist())) == 1
    s = lg.summarize(res)
    assert s["completed_ok"] == 40 and s["scenario"] == "offline"


def test_synchronous_rejection_counts_as_error():
    class Rejecting:
        def submit(self, p):
            from aurora_core.errors import Overloaded

            raise Overloaded("full")

    res = lg.LoadGenerator(Rejecting(), [b"x"]).run(lg.Scenario.server(100, 0.2))
    assert set(res.status) == {"overloaded"}
    assert lg.summarize(res)["errors"]["overloaded"] == len(res.status)


# --- HTTP target -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if body == b"bad":
            code, doc = 422, {"error": {"code": "corrupt_image", "status": 422, "message": "no"}}
        else:
            code, doc = 200, {"top_k": [], "timings": {"queue_ms": 1.5, "compute_ms": 2.0, "batch_size": 3}}
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_http_target_over_loopback():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    target = lg.HttpTarget(f"http://127.0.0.1:{srv.server_address[1]}/v1/classify", connections=4)
    try:
        res = lg.LoadGenerator(target, [b"img", b"img", b"img", b"bad"]).run(lg.Scenario.server(100, 0.5))
    finally:
        target.close()
        srv.shutdown()
    s = lg.summarize(res)
    assert s["errors"] == {"corrupt_image": len(res.status) // 4 + (len(res.status) % 4 > 3)}
    assert s["completed_ok"] > 0 and set(s["stages_ms"]) == {"queue", "compute"}
    assert s["stages_ms"]["compute"]["p50"] == pytest.approx(2.0) and s["batch_size_mean"] == 3


# --- verdict rules -----------------------------------------------------------------------------


def _synthetic(n=1200, duration_s=12.0, lat_ms=5.0, kind="server", tail_rate_factor=1.0, status=None):
    """A RunResult with evenly spread queries; the last sixth completes at ``tail_rate_factor`` of the
    rate (a drop in achieved throughput, as in a system falling behind)."""
    sc = lg.Scenario(kind, duration_s=duration_s, rate=n / duration_s)
    t0 = 1_000_000_000
    sched = t0 + (np.arange(n) * duration_s / n * 1e9).astype(np.int64)
    lat = np.full(n, lat_ms * 1e6, np.int64)
    done = sched + lat
    if tail_rate_factor != 1.0:
        k = n * 5 // 6
        done[k:] = done[k] + ((done[k:] - done[k]) / tail_rate_factor).astype(np.int64)
    status = status or ["ok"] * n
    return lg.RunResult(sc, t0, int(done.max()), sched, sched.copy(), done, status, [None] * n)


def test_verdict_valid_run():
    ok, reasons = lg.verdict(lg.summarize(_synthetic()), lg.Rules(slo_ms=10))
    assert ok, reasons
    assert all(r.startswith("ok: ") for r in reasons) and len(reasons) == 5


@pytest.mark.parametrize("kwargs,rules,needle", [
    ({"duration_s": 5.0}, lg.Rules(), "duration"),
    ({"n": 200}, lg.Rules(), "queries"),
    ({"tail_rate_factor": 0.7}, lg.Rules(), "windows"),
    ({"lat_ms": 30.0}, lg.Rules(slo_ms=10), "p99"),
    ({"status": ["overloaded" if i % 60 == 0 else "ok" for i in range(1200)]}, lg.Rules(), "errors"),
])
def test_verdict_rule_failures(kwargs, rules, needle):
    ok, reasons = lg.verdict(lg.summarize(_synthetic(**kwargs)), rules)
    assert not ok
    failed = [r for r in reasons if r.startswith("FAILED")]
    assert len(failed) == 1 and needle in failed[0], reasons


def test_verdict_small_stability_change_passes_and_offline_has_no_bound():
    ok, _ = lg.verdict(lg.summarize(_synthetic(tail_rate_factor=0.95)), lg.Rules())
    assert ok
    ok, reasons = lg.verdict(lg.summarize(_synthetic(kind="offline", lat_ms=500)), lg.Rules(slo_ms=10))
    assert ok and not any("p99" in r for r in reasons)


def test_verdict_too_few_per_window():
    ok, reasons = lg.verdict(lg.summarize(_synthetic(n=300, duration_s=12)),
                             lg.Rules(min_queries=10, min_window_queries=60))
    assert not ok and any("fewer than 60" in r for r in reasons)


# --- peak search -------------------------------------------------------------------------------


def test_find_peak_bisects_to_the_bound():
    mu, slo_s = 100.0, 0.25
    calls = []

    def measure(rate):  # M/M/1 sojourn p99 = ln(100) / (mu - rate)
        calls.append(rate)
        p99 = math.log(100) / (mu - rate) if rate < mu else math.inf
        return {"latency_ms": {"p99": p99 * 1e3}, "error_frac": 0.0}

    res = lg.find_peak(measure, slo_ms=slo_s * 1e3, lo=0.0, hi=120.0, rel_tol=0.01, max_trials=20)
    true_peak = mu - math.log(100) / slo_s
    assert res.peak_rate <= true_peak and res.peak_rate > true_peak * 0.98
    assert calls[0] == 120.0 and len(res.trials) == len(calls)
    assert all(good == (r <= true_peak) for r, good, _ in res.trials)


def test_find_peak_hi_passes_and_errors_fail():
    res = lg.find_peak(lambda r: {"latency_ms": {"p99": 1.0}, "error_frac": 0.0}, 10, 0, 50)
    assert res.peak_rate == 50 and len(res.trials) == 1
    res = lg.find_peak(lambda r: {"latency_ms": {"p99": 1.0}, "error_frac": 0.5 if r > 20 else 0}, 10, 0, 50,
                       rel_tol=0.02)
    assert 19 < res.peak_rate <= 20


class _ClosingHandler(_Handler):
    """Answers, then drops the connection without saying so: what an idle keep-alive timeout does."""

    def do_POST(self):
        super().do_POST()
        self.close_connection = True


def test_http_target_retries_a_connection_the_server_dropped():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ClosingHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    target = lg.HttpTarget(f"http://127.0.0.1:{srv.server_address[1]}/v1/classify", connections=1)
    try:
        res = lg.LoadGenerator(target, [b"img"]).run(lg.Scenario.server(50, 0.4))
    finally:
        target.close()
        srv.shutdown()
    assert len(res.status) > 3 and set(res.status) == {"ok"}
