"""Overload at 2x capacity over a real socket: admission control keeps the admitted requests' p99
bounded, rejects the excess quickly with 503, accounts for every request exactly, and latency
returns to the baseline once the load drops.

The model sleeps a fixed time per batch (GIL released), so capacity is set by the model, not by
the HTTP stack or a noisy neighbour; every bound is derived from figures measured in the same run.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_server import KeepAlivePool, TinyNet, make_jpeg, make_pipeline  # noqa: E402

from aurora_core.batching import BatchingConfig  # noqa: E402
from aurora_core.server import Server  # noqa: E402
from aurora_core.server_app import ServerConfig  # noqa: E402

BATCH = 4
ROW_S = 0.025         # model time per row: capacity ~ 1 / ROW_S = 40 requests/s, CPU mostly idle
QUEUE = 8
OVERLOAD_S = 6.0
LIGHT_S = 2.0


async def _open_loop(host, port, bodies, rate, duration_s, seed):
    """Poisson arrivals; latency measured from the scheduled send time (no coordinated omission).
    Returns a list of (outcome, latency_s) with exactly one entry per request sent."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, int(rate * duration_s * 2) + 16))
    times = times[times < duration_s]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results: list[tuple[str, float]] = []
    pool = KeepAlivePool(host, port)

    async def one(i, at):
        try:
            status, _ = await pool.post(bodies[i % len(bodies)], timeout=15)
            outcome = {200: "ok", 503: "rejected"}.get(status, f"status_{status}")
        except Exception as e:  # noqa: BLE001 - every failure is counted, by kind
            outcome = f"error_{type(e).__name__}"
        results.append((outcome, loop.time() - (t0 + at)))

    tasks = []
    for i, at in enumerate(times):
        delay = t0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, at)))
    await asyncio.gather(*tasks)
    pool.close()
    assert len(results) == len(times)
    return results


