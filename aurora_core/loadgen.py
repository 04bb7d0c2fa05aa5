"""Load generation in the manner of MLPerf LoadGen: scenarios, targets, statistics and a verdict.

Scenarios
    SingleStream  the next query is issued when the previous one finishes (closed loop, 1 in flight)
    Server        seeded Poisson arrivals at a target rate (open loop)
    Offline       every query scheduled at t=0
    ClosedLoop    a fixed number of queries in flight
    Step          Poisson arrivals whose rate changes at set times (e.g. +20% at t=60 s)
    Replay        arrival times from a file or a recorded run

Latency is measured from the *scheduled* send time, never from the actual one: when the target stalls
and the issuer falls behind, the late queries carry the stall in their latency (no coordinated
omission, see Gil Tene, "How NOT to measure latency"). The issuer never skips or re-spaces queries to
catch up; it reports how far its actual sends drifted from the schedule.

Targets expose ``submit(payload) -> concurrent.futures.Future``. ``PipelineTarget`` wraps
``Pipeline.submit``; ``HttpTarget`` POSTs to the reference server's ``/v1/classify`` through a pool of
keep-alive ``http.client`` connections.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import http.client
import json
import math
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from aurora_core.records import FIELD_NAMES, STAGES, RequestRecord, now_ns

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
OPEN_LOOP = ("server", "step", "replay", "offline")

# ---------------------------------------------------------------------------------------------------
# Schedules: int64 offsets in ns from the start of the run, sorted.
# ---------------------------------------------------------------------------------------------------


def poisson_schedule(rate: float, duration_s: float, seed: int = 0, start_s: float = 0.0) -> np.ndarray:
    """Poisson arrivals at ``rate`` per second over [start_s, start_s + duration_s): int64 ns offsets."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"poisson_schedule: expected rate > 0 and duration_s > 0, got {rate}, {duration_s}")
    rng = np.random.default_rng(seed)
    mean = rate * duration_s
    n = int(mean + 8 * math.sqrt(mean) + 16)  # enough gaps almost surely; extended below if not
    t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while t[-1] < duration_s:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))])
    t = t[t < duration_s]
    return ((t + start_s) * 1e9).astype(np.int64)


def step_schedule(steps: Sequence[tuple[float, float]], duration_s: float, seed: int = 0) -> np.ndarray:
    """Piecewise-constant Poisson: ``steps`` is [(t_s, rate), ...] with the first t_s == 0.

    Poisson arrivals are memoryless, so generating each segment on its own is exact.
    """
    steps = sorted((float(t), float(r)) for t, r in steps)
    if not steps or steps[0][0] != 0.0:
        raise ValueError(f"step_schedule: the first step must start at t=0, got {steps}")
    parts = []
    for i, (t, rate) in enumerate(steps):
        end = steps[i + 1][0] if i + 1 < len(steps) else duration_s
        end = min(end, duration_s)
        if end > t and rate > 0:
            parts.append(poisson_schedule(rate, end - t, seed=seed + i, start_s=t))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def replay_schedule(source, speed: float = 1.0) -> np.ndarray:
    """Arrival offsets from a recorded run (a run directory or .sqlite), a .npy array of ns, or a text
    file of arrival times in seconds (one per line, or a JSON list). Shifted to start at 0 and divided
    by ``speed`` (2.0 replays twice as fast)."""
    if isinstance(source, np.ndarray | list | tuple):
        t = np.asarray(source, dtype=np.float64) * 1e9
    elif str(source).endswith(".npy"):
        t = np.load(source).astype(np.float64)
    elif os.path.isdir(source) or str(source).endswith(".sqlite"):
        from aurora_core.recorder import load_run

        t = np.asarray(load_run(source).requests["arrival_ns"], dtype=np.float64)
    else:
        with open(source) as f:
            text = f.read().strip()
        vals = json.loads(text) if text.startswith("[") else [float(x.split(",")[0]) for x in text.split()]
        t = np.asarray(vals, dtype=np.float64) * 1e9
    if t.size == 0:
        raise ValueError(f"replay_schedule: no arrival times in {source!r}")
    t = np.sort(t)
    return ((t - t[0]) / speed).astype(np.int64)


