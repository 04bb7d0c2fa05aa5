"""report.html in a real headless Chromium: it loads offline, with no console errors, and its plots decode.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out,
NUL-separated JSON), so console messages, uncaught exceptions and failed loads are read as events
rather than scraped from logs. Install with ``apt-get install -y chromium`` (Debian).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from aurora_core import loadgen as lg
from aurora_core import report
from aurora_core.records import RequestRecord

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


class _Cdp:
    def __init__(self, user_dir: str):
        self.to_r, self.to_w = os.pipe()
        self.from_r, self.from_w = os.pipe()
        # fds 3 and 4 in the child are the DevTools pipe ends
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={user_dir}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=self._dup_fds)
        os.close(self.to_r)
        os.close(self.from_w)
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _dup_fds(self):
        os.dup2(self.to_r, 3)
        os.dup2(self.from_w, 4)

    def send(self, method, params=None, session=None, timeout=30.0):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self._read()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(method)

    def wait_event(self, name, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == name for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(name)
            self.events.append(self._read())

    def _read(self) -> dict:
        while b"\0" not in self.buf:
            chunk = os.read(self.from_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe: "
                                   + self.proc.stderr.read().decode(errors="replace")[-2000:])
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.to_w, self.from_r):
            os.close(fd)


#: After load and two animation frames (uPlot draws on a frame): the text, images, and per plot its
#: group, x range and how many canvas pixels it painted.
_INSPECT = """new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))).then(() => JSON.stringify({
  images: [...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight, i.complete]),
  text: document.body.innerText,
  cards: [...document.querySelectorAll('.card')].map(c => [c.dataset.question, c.className, c.innerText]),
  empty: [...document.querySelectorAll('.empty')].map(e => e.innerText),
  plots: [...document.querySelectorAll('.plot')].map(el => {
    const c = el.querySelector('canvas'); let painted = 0;
    if (c) { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             for (let i = 3; i < d.length; i += 4) if (d[i]) painted++; }
    const u = (window.auroraPlots || []).find(p => p.root.parentNode === el);
    return {id: el.id, painted, group: u ? u.cursor.sync.key : null,
            x: u ? [u.scales.x.min, u.scales.x.max] : null};
  })}))"""


def _drag_js(plot_id: str) -> str:
    return f"JSON.stringify(document.querySelector('#{plot_id} .u-over').getBoundingClientRect())"


def load_in_chromium(path, tmp_path, drag: str | None = None) -> dict:
    """Open ``path`` in headless Chromium. Returns {"errors": [...], "images": [[alt, w, h, complete], ...],
    "text": str, "cards": [[question, class, text]], "empty": [...], "plots": [{id, painted, group, x}]}.
    ``drag``: a plot id to zoom with a real mouse drag over its middle third; the plots are then read
    again into "after_drag"."""
    cdp = _Cdp(str(tmp_path / "chromium-profile"))
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.send(f"{domain}.enable", session=session)
        cdp.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 900, "deviceScaleFactor": 1,
                                                        "mobile": False}, session=session)
        cdp.send("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session=session)
        cdp.wait_event("Page.loadEventFired")

        def inspect() -> dict:
            res = cdp.send("Runtime.evaluate", {"expression": _INSPECT, "awaitPromise": True, "returnByValue": True},
                           session=session)
            return json.loads(res["result"]["value"])

        page = inspect()
        if drag:
            cdp.send("Runtime.evaluate", {"expression": f"document.getElementById('{drag}').scrollIntoView()"},
                     session=session)
            box = json.loads(cdp.send("Runtime.evaluate", {"expression": _drag_js(drag), "returnByValue": True},
                                      session=session)["result"]["value"])
            y = box["top"] + box["height"] / 2
            x0, x1 = box["left"] + box["width"] / 3, box["left"] + 2 * box["width"] / 3
            for kind, x in (("mouseMoved", x0), ("mousePressed", x0), ("mouseMoved", (x0 + x1) / 2),
                            ("mouseMoved", x1), ("mouseReleased", x1)):
                cdp.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                      "buttons": 0 if kind == "mouseReleased" else 1,
                                                      "clickCount": 1}, session=session)
            page["after_drag"] = inspect()["plots"]
        errors = []
        for e in cdp.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(("console", p))
            elif m == "Runtime.exceptionThrown":
                errors.append(("exception", p))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(("log", p["entry"]))
            elif m == "Network.loadingFailed":
                errors.append(("network", p))
            elif m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:")):
                errors.append(("not offline", p["request"]["url"]))
        page["errors"] = errors
        return page
    finally:
        cdp.close()


def assert_plots_drawn(page: dict, at_least: int = 1) -> None:
    """Every plot element holds a uPlot whose canvas painted pixels (axes alone paint some: lines
    paint far more, so a plot counts as drawn at 2,000 pixels)."""
    assert len(page["plots"]) >= at_least, page["plots"]
    for p in page["plots"]:
        assert p["group"] is not None, p
        assert p["painted"] > 2000, p


def _result(with_errors=True) -> lg.RunResult:
    n = 400
    t0 = 10**12
    rng = np.random.default_rng(0)
    sched = t0 + np.sort(rng.integers(0, 8 * 10**9, n))
    done = sched + rng.integers(2 * 10**6, 40 * 10**6, n)
    status = ["ok"] * n
    if with_errors:
        status[5] = "overloaded"
    recs = []
    for i in range(n):
        r = RequestRecord(request_id=i, arrival_ns=int(sched[i]), enqueue_ns=int(sched[i]),
                          batch_closed_ns=int(sched[i]) + 10**6, compute_start_ns=int(sched[i]) + 10**6,
                          compute_end_ns=int(done[i]), d2h_end_ns=int(done[i]), completion_ns=int(done[i]),
                          queue_depth=i % 7, batch_size=4)
        recs.append(r)
    return lg.RunResult(lg.Scenario.server(50, 8), t0, int(done.max()), sched, sched, done, status, recs)


def _samples(t0, gpu: bool) -> dict:
    ts = t0 + np.arange(0, 8 * 10**9, 10**8)
    out = {("cpu", "cpu_util_pct"): (ts, np.full(ts.size, 70.0)), ("cpu", "steal_pct"): (ts, np.zeros(ts.size))}
    if gpu:
        out[("gpu0", "sm_clock_mhz")] = (ts, np.where(ts > t0 + 4 * 10**9, 1500.0, 1980.0))
        out[("gpu0", "sm_clock_max_mhz")] = (ts, np.full(ts.size, 1980.0))
        out[("gpu0", "temp_c")] = (ts, np.linspace(60, 86, ts.size))
        out[("gpu0", "temp_slowdown_c")] = (ts, np.full(ts.size, 87.0))
        out[("gpu0", "throttle_frac_thermal")] = (ts, (ts > t0 + 4 * 10**9).astype(float))
    return out


def _write(tmp_path, gpu: bool):
    res = _result()
    s = lg.summarize(res)
    ok, reasons = lg.verdict(s, lg.Rules(slo_ms=100, min_duration_s=1, min_queries=10))
    path = tmp_path / f"report_{'gpu' if gpu else 'cpu'}.html"
    report.render(path, result=res, summary=s, valid=ok, reasons=reasons, bottleneck="compute-bound: test <b>",
                  telemetry=[("GPU SM clock", "n/a (no GPU)")], meta={"model": "m", "config": {"a": 1}},
                  samples=_samples(res.t0_ns, gpu), slo_ms=100)
    return path, ok


def test_report_is_self_contained(tmp_path):
    path, _ = _write(tmp_path, gpu=False)
    text = path.read_text()
    assert "<img" not in text and "src=" not in text and "href=" not in text  # nothing to fetch
    assert "http://" not in text and "https://" not in text
    assert "compute-bound: test &lt;b&gt;" in text  # caller text is escaped


@needs_chromium
@pytest.mark.parametrize("gpu", [False, True])
def test_report_loads_in_chromium(tmp_path, gpu):
    path, ok = _write(tmp_path, gpu)
    page = load_in_chromium(path, tmp_path, drag="plot0")
    assert page["errors"] == []
    assert_plots_drawn(page, at_least=5 if gpu else 4)
    assert ("VALID" if ok else "INVALID") in page["text"]
    assert "Per-stage breakdown" in page["text"] and "Latency CDF" in page["text"]
    # no empty panels: on a CPU run each GPU panel is one line saying why
    no_gpu = [e for e in page["empty"] if "no GPU telemetry" in e]
    assert len(no_gpu) == (0 if gpu else 3), page["empty"]
    # a drag on the latency plot zooms every timeline plot to the same range, and not the CDF
    before = {p["id"]: p for p in page["plots"]}
    after = {p["id"]: p for p in page["after_drag"]}
    run = [i for i, p in before.items() if p["group"] == "run"]
    lo, hi = after["plot0"]["x"]
    full = before["plot0"]["x"]
    assert full[0] < lo < hi < full[1] and hi - lo < 0.6 * (full[1] - full[0])
    for i in run:
        assert after[i]["x"] == pytest.approx([lo, hi]), (i, after[i])
    cdf = [i for i, p in before.items() if p["group"] == "cdf"]
    assert cdf and all(after[i]["x"] == before[i]["x"] for i in cdf)


@needs_chromium
def test_browser_check_catches_a_broken_page(tmp_path):
    """The check itself can fail: a console error, an undecodable image and a plot that drew nothing are
    all reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><img alt='x' src='data:image/png;base64,AAAA'><div class='plot' id='p'></div>"
                   "<script>console.error('boom')</script></body></html>")
    page = load_in_chromium(bad, tmp_path)
    assert any(kind == "console" for kind, _ in page["errors"])
    assert page["images"][0][1] == 0  # naturalWidth of a broken image
    with pytest.raises(AssertionError):
        assert_plots_drawn(page)
