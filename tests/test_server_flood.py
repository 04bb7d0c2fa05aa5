"""A connection flood on loopback: 2,000 idle connections and 20 slowloris ones, opened while three
well-behaved clients classify. The good clients keep >= 99% success and their p99 within 2x of its
level before the flood; the server's RSS grows < 100 MB and its descriptors return to their level
before the flood once it ends.

The server and the good clients run in this process; the flood comes from a child process of plain
sockets (cheap: no asyncio, no imports beyond the standard library), so the descriptors counted here
are the server's and the good clients'. The old server capped connections at requests + 64 and
answered every classify request past it with 503 for as long as the idle sockets stayed open.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import sys

import numpy as np
import psutil
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import KeepAlivePool, TinyNet, make_jpeg, make_pipeline  # noqa: E402

from aurora_core.batching import BatchingConfig  # noqa: E402
from aurora_core.server import Server  # noqa: E402
from aurora_core.server_app import ServerConfig  # noqa: E402

IDLE, SLOW = 2000, 20
OPEN_S = 1.0          # the flood opens its connections over this long ...
HOLD_S = 3.0          # ... and holds them (the slowloris ones trickling headers) this long
BEFORE_S = 2.0
HEADER_TIMEOUT_S = 2.0
ROW_S = 0.004         # model time per row: the good clients' latency is set by the model, not by noise

FLOOD = r"""
import json, resource, socket, sys, time
host, port, n_idle, n_slow, open_s, hold_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    float(sys.argv[5]), float(sys.argv[6])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
need = n_idle + n_slow + 64
if soft < need:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
socks, slow, refused = [], [], 0
t0 = time.monotonic()
n = n_idle + n_slow
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=5)
    except OSError:
        refused += 1
        continue
    if i % (n // n_slow) == 0 and len(slow) < n_slow:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\n")
        slow.append(s)
    else:
        socks.append(s)
    lag = t0 + open_s * (i + 1) / n - time.monotonic()
    if lag > 0:
        time.sleep(lag)
print("opened", flush=True)
end = time.monotonic() + hold_s
while time.monotonic() < end:  # slowloris: one header byte per socket every 0.2 s
    for s in slow:
        try:
            s.sendall(b"X")
        except OSError:
            pass
    time.sleep(0.2)

def closed(s):
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True

out = {"refused": refused, "idle_closed": sum(map(closed, socks)), "slow_closed": sum(map(closed, slow)),
       "idle": len(socks), "slow": len(slow)}
for s in socks + slow:
    s.close()
print(json.dumps(out), flush=True)
"""


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _shed(metrics: str) -> dict[str, int]:
    return {r: int(float(v)) for r, v in re.findall(r'aurora_http_connections_shed_total\{reason="(\w+)"\} ([0-9.e+]+)',
                                                    metrics)}


async def _scenario(srv, bodies) -> dict:
    """Three closed-loop clients classify throughout; the flood starts after BEFORE_S."""
    loop = asyncio.get_running_loop()
    proc_info = psutil.Process()
    results: list[tuple[float, float, str]] = []   # (start, latency, outcome)
    stop = asyncio.Event()

    async def client(c):
        pool = KeepAlivePool(srv.host, srv.port)
        i = c
        while not stop.is_set():
            t = loop.time()
            try:
                status, _ = await pool.post(bodies[i % len(bodies)], timeout=10)
                outcome = str(status)
            except Exception as e:  # noqa: BLE001 - every failure counts against the 99%
                outcome = type(e).__name__
            results.append((t, loop.time() - t, outcome))
            i += 3
        pool.close()

    clients = [asyncio.ensure_future(client(c)) for c in range(3)]
    await asyncio.sleep(0.5)  # warm-up: connections made, batches formed
    results.clear()
    t_before = loop.time()
    await asyncio.sleep(BEFORE_S)
    base_rss, base_fds = proc_info.memory_info().rss, _fds()
    t_flood = loop.time()
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOD, srv.host, str(srv.port), str(IDLE), str(SLOW), str(OPEN_S), str(HOLD_S),
        stdout=asyncio.subprocess.PIPE)
    peak_rss, peak_open = base_rss, 0
    lines = []

    async def watch_rss():
        nonlocal peak_rss, peak_open
        while True:
            peak_rss = max(peak_rss, proc_info.memory_info().rss)
            peak_open = max(peak_open, len(srv.connections.open))
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch_rss())
    try:
        async with asyncio.timeout(OPEN_S + HOLD_S + 30):
            while line := await flood.stdout.readline():
                lines.append(line.decode().strip())
            await flood.wait()
    finally:
        watcher.cancel()
        if flood.returncode is None:
            flood.kill()
            await flood.wait()
    t_end = loop.time()
    # Descriptors back to their level before the flood (the server sees the flood's closes at once).
    deadline = loop.time() + 5
    while _fds() > base_fds and loop.time() < deadline:
        await asyncio.sleep(0.05)
    after_fds = _fds()
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    before = [(lat, o) for t, lat, o in results if t_before <= t < t_flood]
    during = [(lat, o) for t, lat, o in results if t_flood <= t < t_end]
    return dict(before=before, during=during, flood=json.loads(lines[-1]), flood_lines=lines,
                base_rss=base_rss, peak_rss=peak_rss, base_fds=base_fds, after_fds=after_fds,
                peak_open=peak_open, flood_s=t_end - t_flood)


def _p99(rows) -> float:
    return float(np.percentile([lat for lat, o in rows if o == "200"], 99))


@pytest.mark.parametrize("max_connections", [None, 1000], ids=["default_cap", "cap_1000_sheds"])
def test_flood_of_idle_and_slowloris_connections_does_not_deny_service(max_connections, caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * (IDLE + SLOW) + 512  # the server's side of every flood connection, and everything else here
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    bodies = [make_jpeg(i) for i in range(8)]
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_us=1000, max_queue_size=64,
                              bucket_sizes=(1, 2, 3, 4))
    reports = []
    with make_pipeline(TinyNet(row_delay_s=ROW_S), batching=batching) as pipe, \
            Server(pipe, ServerConfig(), max_connections=max_connections, header_timeout_s=HEADER_TIMEOUT_S) as srv:
        for _ in range(3):
            caplog.clear()
            shed_before = dict(srv.connections.shed)
            f = asyncio.run(_scenario(srv, bodies))
            shed = {k: v - shed_before[k] for k, v in srv.connections.shed.items()}
            ok_during = sum(o == "200" for _, o in f["during"])
            p99_before, p99_during = _p99(f["before"]), _p99(f["during"])
            report = (f"cap {srv.max_connections}: flood {f['flood']} over {f['flood_s']:.1f} s, peak open "
                      f"{f['peak_open']}; good clients before: {len(f['before'])} requests, p99 "
                      f"{p99_before * 1e3:.1f} ms; during: {ok_during}/{len(f['during'])} ok, p99 "
                      f"{p99_during * 1e3:.1f} ms; outcomes {sorted({o for _, o in f['during']})}; RSS "
                      f"+{(f['peak_rss'] - f['base_rss']) / 2**20:.1f} MiB; fds {f['base_fds']} -> {f['after_fds']}; "
                      f"shed {shed}")
            print(report)
            # Every attempt: the flood really happened, the good clients were served, resources returned.
            assert f["flood"]["refused"] == 0 and f["flood"]["idle"] + f["flood"]["slow"] == IDLE + SLOW, report
            assert f["peak_open"] >= min(IDLE, srv.max_connections) * 0.9, report
            assert all(o == "200" for _, o in f["before"]), report
            assert ok_during >= 0.99 * len(f["during"]) and len(f["during"]) >= 30, report
            assert f["peak_rss"] - f["base_rss"] < 100 * 2**20, report
            assert f["after_fds"] <= f["base_fds"], report
            assert f["flood"]["slow_closed"] == SLOW, report  # slowloris cut off, whatever the pressure
            assert shed["refused"] == 0, report
            if max_connections is None:  # thousands of idle connections fit: nothing shed at the cap
                assert shed["at_cap"] == 0 and shed["pressure"] == 0, report
            else:  # everything past the cap shed, oldest idle first, never a refusal
                assert shed["at_cap"] + shed["pressure"] >= IDLE + SLOW - max_connections, report
                assert f["peak_open"] <= max_connections, report
            # Shedding is logged, in a few summary lines rather than one per connection.
            lines = [r.getMessage() for r in caplog.records if r.name == "aurora_core.server"]
            assert any(re.match(r"closed \d+ connections without a request in flight", ln) for ln in lines), lines
            assert len(lines) <= 2 * (f["flood_s"] / 5 + 2), lines
            # The timing claim must hold on one of three attempts (a neighbour's burst on this shared
            # box can stall one attempt, not three).
            reports.append(report)
            if p99_during <= 2 * p99_before:
                break
        else:
            pytest.fail("good clients' p99 during the flood above 2x its level before, 3 times:\n" + "\n".join(reports))
