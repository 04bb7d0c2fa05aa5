"""aurora serve against the servers a user would pick instead, on the shipped photo mix (issue 20).

Each server runs alone, in its own process group on 127.0.0.1, with the same model (torchvision
mobilenet_v3_small, random weights, seed 0, fp32, CPU) and the six shipped images. One client drives it
(aurora_core.loadgen: open-loop Poisson arrivals, latency from the scheduled send time):

* saturated throughput: a closed loop with ``--concurrency`` requests in flight for ``--trial-s``;
* the highest Poisson rate with p99 <= ``--slo-ms`` (and < 1% errors), by bisection below 1.1x the
  saturated throughput (loadgen.find_peak).

Servers (``--servers``, comma-separated):

* aurora        ``aurora serve`` with its defaults (fast decode, fast_gap 4, dynamic batching);
* aurora_exact  ``aurora serve --exact`` (full-size decode, within one uint8 level of torchvision);
* naive         FastAPI + uvicorn (``--workers`` processes, one torch thread each), PIL decode and
                torchvision's Resize/CenterCrop/ToTensor/Normalize, batch 1;
* naive_draft   the same plus one line, PIL ``Image.draft("RGB", (256, 256))`` (smallest DCT scale that
                covers 256 px);
* litserve, ray optional peers: reported as skipped unless the packages are installed (they are not
                project dependencies).

The client shares the machine with the server: on a small machine its CPU cost is part of every figure
alike, so compare servers by the ratio within one run. Not a pytest module (benchmarks/conftest.py leaves it
out of collection): it takes minutes. Run:

    python benchmarks/bench_peers.py [--servers aurora,aurora_exact,naive,naive_draft] [--trial-s 10]
                                     [--out benchmarks/results/peers.json]
"""

# No `from __future__ import annotations`: FastAPI must see naive_app's Request annotation as a class.
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

SAMPLES = ["0.3mp", "rocket_0.3mp", "retina_1.6mp", "2.5mp", "10mp", "coffee_png"]
MODEL = "mobilenet_v3_small"
PEERS = ("aurora", "aurora_exact", "naive", "naive_draft", "litserve", "ray")


# ---------------------------------------------------------------------------------------------------
# The naive peers (run in their own processes through --serve)


def naive_app():
    """FastAPI app of the naive server; env BENCH_PEERS_DRAFT=1 adds PIL draft(). One torch thread per
    worker process, as a user would run one worker per core."""
    import io

    import torch
    import torchvision
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from PIL import Image
    from torchvision import transforms as T

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.get_model(MODEL, weights=None).eval()
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    draft = os.environ.get("BENCH_PEERS_DRAFT") == "1"
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.post("/v1/classify")
    async def classify(request: Request):
        data = await request.body()
        im = Image.open(io.BytesIO(data))
        if draft:
            im.draft("RGB", (256, 256))
        x = tf(im.convert("RGB")).unsqueeze(0)
        with torch.inference_mode():
            p = model(x).softmax(1)[0]
        top = torch.topk(p, 5)
        return JSONResponse({"top_k": [[int(i), float(v)] for v, i in zip(top.values, top.indices, strict=True)]})

    return app


def serve_naive(port: int, workers: int) -> None:
    import uvicorn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    uvicorn.run("bench_peers:naive_app", factory=True, host="127.0.0.1", port=port, workers=workers,
                log_level="warning")


