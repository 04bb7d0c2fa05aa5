"""``report.html`` of ``aurora bench``: one self-contained page that opens offline.

Built from ``aurora_core.page`` components (the same as diagnose's and compare's pages): interactive
plots with the plotting library inlined and no external resource, so the page renders the same from a
CI artifact, an e-mail attachment or a laptop without network.

Contents: the verdict and bottleneck line, a timeline (latency, offered/achieved rate, throttled
fraction, SM clock, temperature, queue depth, CPU utilization and steal) on one shared, zoom-linked
time axis, per-second aggregates only, each panel without data replaced by one line saying why; the
per-stage breakdown, the latency by percentile, the telemetry summary, the run's diagnosis, and the
config and hardware metadata.
"""

from __future__ import annotations

import math

import numpy as np

from aurora_core.loadgen import RunResult
from aurora_core.page import Page, Plot, binned, esc

THROTTLE_REASONS = ("power", "thermal", "sync_boost", "board_limit", "low_util", "reliability",
                    "hw_slowdown", "hw_thermal", "power_brake")
# low_util and sync_boost lower clocks without limiting work; they are not "throttled" for the verdict.
LIMITING_REASONS = ("power", "thermal", "board_limit", "reliability", "hw_slowdown", "hw_thermal", "power_brake")

# When a run's machine counts as contended or throttled: aurora bench's bottleneck verdict, and each side of
# aurora compare's environment check. Other processes count only with the CPU saturated.
CPU_BUSY_PCT = 90.0          # cpu_util_pct over the run
OTHERS_PCT = 25.0            # other processes' share of all cores, %
STEAL_PCT = 5.0              # steal_pct mean
CGROUP_THROTTLED_FRAC = 0.05  # fraction of cgroup periods throttled
THROTTLED_FRAC = 0.05        # fraction of the time a limiting reason held the clocks down


def _series(samples: dict, source_prefix: str, metric: str, t0_ns: int):
    """(seconds since t0, values) of the first source starting with the prefix that has the metric."""
    for (src, m), (ts, vals) in sorted(samples.items()):
        if m == metric and src.startswith(source_prefix) and len(ts):
            return (np.asarray(ts) - t0_ns) / 1e9, np.asarray(vals, dtype=np.float64)
    return None


def _quantile(v: np.ndarray, q: float) -> float:
    return float(np.percentile(v, q)) if v.size else math.nan


def timeline_plots(result: RunResult, samples: dict, slo_ms: float | None = None) -> list[Plot]:
    """Per-second panels on one axis, seconds from the start of the run. A panel without data says why."""
    t0 = result.t0_ns
    ok = np.array([s == "ok" for s in result.status], bool)
    t_sched = (result.scheduled_ns - t0) / 1e9
    lat_ms = result.latency_ns / 1e6
    end_s = max(float((result.end_ns - t0) / 1e9), 1e-3)
    edges = np.arange(0.0, math.ceil(end_s) + 1.0, 1.0)
    x = edges[:-1] + 0.5
    kw = {"time": False}
    lat = {"p50": binned(t_sched[ok], lat_ms[ok], edges, lambda v: _quantile(v, 50)),
           "p99": binned(t_sched[ok], lat_ms[ok], edges, lambda v: _quantile(v, 99))}
    if slo_ms:
        lat[f"SLO {slo_ms:g} ms"] = np.full(x.size, float(slo_ms))
    errors = np.histogram(t_sched[~ok], bins=edges)[0].astype(float)
    plots = [Plot("Latency per 1 s, from the scheduled send", x, lat, unit="ms", log=True, height=200,
                  colors={f"SLO {slo_ms:g} ms": "#b00020"} if slo_ms else {}, **kw),
             Plot("Offered and achieved rate", x, {
                 "offered /s": np.histogram(t_sched, bins=edges)[0].astype(float),
                 "achieved /s": np.histogram((result.done_ns[ok] - t0) / 1e9, bins=edges)[0].astype(float),
                 **({"errors /s": errors} if errors.any() else {})}, unit="req/s", **kw)]

    def tele(title, unit, lines, why):
        got = {}
        for name, prefix, metric in lines:
            s = _series(samples, prefix, metric, t0)
            if s is not None:
                got[name] = binned(s[0], s[1], edges)
        return Plot(title, x, got, unit=unit, empty="" if got else why, **kw)

    no_gpu = "no GPU telemetry in this run (no NVML device: a CPU run, or NVML unavailable)"
    throttles = [(r, "gpu", f"throttle_frac_{r}") for r in THROTTLE_REASONS
                 if (s := _series(samples, "gpu", f"throttle_frac_{r}", t0)) is not None and np.nanmax(s[1]) > 0]
    if throttles:
        plots.append(tele("GPU throttled fraction by reason", "fraction", throttles, no_gpu))
    elif _series(samples, "gpu", "sm_clock_mhz", t0) is not None:
        plots.append(Plot("GPU throttled fraction by reason", empty="no throttling seen: every reason's fraction "
                          "was 0 for the whole run"))
    else:
        plots.append(Plot("GPU throttled fraction by reason", empty=no_gpu))
    plots.append(tele("GPU SM clock", "MHz", [("SM clock", "gpu", "sm_clock_mhz"),
                                              ("max", "gpu", "sm_clock_max_mhz")], no_gpu))
    plots.append(tele("GPU temperature", "°C", [("GPU temp", "gpu", "temp_c"),
                                               ("slowdown", "gpu", "temp_slowdown_c")], no_gpu))
    recs = [(r.arrival_ns, r.queue_depth) for r in result.records if r is not None and hasattr(r, "queue_depth")
            and getattr(r, "arrival_ns", 0)]
    if recs:
        a = np.array(recs, np.float64)
        plots.append(Plot("Queue depth at arrival (mean per 1 s)", x,
                          {"queue depth": binned((a[:, 0] - t0) / 1e9, a[:, 1], edges)}, unit="requests", **kw))
    else:
        plots.append(Plot("Queue depth at arrival", empty="the target reports no per-request record "
                          "(an --url server): queue depth is not known"))
    plots.append(tele("CPU", "%", [("CPU util %", "cpu", "cpu_util_pct"), ("steal %", "cpu", "steal_pct")],
                      "no CPU sampler in this run"))
    return plots


