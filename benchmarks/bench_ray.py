"""Ray Serve's cost against ``aurora serve``, one machine, one run (a script; pytest collects nothing here).

    python benchmarks/bench_ray.py [--duration 15] [--rate-frac 0.4] [--out DIR]

For each of ``aurora serve``, ``aurora serve --ray --replicas 1`` and ``--replicas 2`` (the replicas share
the machine's CPUs: ``--replica-cpus 2/N``), it starts the server as a subprocess on loopback and drives
it with ``aurora bench --url`` (the proxy is benchmarked by the unchanged client):

- single_stream: one request in flight; the latency Ray's proxy hop adds per request;
- closed_loop (32 in flight): throughput;
- server: Poisson arrivals at one fixed rate for all three (``--rate-frac`` of aurora serve's closed-loop
  throughput): p99.

It also samples the CPU time of Ray's processes (the HTTP proxy, the replicas, the rest) over the
closed-loop run, which gives the proxy's CPU cost per request: the figure the N-node estimate uses.
With 2 cores this shows Ray's overhead, not scaling. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


class _Server:
    def __init__(self, extra: list[str], log_path: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "aurora_core.cli", "serve", "--port", str(self.port), "--device", "cpu",
               "--log-level", "warning", *extra]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while not _ready(self.url):
            if self.proc.poll() is not None or time.monotonic() - t0 > 240:
                self.stop()
                raise RuntimeError(f"server {extra} did not become ready; see {log_path}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def _bench(url: str, out: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "aurora_core.cli", "bench", "--url", url + "/v1/classify", "--quiet",
           "--no-report", "--out", out, *args]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["summary"]


def _ray_cpu() -> dict[str, float]:
    """CPU seconds so far of this machine's Ray Serve processes, by role."""
    out = {"proxy": 0.0, "replicas": 0.0, "ray_other": 0.0}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        ct = p.info["cpu_times"]
        if ct is None:
            continue
        cpu = ct.user + ct.system
        if "ProxyActor" in cmd:
            out["proxy"] += cpu
        elif "ServeReplica" in cmd:
            out["replicas"] += cpu
        elif "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd:
            out["ray_other"] += cpu
    return out


def measure(name: str, extra: list[str], work: str, duration: float, rate: float | None, rate_frac: float) -> dict:
    """One server's row; ``rate`` None: the Poisson rate is ``rate_frac`` of its own closed-loop throughput."""
    srv = _Server(extra, os.path.join(work, f"{name}.log"))
    try:
        row = {"name": name, "startup_s": srv.startup_s}
        _bench(srv.url, os.path.join(work, f"{name}-warm"), "--scenario", "closed_loop", "--concurrency", "8",
               "--duration", "3")
        s = _bench(srv.url, os.path.join(work, f"{name}-single"), "--scenario", "single_stream",
                   "--duration", str(duration))
        row["single_p50_ms"] = s["latency_ms"]["p50"]
        me = psutil.Process(srv.proc.pid)
        before = {**_ray_cpu(), "server": sum(me.cpu_times()[:2])}
        s = _bench(srv.url, os.path.join(work, f"{name}-closed"), "--scenario", "closed_loop",
                   "--concurrency", "32", "--duration", str(duration))
        after = {**_ray_cpu(), "server": sum(me.cpu_times()[:2])}
        row["throughput"] = s["throughput"]
        n_ok = s["completed_ok"]
        row["proxy_cpu_ms_per_req"] = 1e3 * (after["proxy"] - before["proxy"]) / max(n_ok, 1)
        # The serving process: aurora serve itself, or Ray's replicas (the aurora serve --ray driver idles).
        key = "replicas" if "--ray" in extra else "server"
        row["replica_cpu_ms_per_req"] = 1e3 * (after[key] - before[key]) / max(n_ok, 1)
        row["ray_other_cpu_ms_per_req"] = 1e3 * (after["ray_other"] - before["ray_other"]) / max(n_ok, 1)
        rate = rate if rate is not None else rate_frac * row["throughput"]
        s = _bench(srv.url, os.path.join(work, f"{name}-poisson"), "--scenario", "server", "--rate", f"{rate:.2f}",
                   "--duration", str(duration), "--slo-ms", "10000")
        row.update(rate=rate, achieved=s["achieved_rate"], p50_ms=s["latency_ms"]["p50"],
                   p99_ms=s["latency_ms"]["p99"], errors=sum(s["errors"].values()))
        return row
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rate-frac", type=float, default=0.4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = a.out or tempfile.mkdtemp(prefix="bench_ray-")
    os.makedirs(work, exist_ok=True)
    print(f"load average before: {os.getloadavg()}; work dir {work}", file=sys.stderr)
    rows = [measure("aurora serve", [], work, a.duration, None, a.rate_frac)]
    for n in (1, 2):
        rows.append(measure(f"ray serve, {n} replica{'s' if n > 1 else ''}",
                            ["--ray", "--replicas", str(n), "--replica-cpus", f"{2 / n:g}"], work, a.duration,
                            rows[0]["rate"], a.rate_frac))
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print("| server | start-up s | single-stream p50 ms | closed-loop 32 req/s | Poisson rate | achieved | "
          "p50 ms | p99 ms | errors | proxy CPU ms/req | server or replicas CPU ms/req | other Ray CPU ms/req |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['startup_s']:.1f} | {r['single_p50_ms']:.2f} | {r['throughput']:.1f} | "
              f"{r['rate']:.1f}/s | {r['achieved']:.1f}/s | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
              f"{r['proxy_cpu_ms_per_req']:.2f} | {r['replica_cpu_ms_per_req']:.2f} | "
              f"{r['ray_other_cpu_ms_per_req']:.2f} |")
    with open(os.path.join(work, "bench_ray.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