async def _closed_loop(host, port, bodies, concurrency, duration_s):
    """Requests/s of 200s with ``concurrency`` clients back to back."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s
    ok = 0
    pool = KeepAlivePool(host, port)

    async def worker(w):
        nonlocal ok
        i = w
        while loop.time() < end:
            status, _ = await pool.post(bodies[i % len(bodies)], timeout=15)
            ok += status == 200
            i += concurrency

    t0 = loop.time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    pool.close()
    return ok / (loop.time() - t0)


def _p(lat, q):
    return float(np.percentile(lat, q)) if len(lat) else float("nan")


def _counter(text, status):
    m = re.search(r'aurora_http_requests_total\{route="/v1/classify",status="' + str(status) + r'"\} ([0-9.e+]+)', text)
    return int(float(m.group(1))) if m else 0


def _run_once(pipe, srv, client, bodies) -> dict:
    host, port = srv.host, srv.port

    async def scenario():
        await _closed_loop(host, port, bodies, 4, 0.5)  # warm-up
        capacity = await _closed_loop(host, port, bodies, QUEUE, 2.5)
        base = await _open_loop(host, port, bodies, 0.25 * capacity, LIGHT_S, seed=1)
        before = (client.get("/metrics").text, pipe.stats())
        over = await _open_loop(host, port, bodies, 2.0 * capacity, OVERLOAD_S, seed=2)
        after = (client.get("/metrics").text, pipe.stats())
        for _ in range(100):  # let the backlog drain before measuring recovery
            if pipe.queue_depth() == 0:
                break
            await asyncio.sleep(0.05)
        recovered = await _open_loop(host, port, bodies, 0.25 * capacity, LIGHT_S, seed=3)
        return capacity, base, over, before, after, recovered

    capacity, base, over, before, after, recovered = asyncio.run(scenario())
    ok_lat = [t for o, t in over if o == "ok"]
    rej_lat = [t for o, t in over if o == "rejected"]
    base_ok = [t for o, t in base if o == "ok"]
    rec_ok = [t for o, t in recovered if o == "ok"]
    f = dict(capacity=capacity, sent=len(over), ok=len(ok_lat), rejected=len(rej_lat),
             outcomes=sorted({o for o, _ in over}), base_all_ok=len(base_ok) == len(base),
             rec_all_ok=len(rec_ok) == len(recovered), p99_base=_p(base_ok, 99), p99_over=_p(ok_lat, 99),
             p50_ok=_p(ok_lat, 50), p50_rej=_p(rej_lat, 50), p99_rej=_p(rej_lat, 99), p99_rec=_p(rec_ok, 99),
             server_200=_counter(after[0], 200) - _counter(before[0], 200),
             server_503=_counter(after[0], 503) - _counter(before[0], 503),
             completed=after[1]["completed"] - before[1]["completed"],
             pipeline_rejected=after[1]["rejected"] - before[1]["rejected"])
    f["errored"] = f["sent"] - f["ok"] - f["rejected"]
    f["report"] = (
        f"capacity {capacity:.0f} req/s; overload {2 * capacity:.0f} req/s for {OVERLOAD_S:.0f} s: sent {f['sent']} "
        f"= ok {f['ok']} + rejected {f['rejected']} + errored {f['errored']}; p99 baseline "
        f"{f['p99_base'] * 1e3:.0f} ms, admitted under overload {f['p99_over'] * 1e3:.0f} ms, rejected p50/p99 "
        f"{f['p50_rej'] * 1e3:.1f}/{f['p99_rej'] * 1e3:.1f} ms, after the load drops {f['p99_rec'] * 1e3:.0f} ms")
    return f


def _latency_problems(f) -> list[str]:
    """The timing claims, against figures measured in the same attempt, with generous factors."""
    problems = []
    if not (f["base_all_ok"] and f["rec_all_ok"]):
        problems.append("a light-load request was not served")
    # Admitted requests wait at most for the queue ahead of them plus the batches in flight: bounded
    # by the queue, not by how long the overload lasts (without admission control ~OVERLOAD_S / 2).
    queue_bound_s = (QUEUE + 3 * BATCH) / f["capacity"]
    if not f["p99_over"] <= min(2 * queue_bound_s + 2 * f["p99_base"] + 0.1, OVERLOAD_S / 3):
        problems.append("admitted p99 not bounded by the queue")
    # The excess is rejected quickly: well before an admitted request would have been served.
    if not (f["p50_rej"] < 0.5 * f["p50_ok"] and f["p99_rej"] <= max(0.25, 2 * f["p99_base"])):
        problems.append("rejections not fast")
    if not f["p99_rec"] <= 3 * f["p99_base"] + 0.05:
        problems.append("p99 did not return to the baseline")
    return problems


def test_overload_2x_capacity_bounded_p99_fast_rejection_exact_accounting_and_recovery():
    """Accounting is checked on every attempt. The timing claims must hold on one of 3 attempts:
    a neighbour's CPU burst on this shared 2-core box can stall one attempt, but not three."""
    bodies = [make_jpeg(i) for i in range(16)]
    batching = BatchingConfig(max_batch_size=BATCH, max_queue_delay_us=2000, max_queue_size=QUEUE,
                              bucket_sizes=tuple(range(1, BATCH + 1)))
    reports = []
    with make_pipeline(TinyNet(row_delay_s=ROW_S), batching=batching) as pipe, \
            Server(pipe, ServerConfig(request_timeout_s=10)) as srv, httpx.Client(base_url=srv.url) as c:
        for _ in range(3):
            f = _run_once(pipe, srv, c, bodies)
            report = f["report"]
            print(report)
            # Exact accounting: one outcome per request sent, and the server agrees request for request.
            assert f["sent"] == f["ok"] + f["rejected"] + f["errored"], report
            assert f["errored"] <= 0.01 * f["sent"], (report, f["outcomes"])
            assert f["server_200"] == f["completed"] == f["ok"], (report, f)
            assert f["server_503"] == f["pipeline_rejected"] == f["rejected"], (report, f)
            # It really was overload, and goodput held up instead of collapsing.
            assert f["rejected"] >= 0.2 * f["sent"], report
            assert f["ok"] >= 0.6 * f["capacity"] * OVERLOAD_S, report
            problems = _latency_problems(f)
            reports.append(f"{report} -> {problems or 'ok'}")
            if not problems:
                break
    assert not problems, "\n".join(reports)