@dataclass(frozen=True)
class Scenario:
    """What to issue. Build one with the class methods; ``schedule()`` gives the open-loop offsets."""

    kind: str  # "single_stream", "server", "offline", "closed_loop", "step", "replay"
    duration_s: float = 30.0
    rate: float = 0.0
    seed: int = 0
    concurrency: int = 1
    count: int = 0
    steps: tuple[tuple[float, float], ...] = ()
    arrivals_ns: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def single_stream(cls, duration_s: float) -> Scenario:
        return cls("single_stream", duration_s=duration_s, concurrency=1)

    @classmethod
    def server(cls, rate: float, duration_s: float, seed: int = 0) -> Scenario:
        return cls("server", duration_s=duration_s, rate=rate, seed=seed)

    @classmethod
    def offline(cls, count: int) -> Scenario:
        return cls("offline", count=count, duration_s=0.0)

    @classmethod
    def closed_loop(cls, concurrency: int, duration_s: float) -> Scenario:
        return cls("closed_loop", duration_s=duration_s, concurrency=concurrency)

    @classmethod
    def step(cls, steps: Sequence[tuple[float, float]], duration_s: float, seed: int = 0) -> Scenario:
        return cls("step", duration_s=duration_s, steps=tuple(steps), seed=seed)

    @classmethod
    def replay(cls, source, speed: float = 1.0) -> Scenario:
        arr = replay_schedule(source, speed)
        return cls("replay", duration_s=float(arr[-1]) / 1e9, arrivals_ns=tuple(int(x) for x in arr))

    @property
    def open_loop(self) -> bool:
        return self.kind in OPEN_LOOP

    def schedule(self) -> np.ndarray:
        if self.kind == "server":
            return poisson_schedule(self.rate, self.duration_s, self.seed)
        if self.kind == "step":
            return step_schedule(self.steps, self.duration_s, self.seed)
        if self.kind == "offline":
            return np.zeros(self.count, np.int64)
        if self.kind == "replay":
            return np.asarray(self.arrivals_ns, np.int64)
        raise ValueError(f"Scenario.schedule: {self.kind!r} is closed loop and has no schedule")

    def describe(self) -> str:
        if self.kind == "server":
            return f"Server, Poisson {self.rate:.1f}/s for {self.duration_s:g} s (seed {self.seed})"
        if self.kind == "step":
            s = ", ".join(f"{r:.1f}/s from {t:g} s" for t, r in self.steps)
            return f"Step, Poisson {s}, {self.duration_s:g} s"
        if self.kind == "offline":
            return f"Offline, {self.count} queries at t=0"
        if self.kind == "replay":
            return f"Replay, {len(self.arrivals_ns)} arrivals over {self.duration_s:.1f} s"
        if self.kind == "single_stream":
            return f"SingleStream for {self.duration_s:g} s"
        return f"ClosedLoop, {self.concurrency} in flight for {self.duration_s:g} s"


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------


class PipelineTarget:
    """The in-process ``Pipeline``: its futures resolve to a Prediction whose ``timings`` is the record."""

    def __init__(self, pipeline, timeout: float | None = None):
        self.pipeline = pipeline
        self.timeout = timeout

    def submit(self, payload) -> cf.Future:
        return self.pipeline.submit(payload, timeout=self.timeout)

    def close(self) -> None:
        pass


class HttpError(Exception):
    """A non-2xx answer; ``reason`` comes from the server's JSON error body when it gives one."""

    def __init__(self, status: int, reason: str, body: str = ""):
        super().__init__(f"HTTP {status} {reason}: {body[:200]}")
        self.status = status
        self.reason = reason


class HttpTarget:
    """POST raw image bytes to ``url`` (e.g. http://127.0.0.1:8000/v1/classify) over keep-alive
    connections, one per worker thread. Queries beyond ``connections`` wait in the client queue, and
    that wait counts in their latency because latency runs from the scheduled time."""

    def __init__(self, url: str, connections: int = 32, timeout: float = 30.0,
                 content_type: str = "application/octet-stream"):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"HttpTarget: expected an http:// URL, got {url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path or "/"
        self.timeout = timeout
        self.content_type = content_type
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._worker, name=f"http-target-{i}", daemon=True)
                         for i in range(connections)]
        for t in self._threads:
            t.start()

    def submit(self, payload: bytes) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._q.put((payload, fut))
        return fut

    def _worker(self) -> None:
        conn = None
        while True:
            item = self._q.get()
            if item is None:
                break
            payload, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            for attempt in (0, 1):
                reused = conn is not None
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                    fut.set_result(self._post(conn, payload))
                except HttpError as e:
                    fut.set_exception(e)
                except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected) as e:
                    # The server closed an idle keep-alive connection: retry once on a fresh one.
                    conn.close()
                    conn = None
                    if reused and attempt == 0:
                        continue
                    fut.set_exception(e)
                except Exception as e:  # connection-level: drop the connection, the next query reconnects
                    if conn is not None:
                        conn.close()
                    conn = None
                    fut.set_exception(e)
                break
        if conn is not None:
            conn.close()

    def _post(self, conn: http.client.HTTPConnection, payload: bytes):
        conn.request("POST", self.path, body=payload, headers={"Content-Type": self.content_type})
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {}
        if resp.status >= 300:
            # the reference server's error model: {"error": {"code": "overloaded", ...}}
            err = doc.get("error") if isinstance(doc, dict) else None
            reason = (err.get("code") or err.get("reason")) if isinstance(err, dict) else None
            reason = reason or (doc.get("reason") if isinstance(doc, dict) else None)
            raise HttpError(resp.status, reason or f"http_{resp.status}", body)
        return _HttpResult(doc, _record_from_json(doc))

    def close(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=self.timeout)


