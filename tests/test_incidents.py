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
from unittest import mock

import numpy as np
import pytest
import torch

from aurora_core.diagnose import diagnose as _diagnose_files
from aurora_core.diagnose.compare import compare
from aurora_core.loadgen import poisson_schedule, step_schedule
from aurora_core.recorder import Recorder, load_run
from aurora_core.records import Span, now_ns

DATA = Path(__file__).resolve().parents[1] / "aurora_core" / "data" / "photo_0.3mp.jpg"
NVML = Path(__file__).parent / "data" / "nvml"


def diagnose(runs, **kw):
    """``aurora_core.diagnose.diagnose`` on the run files, checked against the same runs converted into a store
    (issue 14: every case gets the same verdict from the store as from the files)."""
    from aurora_core.store import convert

    res = _diagnose_files(runs, **kw)
    where = Path(getattr(runs[0], "path", runs[0])).parent  # RunData (converted as it is in memory) or a path
    store = where / f"store-{len(list(where.glob('store-*')))}"
    for r in runs:
        convert(r, store)
    via = _diagnose_files([store], **kw).data
    if any("overlaps" in w for w in via["store"]["warnings"]):
        # Two runs recorded at once under one host name (the interleaved null pair): a store keeps one
        # process per host and names the other (issue 14's "overlapping segments from one host").
        return res
    via = via["series"]
    key = lambda d: [(s["name"], s["n_requests"], s["segments"], s["baseline"], s["windows"]) for s in d]  # noqa: E731
    assert key(via) == key(res.data["series"]), "the store's diagnosis differs from the run files'"
    return res


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(16, 10))


def _burner(seconds: float) -> subprocess.Popen:
    # Bounded by itself (it exits after `seconds`), and killed by the caller in any case.
    code = f"import time\nt = time.time()\nwhile time.time() - t < {seconds}:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _pipeline(sink=None):
    """The pipeline every live case runs: the tiny CNN on the CPU, batches of up to 8 closed after 1 ms."""
    from aurora_core.batching import BatchingConfig
    from aurora_core.pipeline import Pipeline

    return Pipeline(tiny_model(), batching=BatchingConfig(max_batch_size=8, max_queue_delay_us=1000, max_queue_size=4096),
                    device="cpu", sink=sink, num_workers=2)


