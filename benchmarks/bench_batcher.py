"""Batcher overhead: a Pipeline around a no-op model on tiny pre-decoded images, so that what is measured is
the admission, batching, hand-off and completion machinery rather than pixels or FLOPs.

    python benchmarks/bench_batcher.py [--requests 40000] [--window 1024] [--rate 4000] [--delay-us 1000]

Prints: saturated throughput (requests/s with 1024 in flight, and with every request queued at once;
target >= 20,000), the p50/p99 latency added beyond
max_queue_delay_us under an open-loop Poisson load well below saturation (target p99 <= 0.5 ms), and the
cost of one timing record (build + fill + hand to a sink; with the Recorder when it is importable).
Also collected by pytest (``test_record_cost``) as a pytest-benchmark smoke test.

Each run calls ``gc.freeze()`` once the pipeline is up, as a server should after start-up: torch leaves
~200k objects in the heap, and without it every full collection walks them all. Submit cost on the 2-core
dev box, blocked pipeline, 20k requests: 50 -> 17.5 CPU us per request.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import threading
import time

import numpy as np
import torch
from torch import nn

from aurora_core.batching import BatchingConfig
from aurora_core.ops.preprocess import PreprocessSpec
from aurora_core.pipeline import Pipeline, _precise_timers
from aurora_core.records import RequestRecord, now_ns

SPEC = PreprocessSpec(resize=8, crop=8)


class NoOp(nn.Module):
    """[B, 3, 8, 8] -> logits [B, 10] with no real compute."""

    def forward(self, x):
        return x.flatten(1)[:, :10]


def make_pipeline(delay_us: int, sink=None, max_batch: int = 64, max_queue: int = 1_000_000) -> Pipeline:
    cfg = BatchingConfig(max_batch_size=max_batch, max_queue_delay_us=delay_us, max_queue_size=max_queue)
    return Pipeline(NoOp(), SPEC, cfg, device="cpu", top_k=1, sink=sink, num_workers=1)


def images(n: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def throughput(n: int, delay_us: int, sink=None, window: int | None = 1024) -> tuple[float, float]:
    """(requests/s, CPU us per request) with requests submitted as fast as one client thread can, keeping
    at most ``window`` of them in flight (perf_analyzer's concurrency mode), or all ``n`` at once when
    ``window`` is None. CPU time (all threads of this process) is the steadier figure on a shared machine.

    The window matters: every queued request is ~13 GC-tracked objects (11 of them its Future), and with
    gc.freeze() a full collection runs every tenth gen-1 one and walks the whole queue. Flooding 40k
    requests (a 20k-deep queue) spent ~25% of the run in those collections; a server's queue is bounded
    by max_queue_size (default 256), so the windowed figure is the one a server sees."""
    imgs = images()
    finished = itertools.count(1)
    completed = [0]
    resume_at = [0]  # the client sleeps until this many have completed
    room = threading.Event()
    all_done = threading.Event()
    limit = n if window is None else window

    def on_done(f):
        c = next(finished)
        completed[0] = c  # two workers race here; a stale count is put right by the next completion
        if c >= resume_at[0] and not room.is_set():
            room.set()
        if c == n:
            all_done.set()

    with make_pipeline(delay_us, sink, max_queue=limit + 1) as pipe:
        pipe.infer(imgs[0])
        gc.freeze()  # as a server does after start-up; see main()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            if i - completed[0] >= limit:
                # Half a window at a time: one wake-up per limit/2 requests, not one per request (a
                # semaphore cost a context switch each).
                resume_at[0] = i - limit // 2
                room.clear()
                while i - completed[0] >= limit // 2 + 1:
                    room.wait(1.0)
                    room.clear()
            pipe.submit(imgs[i & 63]).add_done_callback(on_done)
        assert all_done.wait(120), "a request never completed"
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        st = pipe.stats()
    assert st["completed"] == n + 1 and st["rejected"] == 0, st
    return n / dt, cpu / n * 1e6


def added_latency(rate: float, seconds: float, delay_us: int) -> dict:
    """Open-loop Poisson arrivals. Returns p50/p99 (ms) of latency - max_queue_delay, with latency from the
    scheduled send time (so a client that falls behind is charged for it), and its two parts: the client's
    lateness (send - scheduled) and the pipeline's added latency (completion - send - delay)."""
    imgs = images()
    rng = np.random.default_rng(1)
    n = int(rate * seconds)
    gaps = rng.exponential(1e9 / rate, n).astype(np.int64)
    lat = np.zeros(n, np.int64)
    late = np.zeros(n, np.int64)
    done = threading.Semaphore(0)
    _precise_timers()  # the client's sleeps end within 1 us of the send time, as the workers' waits do
    with make_pipeline(delay_us) as pipe:
        pipe.infer(imgs[0])
        gc.freeze()
        start = now_ns() + 1_000_000
        sched = start + np.cumsum(gaps)
        for i in range(n):
            wait = sched[i] - now_ns()
            if wait > 0:
                time.sleep(wait / 1e9)  # sleeping, not spinning: a spinning client would hold the GIL

            def cb(f, i=i):
                t = f.result().timings
                lat[i], late[i] = t.completion_ns - sched[i], t.arrival_ns - sched[i]
                done.release()

            pipe.submit(imgs[i & 63]).add_done_callback(cb)
        for _ in range(n):
            assert done.acquire(timeout=60), "a request never completed"

    def pct(x):
        return float(np.percentile(x / 1e6, 50)), float(np.percentile(x / 1e6, 99))

    return {"added": pct(lat - delay_us * 1000), "client_late": pct(late),
            "pipeline_added": pct(lat - late - delay_us * 1000), "n": n}


def record_cost(n: int = 200_000, sink=None) -> float:
    """ns per record: build a RequestRecord, stamp its fields, hand it to ``sink``."""
    sink = sink or (lambda r: None)
    t0 = time.perf_counter_ns()
    for i in range(n):
        r = RequestRecord(request_id=i, arrival_ns=now_ns(), priority=0, device="cpu")
        r.enqueue_ns = r.batch_closed_ns = r.preprocess_start_ns = r.preprocess_end_ns = now_ns()
        r.compute_start_ns = r.compute_end_ns = r.completion_ns = now_ns()
        r.batch_id, r.batch_size, r.bucket, r.status = 1, 8, 8, "ok"
        sink(r)
    return (time.perf_counter_ns() - t0) / n


def preprocess_cost(reps: int = 300) -> float:
    """CPU us per image of the batched preprocess call the pipeline makes (64 images of 8x8), to tell the
    kernel's share from the batching machinery's."""
    from aurora_core.ops.preprocess import preprocess_batch

    imgs = images()
    out = torch.empty((64, 3, 8, 8))
    c0 = time.process_time()
    for _ in range(reps):
        preprocess_batch(imgs, SPEC, out=out, orig_sizes=[(8, 8)] * 64, scales=[1] * 64, num_threads=1)
    return (time.process_time() - c0) / (reps * 64) * 1e6


def _recorder():
    try:
        from aurora_core.recorder import Recorder

        return Recorder(path=None)
    except Exception as e:  # noqa: BLE001 - the recorder is optional here
        print(f"(Recorder not usable: {e!r}; timing a no-op sink only)")
        return None


def test_record_cost(benchmark):
    benchmark.extra_info["ns_per_record"] = benchmark(record_cost, 2000)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40_000)
    ap.add_argument("--rate", type=float, default=4000.0, help="Poisson rate for the latency run (req/s)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the latency run")
    ap.add_argument("--delay-us", type=int, default=1000)
    ap.add_argument("--window", type=int, default=1024, help="requests in flight in the throughput run")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rps, cpu_us = throughput(a.requests, a.delay_us, window=a.window)
    print(f"throughput: {rps:,.0f} requests/s, {cpu_us:.1f} CPU us per request "
          f"({a.requests} requests, {a.window} in flight, no-op model, 8x8 images; target >= 20,000/s)")
    rps_all, cpu_all = throughput(a.requests, a.delay_us, window=None)
    print(f"  all {a.requests} queued at once: {rps_all:,.0f} requests/s, {cpu_all:.1f} CPU us per request "
          "(Python's full collections walk the deep queue)")
    print(f"  of which the preprocess call: {preprocess_cost():.1f} CPU us per image")
    rec = _recorder()
    if rec is not None:
        rps_rec, cpu_rec = throughput(a.requests, a.delay_us, sink=rec, window=a.window)
        print(f"throughput with a Recorder sink: {rps_rec:,.0f} requests/s, {cpu_rec:.1f} CPU us per request")
    lat = added_latency(a.rate, a.seconds, a.delay_us)
    (p50, p99), n = lat["added"], lat["n"]
    print(f"added latency beyond max_queue_delay_us={a.delay_us}: p50 {p50:.3f} ms, p99 {p99:.3f} ms "
          f"({n} requests, Poisson {a.rate:,.0f}/s; target p99 <= 0.5 ms)")
    print("  client lateness (send - scheduled): p50 {:.3f} ms, p99 {:.3f} ms; pipeline's part (completion - "
          "send - delay): p50 {:.3f} ms, p99 {:.3f} ms".format(*lat["client_late"], *lat["pipeline_added"]))
    print(f"timing record: {record_cost():,.0f} ns each (build + fill + no-op sink)")
    if rec is not None:
        print(f"timing record into Recorder: {record_cost(50_000, rec):,.0f} ns each")
        rec.close()


if __name__ == "__main__":
    main()