@dataclass
class _HttpResult:
    body: dict
    timings: RequestRecord | None


def _record_from_json(doc):
    """The reference server returns per-stage durations as "timings": {"queue_ms": ..., "batch_size": ...}.
    Full RequestRecord fields (``*_ns`` stamps) are accepted too: CLOCK_MONOTONIC is system-wide on
    Linux, so a loopback server's stamps are on our clock."""
    t = doc.get("timings") if isinstance(doc, dict) else None
    if not isinstance(t, dict):
        return None
    if any(k.endswith("_ns") for k in t):
        return RequestRecord(**{k: v for k, v in t.items() if k in FIELD_NAMES})
    return StageDurations({st: int(t[f"{st}_ms"] * 1e6) for st in STAGES if isinstance(t.get(f"{st}_ms"), int | float)},
                          int(t.get("batch_size") or 0))


@dataclass
class StageDurations:
    """Per-stage durations reported by a remote target; quacks like RequestRecord for the statistics."""

    durations_ns: dict[str, int]
    batch_size: int = 0

    def stage_ns(self, stage: str) -> int:
        return self.durations_ns.get(stage, -1)


def error_reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# Running a scenario
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One scenario run. Times are absolute monotonic ns; ``done_ns`` is 0 for queries never finished."""

    scenario: Scenario
    t0_ns: int
    end_ns: int
    scheduled_ns: np.ndarray
    sent_ns: np.ndarray
    done_ns: np.ndarray
    status: list[str]
    records: list  # RequestRecord, StageDurations (HTTP) or None

    @property
    def latency_ns(self) -> np.ndarray:
        """From the scheduled send time: the number every statistic uses."""
        return self.done_ns - self.scheduled_ns

    @property
    def latency_from_send_ns(self) -> np.ndarray:
        """From the actual send time. Kept only to show what coordinated omission would hide."""
        return self.done_ns - self.sent_ns


class LoadGenerator:
    """Issues one scenario against one target. ``run()`` blocks; ``progress()`` may be polled from
    another thread while it runs."""

    def __init__(self, target, payloads: Sequence, *, drain_timeout_s: float = 60.0):
        if not payloads:
            raise ValueError("LoadGenerator: expected at least one payload")
        self.target = target
        self.payloads = list(payloads)
        self.drain_timeout_s = drain_timeout_s
        self._recent: collections.deque = collections.deque(maxlen=4096)
        self._issued = 0
        self._completed = 0
        self._t0 = 0
        self._expected = 0
        self._lock = threading.Lock()

    # -- live view --------------------------------------------------------------------------------
    def progress(self, window_s: float = 2.0) -> dict:
        """elapsed_s, issued, completed, expected (0 if unknown), throughput and p99 (ms) over the last
        ``window_s`` of completions."""
        now = now_ns()
        cutoff = now - int(window_s * 1e9)
        recent = [lat for done, lat in list(self._recent) if done >= cutoff]
        elapsed = (now - self._t0) / 1e9 if self._t0 else 0.0
        span = min(window_s, elapsed) or window_s
        return {
            "elapsed_s": elapsed,
            "issued": self._issued,
            "completed": self._completed,
            "expected": self._expected,
            "throughput": len(recent) / span,
            "p99_ms": float(np.percentile(recent, 99)) / 1e6 if recent else float("nan"),
        }

    # -- run --------------------------------------------------------------------------------------
    def run(self, scenario: Scenario) -> RunResult:
        if scenario.open_loop:
            offsets = scenario.schedule()
            n = len(offsets)
        else:
            offsets = None
            # Closed loop: size the arrays for the most queries the run could possibly issue.
            n = 1024
        self._expected = n if offsets is not None else 0
        st = _State(n)
        self._issued = self._completed = 0
        self._recent.clear()
        t0 = now_ns() + 2_000_000  # 2 ms lead so the first query is not already late
        self._t0 = t0
        if offsets is not None:
            self._run_open(st, t0 + offsets)
        else:
            st = self._run_closed(st, scenario, t0)
        # Latency is waited for, not cut off: a drain timeout marks the rest as "timeout".
        if st.pending():
            st.all_done.wait(timeout=self.drain_timeout_s)
        with st.lock:
            n_issued = st.n_issued
            for i in range(n_issued):
                if st.done[i] == 0 and st.status[i] is None:
                    st.status[i] = "timeout"
            status = [s or "ok" for s in st.status[:n_issued]]
            done = st.done[:n_issued].copy()
        end = int(done.max()) if n_issued and done.max() > 0 else now_ns()
        return RunResult(scenario, t0, end, st.sched[:n_issued].copy(), st.sent[:n_issued].copy(), done,
                         status, st.records[:n_issued])

    def _run_open(self, st: _State, sched: np.ndarray) -> None:
        for i, when in enumerate(sched):
            delay = (int(when) - now_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            self._issue(st, i, int(when))
        st.mark_all_issued()

    def _run_closed(self, st: _State, scenario: Scenario, t0: int) -> _State:
        free: queue.SimpleQueue = queue.SimpleQueue()
        st.on_done = lambda ts: free.put(ts)
        end = t0 + int(scenario.duration_s * 1e9)
        while now_ns() < t0:
            time.sleep((t0 - now_ns()) / 1e9)
        for _ in range(scenario.concurrency):
            free.put(t0)
        i = 0
        while True:
            try:
                ready = free.get(timeout=max(0.0, (end - now_ns()) / 1e9) + 0.05)
            except queue.Empty:
                break
            if ready >= end or now_ns() >= end:
                break
            if i >= len(st.sched):
                st.grow()
            # The slot became free at `ready`; that is when this query was due.
            self._issue(st, i, ready)
            i += 1
        st.mark_all_issued()
        return st

    def _issue(self, st: _State, i: int, scheduled: int) -> None:
        payload = self.payloads[i % len(self.payloads)]
        with st.lock:
            st.sched[i] = scheduled
            st.n_issued = i + 1
        sent = now_ns()
        st.sent[i] = sent
        self._issued = i + 1
        try:
            fut = self.target.submit(payload)
        except Exception as e:  # rejected synchronously (e.g. Overloaded): it still finished, as an error
            self._finish(st, i, scheduled, error_reason(e), None)
            return
        fut.add_done_callback(lambda f, i=i, s=scheduled: self._on_done(st, i, s, f))

    def _on_done(self, st: _State, i: int, scheduled: int, fut: cf.Future) -> None:
        if fut.cancelled():
            self._finish(st, i, scheduled, "cancelled", None)
            return
        exc = fut.exception()
        if exc is not None:
            self._finish(st, i, scheduled, error_reason(exc), getattr(exc, "timings", None))
        else:
            res = fut.result()
            rec = getattr(res, "timings", None)
            self._finish(st, i, scheduled, None, rec if hasattr(rec, "stage_ns") else None)

    def _finish(self, st: _State, i: int, scheduled: int, status: str | None, rec) -> None:
        t = now_ns()
        with st.lock:
            st.done[i] = t
            st.status[i] = status
            st.records[i] = rec
            st.n_done += 1
            finished = st.all_issued and st.n_done >= st.n_issued
            self._completed = st.n_done
        self._recent.append((t, t - scheduled))
        if st.on_done is not None:
            st.on_done(t)
        if finished:
            st.all_done.set()


class _State:
    """Per-query arrays shared by the issuer and the completion callbacks."""

    def __init__(self, n: int):
        self.lock = threading.Lock()
        self.sched = np.zeros(n, np.int64)
        self.sent = np.zeros(n, np.int64)
        self.done = np.zeros(n, np.int64)
        self.status: list[str | None] = [None] * n
        self.records: list[RequestRecord | None] = [None] * n
        self.n_issued = 0
        self.n_done = 0
        self.all_issued = False
        self.all_done = threading.Event()
        self.on_done: Callable[[int], None] | None = None

    def grow(self) -> None:
        with self.lock:
            n = len(self.sched)
            self.sched = np.concatenate([self.sched, np.zeros(n, np.int64)])
            self.sent = np.concatenate([self.sent, np.zeros(n, np.int64)])
            self.done = np.concatenate([self.done, np.zeros(n, np.int64)])
            self.status += [None] * n
            self.records += [None] * n

    def mark_all_issued(self) -> None:
        with self.lock:
            self.all_issued = True
            if self.n_done >= self.n_issued:
                self.all_done.set()

    def pending(self) -> bool:
        with self.lock:
            return self.n_done < self.n_issued


def run_scenario(target, payloads: Sequence, scenario: Scenario) -> RunResult:
    return LoadGenerator(target, payloads).run(scenario)


# ---------------------------------------------------------------------------------------------------
# Statistics and verdict
# ---------------------------------------------------------------------------------------------------


def percentiles_ms(values_ns: np.ndarray) -> dict[str, float]:
    """p50..p99.9, max and mean in ms; NaN when there are no values."""
    keys = [f"p{p:g}" for p in PERCENTILES] + ["max", "mean"]
    if values_ns.size == 0:
        return {k: float("nan") for k in keys}
    v = values_ns.astype(np.float64) / 1e6
    out = {f"p{p:g}": float(x) for p, x in zip(PERCENTILES, np.percentile(v, PERCENTILES), strict=True)}
    out["max"] = float(v.max())
    out["mean"] = float(v.mean())
    return out


def summarize(result: RunResult, n_windows: int = 6) -> dict:
    """Throughput, latency percentiles (from the scheduled time) overall and per stage, issued against
    achieved rate, send drift, errors by reason, and per-window rates for the stability rule."""
    sc = result.scenario
    n = len(result.status)
    ok = np.array([s == "ok" for s in result.status], bool)
    done = result.done_ns
    lat = result.latency_ns[ok]
    first = int(result.scheduled_ns.min()) if n else result.t0_ns
    last_sched = int(result.scheduled_ns.max()) if n else result.t0_ns
    end = int(done.max()) if n and done.max() > 0 else result.end_ns
    span_s = max((end - result.t0_ns) / 1e9, 1e-9)
    issue_span_s = max((last_sched - first) / 1e9, 1e-9)
    errors = collections.Counter(s for s in result.status if s != "ok")

    stages: dict[str, dict] = {}
    recs = [r for r, good in zip(result.records, ok, strict=True) if good and r is not None]
    for stage in STAGES:
        d = np.array([r.stage_ns(stage) for r in recs], np.int64)
        d = d[d >= 0]
        if d.size:
            stages[stage] = {"count": int(d.size), **percentiles_ms(d)}

    drift = result.sent_ns - result.scheduled_ns
    s = {
        "scenario": sc.kind,
        "scenario_desc": sc.describe(),
        "target_rate": sc.rate if sc.kind == "server" else None,
        "queries": n,
        "completed_ok": int(ok.sum()),
        "errors": dict(errors),
        "error_frac": (n - int(ok.sum())) / n if n else 0.0,
        "duration_s": span_s,
        "throughput": int(ok.sum()) / span_s,
        "issued_rate": n / issue_span_s if sc.open_loop and sc.kind != "offline" and n > 1 else n / span_s,
        "achieved_rate": int(ok.sum()) / span_s,
        "latency_ms": percentiles_ms(lat),
        "latency_from_send_ms": percentiles_ms(result.latency_from_send_ns[ok]),
        "send_drift_ms": percentiles_ms(drift) if n else percentiles_ms(np.zeros(0)),
        "stages_ms": stages,
        "windows": _windows(result, ok, n_windows, end),
        "batch_size_mean": float(np.mean([r.batch_size for r in recs])) if recs else None,
    }
    return s


def _windows(result: RunResult, ok: np.ndarray, n_windows: int, end: int) -> list[dict]:
    """Equal windows over [t0, end]. For open-loop load the stability metric is achieved / offered in the
    window (the offered count itself is Poisson-noisy); for closed loop it is the achieved rate."""
    if not len(result.status) or n_windows < 1:
        return []
    edges = np.linspace(result.t0_ns, end + 1, n_windows + 1)
    w_s = (edges[1] - edges[0]) / 1e9
    done_ok = result.done_ns[ok]
    lat_ok = result.latency_ns[ok]
    out = []
    open_loop = result.scenario.open_loop and result.scenario.kind != "offline"
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        m = (done_ok >= a) & (done_ok < b)
        offered = int(((result.scheduled_ns >= a) & (result.scheduled_ns < b)).sum())
        achieved = int(m.sum())
        out.append({
            "start_s": (a - result.t0_ns) / 1e9,
            "offered": offered,
            "achieved": achieved,
            "achieved_rate": achieved / w_s,
            "metric": (achieved / offered if offered else 0.0) if open_loop else achieved / w_s,
            "p99_ms": float(np.percentile(lat_ok[m], 99)) / 1e6 if achieved else float("nan"),
        })
    return out


@dataclass(frozen=True)
class Rules:
    """Validity rules (MLPerf-style). ``slo_ms`` None: no latency bound. Offline has no latency bound."""

    min_duration_s: float = 10.0
    min_queries: int = 256
    stability_tol: float = 0.10
    min_window_queries: int = 20
    slo_ms: float | None = None
    slo_percentile: str = "p99"
    max_error_frac: float = 0.01


def verdict(summary: dict, rules: Rules) -> tuple[bool, list[str]]:
    """(valid, reasons). Reasons name every rule, passed or failed, with its numbers."""
    reasons = []
    ok = True

    def rule(passed: bool, text: str) -> None:
        nonlocal ok
        ok &= passed
        reasons.append(("ok: " if passed else "FAILED: ") + text)

    d = summary["duration_s"]
    rule(d >= rules.min_duration_s, f"duration {d:.1f} s (min {rules.min_duration_s:g} s)")
    q = summary["queries"]
    rule(q >= rules.min_queries, f"{q} queries (min {rules.min_queries})")
    ef = summary["error_frac"]
    rule(ef <= rules.max_error_frac,
         f"errors {ef:.1%} (max {rules.max_error_frac:.0%})" + (f": {summary['errors']}" if ef else ""))

    wins = summary["windows"][-3:]
    if len(wins) < 3:
        rule(False, "stability: fewer than three windows")
    elif min(w["achieved"] for w in wins) < rules.min_window_queries:
        rule(False, f"stability: a window of the last three has fewer than {rules.min_window_queries} queries")
    else:
        m = [w["metric"] for w in wins]
        spread = (max(m) - min(m)) / max(np.mean(m), 1e-12)
        what = "achieved/offered" if summary["scenario"] in ("server", "step", "replay") else "throughput"
        rule(spread <= rules.stability_tol,
             f"last three windows' {what} within {spread:.1%} of each other (max {rules.stability_tol:.0%}):"
             f" {', '.join(f'{x:.3g}' for x in m)}")

    if rules.slo_ms is not None and summary["scenario"] != "offline":
        v = summary["latency_ms"][rules.slo_percentile]
        rule(bool(v <= rules.slo_ms), f"{rules.slo_percentile} {v:.1f} ms (bound {rules.slo_ms:g} ms)")
    return ok, reasons


# ---------------------------------------------------------------------------------------------------
# Peak search
# ---------------------------------------------------------------------------------------------------


@dataclass
class PeakResult:
    peak_rate: float
    trials: list[tuple[float, bool, dict]]  # (rate, passed, summary)


def find_peak(measure: Callable[[float], dict], slo_ms: float, lo: float, hi: float, *,
              rel_tol: float = 0.05, max_trials: int = 8, max_error_frac: float = 0.01,
              percentile: str = "p99") -> PeakResult:
    """Highest Poisson rate with ``percentile`` latency <= ``slo_ms``, by bisection on the rate.

    ``measure(rate) -> summary`` runs one Server trial. ``hi`` should be a rate known (or likely) to
    fail, e.g. a bit above the offline capacity; it is tried first, and if it passes, it is the answer.
    """
    if not 0 <= lo < hi:
        raise ValueError(f"find_peak: expected 0 <= lo < hi, got {lo}, {hi}")
    trials: list[tuple[float, bool, dict]] = []

    def passes(rate: float) -> bool:
        s = measure(rate)
        good = bool(s["latency_ms"][percentile] <= slo_ms) and s["error_frac"] <= max_error_frac
        trials.append((rate, good, s))
        return good

    if passes(hi):
        return PeakResult(hi, trials)
    best = lo
    while len(trials) < max_trials and (hi - lo) > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if passes(mid):
            lo = best = mid
        else:
            hi = mid
    return PeakResult(best, trials)