# ---------------------------------------------------------------------------------------------------
# Server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, port: int, args) -> tuple[list[str], dict] | None:
    env = dict(os.environ)
    if name in ("aurora", "aurora_exact"):
        cmd = [sys.executable, "-m", "aurora_core.cli", "serve", "--model", MODEL, "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        return (cmd + (["--exact"] if name == "aurora_exact" else [])), env
    if name in ("naive", "naive_draft"):
        env["BENCH_PEERS_DRAFT"] = "1" if name == "naive_draft" else "0"
        return [sys.executable, os.path.abspath(__file__), "--serve", "naive", "--port", str(port),
                "--workers", str(args.workers)], env
    return None


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        for path in ("/readyz", "/healthz"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s:g} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this script started (uvicorn's workers included), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------------
# Measurement


def measure_server(name: str, payloads: list[bytes], args) -> dict:
    from aurora_core import loadgen as lg

    port = free_port()
    cmd, env = server_command(name, port, args)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        wait_ready(port, proc, args.start_timeout_s)
        url = f"http://127.0.0.1:{port}/v1/classify"
        target = lg.HttpTarget(url, connections=args.connections)
        try:
            lg.run_scenario(target, payloads, lg.Scenario.offline(4 * len(payloads)))  # warm-up
            sat = lg.summarize(lg.run_scenario(target, payloads, lg.Scenario.closed_loop(args.concurrency,
                                                                                        args.trial_s)))
            print(f"  {name}: saturated {sat['throughput']:.1f}/s (p99 {sat['latency_ms']['p99']:.0f} ms, "
                  f"errors {sat['errors']})", flush=True)
            if sat["error_frac"] > 0.01 or not sat["throughput"]:
                raise RuntimeError(f"{name}: {sat['error_frac']:.0%} of requests failed ({sat['errors']})")

            def trial(rate: float) -> dict:
                s = lg.summarize(lg.run_scenario(target, payloads, lg.Scenario.server(rate, args.trial_s, seed=1)))
                print(f"    {rate:7.1f}/s: p99 {s['latency_ms']['p99']:8.1f} ms, errors {s['error_frac']:.3f}",
                      flush=True)
                return s

            peak = lg.find_peak(trial, args.slo_ms, 0.0, 1.1 * sat["throughput"], rel_tol=args.rel_tol,
                                max_trials=args.max_trials)
        finally:
            target.close()
        return {"server": name, "saturated": sat["throughput"], "saturated_p99_ms": sat["latency_ms"]["p99"],
                "peak_rate": peak.peak_rate,
                "trials": [(r, ok, s["latency_ms"]["p99"]) for r, ok, s in peak.trials]}
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default="aurora,aurora_exact,naive,naive_draft,litserve,ray")
    ap.add_argument("--trial-s", type=float, default=10.0, help="seconds per load trial")
    ap.add_argument("--slo-ms", type=float, default=250.0)
    ap.add_argument("--concurrency", type=int, default=16, help="in flight for the saturated throughput")
    ap.add_argument("--connections", type=int, default=32, help="client keep-alive connections")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="uvicorn workers of the naive peers")
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--rel-tol", type=float, default=0.06)
    ap.add_argument("--start-timeout-s", type=float, default=180.0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--serve", choices=["naive"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_naive(args.port, args.workers)
        return

    from aurora_core.samples import sample_bytes

    payloads = [sample_bytes(n) for n in SAMPLES]
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        ap.error(f"unknown servers {unknown}; choose from {', '.join(PEERS)}")
    print(f"bench_peers: {os.cpu_count()} CPUs, load average before {os.getloadavg()}", flush=True)
    results, skipped = [], {}
    for name in names:
        if server_command(name, 0, args) is None:
            skipped[name] = "not installed (optional peer; not a project dependency)" \
                if not _importable(name) else "installed, but this script has no launcher for it (optional)"
            print(f"  {name}: skipped, {skipped[name]}", flush=True)
            continue
        results.append(measure_server(name, payloads, args))
    load = os.getloadavg()
    base = {r["server"]: r for r in results}
    def ratio(ref: str, r: dict, key: str) -> str:
        return f"{base[ref][key] / r[key]:.2f}x" if ref in base and r[key] else "-"

    print(f"\n| server | highest rate at p99 <= {args.slo_ms:g} ms | saturated throughput | aurora / it "
          "(rate, saturated) | aurora --exact / it (rate, saturated) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['server']} | {r['peak_rate']:.1f}/s | {r['saturated']:.1f}/s | {ratio('aurora', r, 'peak_rate')}, "
              f"{ratio('aurora', r, 'saturated')} | {ratio('aurora_exact', r, 'peak_rate')}, "
              f"{ratio('aurora_exact', r, 'saturated')} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | | |")
    print(f"load average after {load}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "skipped": skipped, "loadavg_after": load, "args": vars(args)}, f, indent=1)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec({"litserve": "litserve", "ray": "ray"}.get(name, name)) is not None


if __name__ == "__main__":
    main()
