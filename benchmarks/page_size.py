"""Size and render time of the diagnose page for a fleet: N hosts in 3 regions, R requests in all.

Three host runs are simulated through the real Recorder (one with a spike), then replicated to N hosts
with other host names and regions; ``diagnose`` runs on them, the page is written, and headless
Chromium opens it: the time from navigation start until every plot has drawn (two animation frames
after the load event) is the render time, median of 3 opens.

Run: python benchmarks/page_size.py [--hosts 48] [--requests 1000000]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from test_incidents import simulate_run  # noqa: E402
from test_report_browser import CHROMIUM, _Cdp  # noqa: E402

from aurora_core.diagnose import diagnose  # noqa: E402
from aurora_core.diagnose.html import diagnose_page  # noqa: E402
from aurora_core.loadgen import poisson_schedule  # noqa: E402
from aurora_core.recorder import load_run  # noqa: E402

_DRAWN = ("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))).then(() => "
          "JSON.stringify({ms: performance.now(), plots: (window.auroraPlots || []).length}))")


def render_ms(path: str, tmp: str) -> tuple[float, int]:
    import json

    cdp = _Cdp(os.path.join(tmp, "profile"))
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        cdp.send("Page.enable", session=s)
        cdp.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 900, "deviceScaleFactor": 1,
                                                        "mobile": False}, session=s)
        cdp.send("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session=s)
        cdp.wait_event("Page.loadEventFired", timeout=120)
        r = json.loads(cdp.send("Runtime.evaluate", {"expression": _DRAWN, "awaitPromise": True,
                                                     "returnByValue": True}, session=s)["result"]["value"])
        return r["ms"], r["plots"]
    finally:
        cdp.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=48)
    ap.add_argument("--requests", type=int, default=1_000_000)
    args = ap.parse_args()
    per_host = args.requests // args.hosts
    rate = 40.0
    dur = per_host / rate
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        base = []
        for k, slow in enumerate((False, False, True)):
            arr = poisson_schedule(rate, dur, seed=k) / 1e9
            item = (lambda x: 12.0 if dur / 2 <= x < dur * 0.6 else 6.0) if slow else (lambda x: 6.0)
            base.append(load_run(simulate_run(os.path.join(tmp, f"r{k}"), arr, meta={"label": "v1"}, item_ms=item,
                                              seed=k)))
        runs = []
        for h in range(args.hosts):
            r = copy.copy(base[2] if h == 0 else base[h % 2])
            r.meta = {**r.meta, "host": f"host{h:02d}", "region": ("us-east", "eu-west", "ap-south")[h % 3]}
            runs.append(r)
        n = sum(r.n_requests for r in runs)
        print(f"built {len(runs)} hosts, {n:,} requests in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        res = diagnose(runs)
        t_diag = time.perf_counter() - t
        t = time.perf_counter()
        path = diagnose_page(res).write(os.path.join(tmp, "page.html"))
        t_page = time.perf_counter() - t
        size = os.path.getsize(path)
        opens = [render_ms(path, tmp) for _ in range(3)] if CHROMIUM else []
        ms = statistics.median(o[0] for o in opens) if opens else float("nan")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"load {os.getloadavg()[0]:.2f}")
        print(f"hosts {args.hosts}, requests {n:,}: diagnose {t_diag:.1f} s, page built in {t_page:.2f} s, "
              f"{size / 1e6:.2f} MB, {opens[0][1] if opens else '?'} plots, rendered in Chromium in {ms:.0f} ms "
              f"(median of {len(opens)}; each: {', '.join(f'{o[0]:.0f}' for o in opens)} ms)")


if __name__ == "__main__":
    main()