def live_runs(paths, schedule_ns: np.ndarray, *, meta: dict, offered_rate: float | None = None,
              backend: str | None = None, burner_at_s: float | None = None, span_delay=None, block_s: float = 1.0):
    """Recorded runs of the pipeline under one open-loop schedule, one run per path.

    Each run has its own Pipeline and Recorder, and they take the schedule in turn, in ``block_s`` blocks
    (A/B/A/B...); one CPU sampler feeds every Recorder. span_delay(t_s) -> seconds: a simulated external
    call made before each request enters the pipeline, recorded as a user span "feature_store" linked to
    the request. burner_at_s: CPU-burning processes (two per core) start at that run time.
    """
    from aurora_core.telemetry.sampler import TelemetrySampler

    torch.set_num_threads(1)
    data = DATA.read_bytes()
    if offered_rate is not None:
        meta = {**meta, "offered_rate_per_s": offered_rate}
    recs = [Recorder(p, meta=meta) for p in paths]
    on = [False]  # warm-up requests are not part of the runs
    burners: list[subprocess.Popen] = []
    pool = ThreadPoolExecutor(32) if span_delay else None
    pipes = []

    def handle(pipe, rec, delay):
        t0 = now_ns()
        time.sleep(delay)
        t1 = now_ns()
        p = pipe.submit(data).result(timeout=60)
        rec.add_span(Span("feature_store", t0, t1, p.timings.request_id))

    try:
        with mock.patch.dict(os.environ, {"AURORA_BACKEND": backend} if backend else {}):
            for rec in recs:
                pipes.append(_pipeline(sink=lambda r, rec=rec: on[0] and rec(r)))
            for pipe in pipes:
                for _ in range(20):
                    pipe.infer(data)
            if pool:  # start the handler threads now, not during the first requests
                list(pool.map(time.sleep, [0.001] * 64))
            futs = []
            with TelemetrySampler(callbacks=[r.add_sample for r in recs], event_callbacks=[r.add_event for r in recs],
                                  period_s=0.1, gpu=False):
                time.sleep(0.5)  # let the sampler's first readings settle before traffic starts
                on[0] = True
                t0 = now_ns()
                for off in schedule_ns:
                    if burner_at_s is not None and not burners and now_ns() - t0 >= burner_at_s * 1e9:
                        burners = [_burner(15) for _ in range(2 * (os.cpu_count() or 1))]
                    dt = (t0 + int(off) - now_ns()) / 1e9
                    if dt > 0:
                        time.sleep(dt)
                    i = int(off / 1e9 // block_s) % len(pipes)
                    if span_delay:
                        futs.append(pool.submit(handle, pipes[i], recs[i], span_delay(off / 1e9)))
                    else:
                        futs.append(pipes[i].submit(data))
                for f in futs:
                    f.result(timeout=60)
    finally:
        for b in burners:
            b.kill()
            b.wait()
        if pool:
            pool.shutdown()
        for pipe in pipes:
            pipe.close()
        for rec in recs:
            rec.close()
    return [Path(p) for p in paths]


def live_run(path, schedule_ns: np.ndarray, **kw) -> Path:
    """One recorded run of the pipeline (``live_runs`` with one path)."""
    return live_runs([path], schedule_ns, **kw)[0]


def _windows(res):
    return [w for s in res.data["series"] for w in s["windows"]]


def _windows_at(res, t_s: float, series: int = 0) -> list[dict]:
    """The spike windows of a series that cover series time ``t_s`` (when the incident was injected).

    Tests look there rather than at the worst window: on this shared machine a neighbour's job can
    make another, real, window elsewhere in the run."""
    return [w for w in res.data["series"][series]["windows"] if w["start_s"] <= t_s < w["end_s"]]


def _window_at(res, t_s: float, series: int = 0) -> dict:
    hits = _windows_at(res, t_s, series)
    assert hits, f"no spike window covers t={t_s:.1f} s: {res.data['summary']}"
    return hits[0]


def _neighbours_moved(res) -> bool:
    """Did other processes' CPU use change by >= 0.5 core in some window (diagnose's own indicator)?

    This machine is shared. When a neighbour starts or stops a job during a live run, the run is not
    the controlled experiment the test describes (diagnose then rightly names CPU contention), so the
    live tests retry, and skip, saying why, when every attempt was disturbed."""
    return any(e["name"] == "other processes' CPU" and e["passed"]
               for w in _windows(res) for c in w["causes"] for e in c["evidence"])


INCONCLUSIVE = "inconclusive"


def _disturbed(res, *_) -> str | None:
    """The usual reason to retry a live attempt: neighbours' CPU load moved during it."""
    return "neighbours' CPU load moved" if _neighbours_moved(res) else None


def _attempts(make, n: int = 3, retry=_disturbed):
    """Run ``make(k) -> (res, *rest)`` until ``retry(res, *rest)`` gives no reason to retry; return that attempt.

    A reason is INCONCLUSIVE (diagnose named no cause where the incident was) or says how the attempt
    was disturbed. A wrong cause is never retried: the test's own asserts fail it. When all n attempts
    were retried, the test fails if every one was inconclusive, and skips, giving the reasons, otherwise."""
    reasons = []
    for k in range(n):
        out = make(k)
        reason = retry(*out)
        if reason is None:
            return out
        reasons.append(reason)
    assert reasons != [INCONCLUSIVE] * n, f"every one of {n} attempts was inconclusive: {out[0].data['summary']}"
    pytest.skip(f"no clean incident in {n} live attempts: {'; '.join(reasons)}")


def _contended(res, *_) -> str | None:
    """For the null pair, a reason to retry: neighbours moved, or diagnose named CPU contention by any of its signals.

    The pair's own load is constant by construction, so contention there (threads stretched past
    their CPU time, PSI or run queue up) comes from other processes: a disturbed attempt, not a
    false claim. Any other cause claimed still fails the test."""
    claimed = {w["verdict"] for w in _windows(res)} - {"inconclusive"}
    if claimed - {"cpu_contention"}:
        return None  # a cause other than contention: the test's asserts fail it, whatever the neighbours did
    if _neighbours_moved(res) or claimed:
        return "CPU contention from neighbours"
    return None


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
        return diagnose([a, b]), compare(a, b, n_boot=300)

    def disturbed(res, cmp):
        # compare's own environment check can see a neighbour that diagnose's windows did not.
        return "compare: " + cmp["environment"]["warning"] if not cmp["environment"]["matched"] else _disturbed(res)

    res, cmp = _attempts(make, retry=disturbed)
    assert cmp["load"]["matched"]
    assert cmp["verdict"] == "regression" and "preprocess" in cmp["regressions"]
    w = _window_at(res, _t_of(res, 1, 0.5))
    assert w["verdict"] == "regression", res.data["summary"]
    top = w["causes"][0]
    assert "label" in top["summary"] and "preprocess" in top["summary"]


def _capacity(seconds: float = 2.0) -> float:
    """Requests/s the pipeline sustains right now (closed burst): the load case runs relative to it."""
    torch.set_num_threads(1)
    data = DATA.read_bytes()
    with _pipeline() as pipe:
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

    def retry(res, r, run):
        if _neighbours_moved(res):
            return "neighbours' CPU load moved"
        # The capacity probe is a 1.5 s estimate on a shared machine: when it ran high, +20% stays below
        # saturation and no queue builds, so there is no incident to diagnose.
        if not _queue_grew(run):
            return "no queue built after the step (capacity probe ran high)"
        # Near saturation the run's own tail decides where the spike starts. On this 2-core VM (quiet,
        # old and new pipeline alike) about one attempt in three put no window over 7.5 s, or one that
        # diagnose left inconclusive (a late 8.2-10 s spike, or a window against a baseline that already
        # held a spike). Neither names a wrong cause, so they are retried, and fail only all together.
        hits = _windows_at(res, _t_of(res, 0, 0.75))
        return INCONCLUSIVE if not hits or hits[0]["verdict"] == "inconclusive" else None

    res, r, _ = _attempts(make, n=4, retry=retry)
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


def test_null_same_config(tmp_path):
    """Two live runs of one configuration, no change: no cause is claimed, compare finds no regression.

    Same Pipeline config, model, offered rate and label, one seeded schedule, served A/B/A/B in 1 s
    blocks (``live_runs`` with two paths). Back-to-back runs were tried first and are no null pair here:
    the neighbours' load drifts from one run to the next (per-item compute differed by 15-19% in 2 of 7
    undisturbed pairs, a real slowdown compare rightly reports); alternating blocks expose both runs to
    the same drift. A neighbour's job starting or stopping during the runs makes it no longer a null
    pair (diagnose then rightly names CPU contention), so such attempts are retried (``_contended``)."""
    rate = 40.0

    def make(k):
        a, b = live_runs([tmp_path / f"null{k}" / "a", tmp_path / f"null{k}" / "b"], poisson_schedule(rate, 12, seed=1),
                         offered_rate=rate, meta={"label": "v1", "config": {"batching": "max8/1ms"}})
        return diagnose([a, b]), a, b

    res, a, b = _attempts(make, retry=_contended)
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
