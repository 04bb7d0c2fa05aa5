"""A fleet on a local Ray (loopback only) recording into one store: one replica's process is moved into a
cgroup v1 with a small CPU quota mid-run, and ``aurora diagnose`` on the store names that replica, and
only that one, as CPU contention with the cgroup's throttling as evidence.

Skipped without ``ray[serve]``, without root, or without a writable cgroup v1 cpu hierarchy. About a
minute: Ray's start (~15 s), the deployment (~10 s), 20 s of load and the diagnosis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_ray_serve import _free_port, _parse, _wait_running, save_slow_net  # noqa: E402
from test_telemetry_cpu import _v1_cpu_root  # noqa: E402

from aurora_core.recorder import load_run  # noqa: E402
from aurora_core.samples import sample_bytes  # noqa: E402

try:
    import ray
    from ray import serve

    from aurora_core import ray_serve
except ImportError:
    ray = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(ray is None, reason="needs ray[serve] (pip install 'aurora_core[ray]')"),
    pytest.mark.skipif(_v1_cpu_root() is None, reason="needs a writable cgroup v1 cpu hierarchy (root)"),
]

RATE, LOAD_S, MOVE_AT_S, BACK_AT_S, QUOTA, PERIOD_US = 16.0, 20.0, 8.0, 15.0, 0.1, 10_000


def _replica_pids(root: str) -> tuple[dict[str, int], dict[str, int]]:
    """store host -> the pid in its segments' meta, and -> the requests it has recorded so far."""
    pids, served = {}, {}
    for d in Path(root).glob("region=*/host=*"):
        try:
            run = load_run(d)
        except Exception:  # no segment flushed yet
            continue
        pids[run.meta["host"]], served[run.meta["host"]] = int(run.meta["pid"]), run.n_requests
    return pids, served


def _open_loop(url: str, stop: threading.Event, counts: dict) -> None:
    """Requests at a fixed rate (open loop, so a slow replica does not slow the arrivals) until stopped."""
    data = sample_bytes("0.3mp")
    with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(16) as ex:
        def one(_):
            try:
                r = c.post("/v1/classify", content=data)
                key = str(r.status_code)
            except httpx.HTTPError as e:
                key = type(e).__name__
            counts[key] = counts.get(key, 0) + 1

        t0, i = time.monotonic(), 0
        while not stop.is_set():
            ex.submit(one, i)
            i += 1
            time.sleep(max(0.0, t0 + i / RATE - time.monotonic()))


def _move(pid: int, cgroup_dir: str) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def test_cpu_quota_on_one_replica_is_named_by_diagnose(tmp_path, monkeypatch):
    save_slow_net(tmp_path / "slow.pt2")
    store, port = str(tmp_path / "fleet"), _free_port()
    args = _parse([
        "--ray", "--replicas", "2", "--model", str(tmp_path / "slow.pt2"), "--device", "cpu",
        "--resize", "32", "--crop", "32", "--max-batch-size", "1", "--bucket-sizes", "1",
        "--telemetry-period-s", "0.1",  # the CPU sampler's slow tick (cgroup, quota) every 1 s
        "--host", "127.0.0.1", "--port", str(port), "--record", store, "--replica-cpus", "0.5",
    ])
    for k, v in ray_serve.PROXY_ENV.items():
        monkeypatch.setenv(k, v)
    root = _v1_cpu_root()
    cg = os.path.join(root, f"aurora_fleet_{os.getpid()}")
    moved: list[int] = []
    stop, counts = threading.Event(), {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        ray_serve.start(args)
        _wait_running(2)
        url = f"http://127.0.0.1:{port}"
        assert httpx.post(url + "/v1/classify", content=sample_bytes("0.3mp"), timeout=30).status_code == 200
        os.mkdir(cg)
        # A 10 ms period (the default is 100 ms): a ~20 ms request then waits out the quota every time,
        # rather than only when it lands late in a period, so the replica's every interval is slower.
        for name, us in (("cpu.cfs_period_us", PERIOD_US), ("cpu.cfs_quota_us", int(QUOTA * PERIOD_US))):
            with open(os.path.join(cg, name), "w") as f:
                f.write(str(us))
        load = threading.Thread(target=_open_loop, args=(url, stop, counts))
        t0 = time.monotonic()
        load.start()
        time.sleep(MOVE_AT_S - 1.0)
        pids, served = _replica_pids(store)  # a replica's segment opens with its first flush
        assert len(pids) == 2 and len(set(pids.values())) == 2, pids
        # Ray's router may favour one replica at this light load: the victim is the one that has a baseline.
        victim = max(served, key=served.get)
        time.sleep(max(0.0, MOVE_AT_S - (time.monotonic() - t0)))
        _move(pids[victim], cg)
        moved.append(pids[victim])
        time.sleep(BACK_AT_S - MOVE_AT_S)
        _move(moved.pop(), root)  # the quota lifted again: the spike is a window, with normal on both sides
        time.sleep(max(0.0, LOAD_S - (time.monotonic() - t0)))
        stop.set()
        load.join(60)
        assert not load.is_alive()
        assert counts.get("200", 0) >= RATE * LOAD_S * 0.5, counts
        serve.shutdown()  # the replicas close their recorders: every segment is flushed
    finally:
        stop.set()
        for pid in moved:
            try:
                _move(pid, root)
            except OSError:  # the process has gone
                pass
        serve.shutdown()
        ray.shutdown()
        if os.path.isdir(cg):
            os.rmdir(cg)

    out = subprocess.run([sys.executable, "-m", "aurora_core.cli", "diagnose", store, "--json"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    by_host = {s["runs"][0]["host"]: s for s in data["series"]}
    assert set(by_host) == set(pids), (by_host.keys(), pids)
    cpu = {h: [w for w in s["windows"] if w["verdict"] == "cpu_contention"] for h, s in by_host.items()}
    assert [h for h, ws in cpu.items() if ws] == [victim], "\n".join(data["summary"])
    (win, *_) = cpu[victim]
    ev = {e["name"]: e for e in win["causes"][0]["evidence"]}
    assert ev["cpu.cgroup_throttled_frac"]["passed"], ev
    (quota,) = [e for n, e in ev.items() if n.startswith("cgroup CPU quota")]
    assert quota["passed"] and quota["window"] == pytest.approx(QUOTA, rel=0.05), quota
    print("\n".join(data["summary"]), counts)