def cdf_plot(result: RunResult) -> Plot:
    """Latency by percentile (the CDF's inverse: one x for both lines), from the scheduled and the
    actual send; 400 quantiles, denser in the tail."""
    ok = np.array([s == "ok" for s in result.status], bool)
    q = np.unique(np.concatenate([np.linspace(0, 99, 199), 100 - np.logspace(0, -3, 200)]))
    lines = {}
    for lat, label in ((result.latency_ns[ok], "from scheduled send (reported)"),
                       (result.latency_from_send_ns[ok], "from actual send")):
        if lat.size:
            lines[label] = np.percentile(lat / 1e6, q)
    return Plot("Latency by percentile (x: percentile of requests; drag to zoom into the tail)", q, lines,
                unit="ms", log=True, time=False, height=220, empty="" if lines else "no successful request")


def stages_table(summary: dict) -> list:
    return [[st] + [v[k] for k in ("p50", "p90", "p95", "p99", "p99.9", "max", "mean")]
            for st, v in summary["stages_ms"].items()]


def render(path, *, result: RunResult, summary: dict, valid: bool, reasons: list[str], bottleneck: str,
           telemetry: list[tuple[str, str]], meta: dict, samples: dict | None = None, slo_ms: float | None = None,
           peak: dict | None = None, extra=None) -> str:
    """Write the report to ``path``; returns the path. ``telemetry`` is [(metric, text)]; ``samples`` is
    {(source, metric): (ts_ns, values)} as in ``RunData.samples``; ``extra`` is a list of callables
    that each append to the ``Page`` (e.g. the run's diagnosis)."""
    lat = summary["latency_ms"]
    page = Page(f"aurora bench: {meta.get('label') or meta.get('run_id') or 'run'}", summary["scenario_desc"])
    page.raw(f"<p class='verdict'><span class='{'valid' if valid else 'invalid'}'>{'VALID' if valid else 'INVALID'}"
             f"</span> &mdash; {esc(summary['scenario_desc'])}<br>Bottleneck: {esc(bottleneck)}</p>"
             "<ul>" + "".join(f"<li>{esc(r)}</li>" for r in reasons) + "</ul>")
    page.h("Results").table([
        ("throughput (ok/s)", summary["throughput"]),
        ("issued rate (/s)", summary["issued_rate"]),
        ("achieved rate (/s)", summary["achieved_rate"]),
        ("queries", summary["queries"]),
        ("errors", summary["errors"] or "none"),
        ("duration (s)", summary["duration_s"]),
        ("mean batch size", summary["batch_size_mean"] if summary["batch_size_mean"] is not None else "n/a"),
        ("send drift p99 / max (ms)", f"{_fmt(summary['send_drift_ms']['p99'])} / "
                                      f"{_fmt(summary['send_drift_ms']['max'])}"),
    ])
    if peak:
        page.h("Peak search").p(f"Highest Poisson rate with p99 <= {slo_ms} ms: {peak['peak_rate']:.1f}/s")
        page.table([(t["rate"], "pass" if t["passed"] else "fail", t["p99_ms"], t["error_frac"])
                    for t in peak["trials"]], header=["rate (/s)", "result", "p99 (ms)", "error fraction"])
    page.h("Timeline").plots(timeline_plots(result, samples or {}, slo_ms), group="run")
    page.h("Per-stage breakdown")
    page.table([["latency (ms)"] + [lat[k] for k in ("p50", "p90", "p95", "p99", "p99.9", "max", "mean")]]
               + stages_table(summary), header=["", "p50", "p90", "p95", "p99", "p99.9", "max", "mean"])
    page.h("Latency CDF").plots([cdf_plot(result)], group="cdf")
    page.h("Telemetry summary").table(telemetry, header=["metric", "value"])
    for add in extra or []:
        add(page)
    page.h("Config and hardware").table(sorted(meta.items()), header=["key", "value"])
    return page.write(path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)
