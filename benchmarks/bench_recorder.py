"""Recorder costs: the sink call on the request path (target <= 2 µs a record), the writer thread's
throughput to the run file, and reading a run back.

Run: python -m pytest benchmarks/bench_recorder.py --benchmark-only
     (CI: --benchmark-disable as a smoke test). Results: ns_per_record / records_per_s in extra_info.
A single sink call is ~100s of ns, below timer resolution for pytest-benchmark's per-round overhead,
so each round times a block of BLOCK calls and the figure is divided out.
"""

from __future__ import annotations

import time

import pytest

from aurora_core.recorder import Recorder, load_run
from aurora_core.records import FIELD_NAMES, RequestRecord, Span

BLOCK = 10_000


def _records(n: int) -> list[RequestRecord]:
    out = []
    t = 1_000_000_000
    for i in range(n):
        r = RequestRecord(request_id=i, arrival_ns=t, enqueue_ns=t + 1, batch_closed_ns=t + 500_000,
                          decode_start_ns=t + 500_100, decode_end_ns=t + 1_500_000,
                          preprocess_start_ns=t + 1_500_000, preprocess_end_ns=t + 2_100_000,
                          compute_start_ns=t + 2_200_000, compute_end_ns=t + 9_000_000,
                          d2h_end_ns=t + 9_100_000, completion_ns=t + 9_200_000, batch_id=i // 8,
                          batch_size=8, bucket=8, queue_depth=i % 5)
        out.append(r)
        t += 10_000 + (i % 13) * 1000
    return out


def _recorder(target: str, where) -> Recorder:
    """memory: no file; file: a run file in ``where``; store: a store root ``where/store``."""
    if target == "store":
        return Recorder(store=where / "store", ring_size=100_000)
    return Recorder(None if target == "memory" else where, ring_size=100_000)


@pytest.mark.parametrize("target", ["memory", "file", "store"])
def test_sink_call(benchmark, tmp_path, target):
    """Cost of ``rec(record)`` on the calling thread, with the writer thread live."""
    benchmark.group = "recorder sink call"
    recs = _records(BLOCK)
    rec = _recorder(target, tmp_path / "run")

    def block():
        for r in recs:
            rec(r)

    try:
        benchmark.pedantic(block, rounds=20, iterations=1, warmup_rounds=1)
    finally:
        rec.close()
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ns_per_record"] = benchmark.stats.stats.median / BLOCK * 1e9
        benchmark.extra_info["dropped"] = rec.dropped["requests"]


def test_span_context_manager(benchmark):
    benchmark.group = "recorder span"
    rec = Recorder(None)

    def block():
        for _ in range(BLOCK):
            with rec.span("feature_store"):
                pass

    try:
        benchmark.pedantic(block, rounds=10, iterations=1)
    finally:
        rec.close()
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_span"] = benchmark.stats.stats.median / BLOCK * 1e9


@pytest.mark.parametrize("target", ["file", "store"])
def test_writer_throughput_and_load(benchmark, tmp_path, target):
    """End to end: hand 100k records in, close (drain + histograms + file or segment), read them back."""
    benchmark.group = "recorder file"
    n = 100_000
    base = _records(1)[0]
    recs = []
    for i in range(n):
        r = RequestRecord(**{f: getattr(base, f) for f in FIELD_NAMES})
        r.request_id = i
        recs.append(r)
    state = {"k": 0}

    def write_and_close():
        state["k"] += 1
        with _recorder(target, tmp_path / f"run{state['k']}") as rec:
            for r in recs:
                rec(r)
            rec.add_span(Span("x", 1, 2))

    benchmark.pedantic(write_and_close, rounds=3, iterations=1)
    where = tmp_path / f"run{state['k']}"
    t0 = time.perf_counter()
    if target == "store":
        from aurora_core.store import open_store

        n_read = sum(r.n_requests for r in open_store(where / "store").run_data())
        files = list(where.rglob("*.parquet"))
    else:
        n_read = load_run(where).n_requests
        files = [where / "run.aurora.sqlite"]
    load_s = time.perf_counter() - t0
    assert n_read == n
    if benchmark.stats is not None:
        benchmark.extra_info["records_per_s_written"] = n / benchmark.stats.stats.median
        benchmark.extra_info["records_per_s_loaded"] = n / load_s
        benchmark.extra_info["bytes_per_record"] = sum(f.stat().st_size for f in files) / n
