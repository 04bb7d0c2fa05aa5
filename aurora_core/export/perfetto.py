"""Chrome Trace Event Format JSON (opens in ui.perfetto.dev and chrome://tracing) from a run.

Layout, one "process" per kind of track:

* ``requests``: one slice per request (arrival to completion) with its stages nested inside
  (queue, decode, preprocess, h2d, compute, d2h). Requests overlap, so they are spread over lanes
  (threads), each request on the first free lane.
* ``batches``: one slice per batch over its compute and D2H (size and bucket in args).
* ``spans``: user spans (``recorder.span("feature_store")``).
* ``telemetry``: counter tracks (``"ph": "C"``) for SM clock, temperature, power, utilization, every
  throttled fraction, staleness, CPU load/steal, and the queue depth seen by arriving requests;
  hardware and sampler events (Xid, GPU lost) as global instant events.

Timestamps are µs (floats, ns precision) since the earliest timestamp in the run; the event list is
sorted by time. Stages nest when one contains another; a stage sticking out of its enclosing slice is
clipped to it (the true times stay in args).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable

from aurora_core.records import FIELD_NAMES, STAGES, Event, RequestRecord, Sample, Span, coverage_cap

COUNTER_METRICS = (
    "sm_clock_mhz", "mem_clock_mhz", "temp_c", "temp_margin_c", "power_w", "util_gpu_busy_pct", "stale_age_s",
    "cpu_util_pct", "steal_pct", "cgroup_throttled_frac", "psi_cpu_some_avg10", "load1",
)
PID_REQUESTS, PID_BATCHES, PID_SPANS, PID_TELEMETRY = 1, 2, 3, 4


class _Lanes:
    """Greedy interval partitioning: the first lane free at ``start`` (lanes numbered from 1)."""

    def __init__(self):
        self._free: list[tuple[int, int]] = []  # (end_ns, lane)
        self.n = 0

    def take(self, start: int, end: int) -> int:
        if self._free and self._free[0][0] <= start:
            _, lane = heapq.heappop(self._free)
        else:
            self.n += 1
            lane = self.n
        heapq.heappush(self._free, (end, lane))
        return lane


def _request_bounds(r: RequestRecord) -> tuple[int, int] | None:
    stamps = [getattr(r, f) for f in FIELD_NAMES if f.endswith("_ns") and getattr(r, f) > 0]
    if not stamps:
        return None
    return (r.arrival_ns or min(stamps)), (r.completion_ns or max(stamps))


def trace_events(records: Iterable[RequestRecord] = (), samples: Iterable[Sample] = (),
                 events: Iterable[Event] = (), spans: Iterable[Span] = (), max_requests: int | None = None) -> list[dict]:
    """The ``traceEvents`` list, sorted by ts (µs since the earliest timestamp)."""
    records = [r for r in records if _request_bounds(r) is not None]
    if max_requests is not None:
        records = records[:max_requests]
    samples, events, spans = list(samples), list(events), list(spans)
    starts = [_request_bounds(r)[0] for r in records] + [s.ts_ns for s in samples] + \
             [e.ts_ns for e in events] + [s.start_ns for s in spans]
    t0 = min(starts) if starts else 0

    def us(ns: int) -> float:
        return round((ns - t0) / 1000.0, 3)

    out: list[dict] = []
    req_lanes, batch_lanes, span_lanes = _Lanes(), _Lanes(), _Lanes()

    # Requests with nested stages; batches from the same records.
    batches: dict[int, list[RequestRecord]] = {}
    for r in sorted(records, key=lambda r: _request_bounds(r)[0]):
        a, b = _request_bounds(r)
        lane = req_lanes.take(a, b)
        out.append({"name": f"request {r.request_id}", "ph": "X", "ts": us(a), "dur": us(b) - us(a),
                    "pid": PID_REQUESTS, "tid": lane,
                    "args": {"status": r.status, "batch_id": r.batch_id, "queue_depth": r.queue_depth,
                             "device": r.device, "priority": r.priority}})
        # Stages that overlap (decode while queued, say) nest when one contains the other; one that
        # sticks out of its enclosing slice is clipped to it, so every lane stays properly nested.
        stack = [b]  # end times of the open slices, the request at the bottom
        stages = [(getattr(r, s), getattr(r, e), name) for name, (s, e) in STAGES.items() if name != "total"]
        for s, e, name in sorted((x for x in stages if x[0] and x[1] and x[1] >= x[0]), key=lambda x: (x[0], -x[1])):
            while len(stack) > 1 and s >= stack[-1]:
                stack.pop()
            cs, ce = max(s, a), min(e, stack[-1])
            if ce < cs:
                continue
            out.append({"name": name, "ph": "X", "ts": us(cs), "dur": us(ce) - us(cs), "pid": PID_REQUESTS,
                        "tid": lane, "args": {"start_us": us(s), "end_us": us(e)}})
            stack.append(ce)
        if r.batch_id >= 0 and r.compute_start_ns:
            batches.setdefault(r.batch_id, []).append(r)
    for bid, rs in sorted(batches.items(), key=lambda kv: min(x.compute_start_ns for x in kv[1])):
        a = min(x.compute_start_ns for x in rs)
        b = max(max(x.d2h_end_ns, x.compute_end_ns) for x in rs)
        b = max(a, b)
        out.append({"name": f"batch {bid}", "ph": "X", "ts": us(a), "dur": us(b) - us(a), "pid": PID_BATCHES,
                    "tid": batch_lanes.take(a, b),
                    "args": {"batch_size": max(x.batch_size for x in rs), "bucket": max(x.bucket for x in rs),
                             "requests": len(rs)}})

    for sp in sorted(spans, key=lambda s: s.start_ns):
        end = max(sp.start_ns, sp.end_ns)
        out.append({"name": sp.name, "ph": "X", "ts": us(sp.start_ns), "dur": us(end) - us(sp.start_ns),
                    "pid": PID_SPANS, "tid": span_lanes.take(sp.start_ns, end),
                    "args": {"request_id": sp.request_id, "attrs": sp.attrs}})

    # Counter tracks. A non-finite value (a failed read) is left out: written as NaN or Infinity it makes
    # the trace processor spin forever on load, so the UI never opens the trace. A counter point holds from
    # its ts on, but a throttled fraction covers the interval since its counter's previous read: it is
    # drawn from that read, unless a gap lies between (records.coverage_cap, as diagnose weighs it).
    throttle: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for s in samples:
        for metric, x in s.values.items():
            if not math.isfinite(x):
                continue
            if metric.startswith("throttle_frac_"):
                throttle.setdefault((s.source, metric), []).append((s.ts_ns, x))
            elif metric in COUNTER_METRICS:
                out.append({"name": f"{s.source} {metric}", "ph": "C", "ts": us(s.ts_ns), "pid": PID_TELEMETRY,
                            "args": {"value": x}})
    for (source, metric), pts in throttle.items():
        pts.sort()
        cap = coverage_cap([t for t, _ in pts])
        for i, (t, x) in enumerate(pts):
            ts = pts[i - 1][0] if i and t - pts[i - 1][0] <= cap else t
            out.append({"name": f"{source} {metric}", "ph": "C", "ts": us(ts), "pid": PID_TELEMETRY,
                        "args": {"value": x}})
    for r in records:
        if r.arrival_ns:
            out.append({"name": "queue_depth", "ph": "C", "ts": us(r.arrival_ns), "pid": PID_TELEMETRY,
                        "args": {"value": r.queue_depth}})
    for e in events:
        out.append({"name": f"{e.source} {e.kind}", "ph": "i", "s": "g", "ts": us(e.ts_ns), "pid": PID_TELEMETRY,
                    "tid": 0, "args": {"value": e.value if math.isfinite(e.value) else None, "detail": e.detail}})

    # Longer slices first at equal ts, so parents precede the children they contain.
    out.sort(key=lambda ev: (ev["ts"], -ev.get("dur", 0)))
    meta = [{"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": 0, "args": {"name": name}}
            for pid, name in ((PID_REQUESTS, "requests"), (PID_BATCHES, "batches"), (PID_SPANS, "spans"),
                              (PID_TELEMETRY, "telemetry"))]
    meta += [{"name": "thread_name", "ph": "M", "ts": 0, "pid": PID_REQUESTS, "tid": i,
              "args": {"name": f"lane {i}"}} for i in range(1, req_lanes.n + 1)]
    return meta + out


def to_chrome_trace(records=(), samples=(), events=(), spans=(), metadata: dict | None = None,
                    max_requests: int | None = None) -> dict:
    """A complete trace object: ``{"traceEvents": [...], "displayTimeUnit": "ms", "metadata": {...}}``."""
    return {"traceEvents": trace_events(records, samples, events, spans, max_requests=max_requests),
            "displayTimeUnit": "ms", "metadata": dict(metadata or {})}


def write_chrome_trace(out_path, records=(), samples=(), events=(), spans=(), metadata=None,
                       max_requests: int | None = None) -> str:
    trace = to_chrome_trace(records, samples, events, spans, metadata, max_requests)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(trace, f, separators=(",", ":"), allow_nan=False)  # NaN is not JSON; fail here, not in the UI
    return str(out_path)


def export_run(run_path, out_path, max_requests: int | None = 200_000) -> str:
    """Read a run file with ``aurora_core.recorder.load_run`` and write its Chrome trace to ``out_path``.

    max_requests bounds the slices (a million requests make a trace the UI cannot load); telemetry
    and events are always complete.
    """
    from aurora_core.recorder import load_run

    run = load_run(run_path)
    req = run.requests
    n = int(req["request_id"].size) if "request_id" in req else 0
    if max_requests is not None:
        n = min(n, max_requests)
    records = []
    for i in range(n):
        kw = {f: (str(req[f][i]) if f in ("status", "device") else int(req[f][i])) for f in FIELD_NAMES if f in req}
        records.append(RequestRecord(**kw))
    samples = []
    for (source, metric), (ts, vals) in run.samples.items():
        samples.extend(Sample(int(t), source, {metric: float(v)}) for t, v in zip(ts, vals, strict=True))
    ev = run.events
    events = [Event(int(ev["ts_ns"][i]), str(ev["source"][i]), str(ev["kind"][i]), float(ev["value"][i]),
                    str(ev["detail"][i])) for i in range(len(ev.get("ts_ns", [])))]
    sp = run.spans
    spans = [Span(str(sp["name"][i]), int(sp["start_ns"][i]), int(sp["end_ns"][i]), int(sp["request_id"][i]),
                  str(sp["attrs"][i])) for i in range(len(sp.get("name", [])))]
    meta = {k: run.meta[k] for k in ("run_id", "host", "label", "region") if k in run.meta}
    return write_chrome_trace(out_path, records, samples, events, spans, metadata=meta)


# ---- ``aurora trace`` -------------------------------------------------------------------------------

def add_arguments(p) -> None:
    from aurora_core.cli import number

    p.add_argument("run", help="a run directory (holding run.aurora.sqlite), the run file, a store root holding one "
                   "host, or one host's directory of a store (ROOT/region=R/host=H)")
    p.add_argument("--out", default=None, help="trace file to write (default: trace.json beside the run file)")
    p.add_argument("--max-requests", type=number(int, ge=0), default=200_000,
                   help="request slices to write at most, >= 0 (default 200000; 0: telemetry and events only, "
                        "which are always complete)")


def run(args) -> int:
    import sys
    from pathlib import Path

    from aurora_core.recorder import FILE_NAME, find_run_file
    from aurora_core.store.reader import is_host_dir, is_store

    try:
        p = Path(args.run)
        if not (p / FILE_NAME).exists() and (is_store(p) or is_host_dir(p)):
            # A store (one host) or a host's directory; the trace goes to the store root, outside its partitions.
            src = p
            root = p.parent.parent if is_host_dir(p) else p
            out = args.out or str(root / (f"trace-{p.name[5:]}.json" if is_host_dir(p) else "trace.json"))
        else:
            src = find_run_file(args.run)
            out = args.out or str(Path(src).with_name("trace.json"))
        export_run(src, out, max_requests=args.max_requests)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"aurora trace: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: open it in https://ui.perfetto.dev (or chrome://tracing)")
    return 0

