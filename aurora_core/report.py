"""``report.html`` of ``aurora bench``: one self-contained page that opens offline.

Plots are matplotlib PNGs embedded as base64 data URIs; there is no script and no external resource,
so the page renders the same from a CI artifact, an e-mail attachment or a laptop without network.

Contents: the verdict and bottleneck line, a timeline (latency, offered/achieved rate, throttled
fraction, SM clock, temperature, queue depth, CPU utilization and steal) on one shared time axis, the
per-stage breakdown, the latency CDF, the telemetry summary and the config and hardware metadata.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

import numpy as np

from aurora_core.loadgen import RunResult

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


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _series(samples: dict, source_prefix: str, metric: str, t0_ns: int):
    """(seconds since t0, values) of the first source starting with the prefix that has the metric."""
    for (src, m), (ts, vals) in sorted(samples.items()):
        if m == metric and src.startswith(source_prefix) and len(ts):
            return (np.asarray(ts) - t0_ns) / 1e9, np.asarray(vals, dtype=np.float64)
    return None


def _na(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.45")
    ax.set_yticks([])


def timeline_png(result: RunResult, samples: dict, slo_ms: float | None = None) -> str:
    """Shared time axis, seconds from the start of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = result.t0_ns
    ok = np.array([s == "ok" for s in result.status], bool)
    t_sched = (result.scheduled_ns - t0) / 1e9
    lat_ms = result.latency_ns / 1e6
    end_s = max(float((result.end_ns - t0) / 1e9), 1e-3)

    fig, axes = plt.subplots(7, 1, figsize=(11, 14), sharex=True,
                             gridspec_kw={"height_ratios": [2.2, 1, 1, 1, 1, 1, 1]})
    ax = axes[0]
    ax.scatter(t_sched[ok], lat_ms[ok], s=3, alpha=0.35, color="tab:blue", label="request (from scheduled send)")
    if (~ok).any():
        ax.scatter(t_sched[~ok], lat_ms[~ok], s=8, marker="x", color="tab:red", label="error")
    bins = np.arange(0.0, end_s + 1.0, 1.0)
    idx = np.digitize(t_sched, bins) - 1
    p99 = [np.percentile(lat_ms[ok & (idx == i)], 99) if (ok & (idx == i)).sum() else np.nan
           for i in range(len(bins) - 1)]
    ax.stairs(p99, bins, color="black", lw=1.2, label="p99 per 1 s")
    if slo_ms:
        ax.axhline(slo_ms, color="tab:red", ls="--", lw=1, label=f"SLO {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    ax.set_title("Latency, load and hardware over time")

    ax = axes[1]
    offered = np.histogram(t_sched, bins=bins)[0]
    achieved = np.histogram(((result.done_ns[ok] - t0) / 1e9), bins=bins)[0]
    ax.stairs(offered, bins, label="offered /s")
    ax.stairs(achieved, bins, label="achieved /s")
    ax.set_ylabel("rate (1/s)")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[2]
    drawn = False
    for reason in THROTTLE_REASONS:
        s = _series(samples, "gpu", f"throttle_frac_{reason}", t0)
        if s is not None and np.nanmax(s[1]) > 0:
            ax.plot(*s, lw=1, label=reason)
            drawn = True
    if drawn:
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="upper left", fontsize=7, ncol=5)
    elif _series(samples, "gpu", "sm_clock_mhz", t0) is not None:
        ax.set_ylim(-0.02, 1.02)
        ax.plot([0, end_s], [0, 0], lw=1, color="tab:green", label="no throttling seen")
        ax.legend(loc="upper left", fontsize=7)
    else:
        _na(ax, "throttled fraction: n/a (no GPU)")
    ax.set_ylabel("throttled\nfraction")

    ax = axes[3]
    s = _series(samples, "gpu", "sm_clock_mhz", t0)
    if s is not None:
        ax.plot(*s, lw=1, label="SM clock")
        mx = _series(samples, "gpu", "sm_clock_max_mhz", t0)
        if mx is not None:
            ax.axhline(float(np.nanmax(mx[1])), color="0.4", ls="--", lw=1, label="max")
        ax.legend(loc="lower left", fontsize=7)
    else:
        _na(ax, "SM clock: n/a (no GPU)")
    ax.set_ylabel("SM clock\n(MHz)")

    ax = axes[4]
    s = _series(samples, "gpu", "temp_c", t0)
    if s is not None:
        ax.plot(*s, lw=1, color="tab:orange", label="GPU temp")
        sd = _series(samples, "gpu", "temp_slowdown_c", t0)
        if sd is not None:
            ax.axhline(float(np.nanmin(sd[1])), color="tab:red", ls="--", lw=1, label="slowdown")
        ax.legend(loc="lower left", fontsize=7)
    else:
        _na(ax, "temperature: n/a (no GPU)")
    ax.set_ylabel("temp (°C)")

    ax = axes[5]
    recs = [(r.arrival_ns, r.queue_depth) for r in result.records if r is not None and hasattr(r, "queue_depth")
            and getattr(r, "arrival_ns", 0)]
    if recs:
        a = np.array(recs, np.float64)
        ax.plot((a[:, 0] - t0) / 1e9, a[:, 1], ".", ms=2, color="tab:purple", label="at arrival")
        ax.legend(loc="upper left", fontsize=7)
    else:
        _na(ax, "queue depth: n/a (target reports no per-request record)")
    ax.set_ylabel("queue\ndepth")

    ax = axes[6]
    s = _series(samples, "cpu", "cpu_util_pct", t0)
    if s is not None:
        ax.plot(*s, lw=1, label="CPU util %")
        st = _series(samples, "cpu", "steal_pct", t0)
        if st is not None:
            ax.plot(*st, lw=1, color="tab:red", label="steal %")
        ax.set_ylim(-2, 102)
        ax.legend(loc="lower left", fontsize=7)
    else:
        _na(ax, "CPU utilization: n/a (no sampler)")
    ax.set_ylabel("CPU (%)")
    ax.set_xlabel("seconds since start of run")
    ax.set_xlim(0, end_s)
    fig.align_ylabels(axes)
    out = _png(fig)
    plt.close(fig)
    return out


def stages_png(summary: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(k, v) for k, v in summary["stages_ms"].items() if k != "total"]
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * max(len(stages), 1)))
    if stages:
        y = np.arange(len(stages))
        ax.barh(y - 0.2, [v["p50"] for _, v in stages], 0.4, label="p50")
        ax.barh(y + 0.2, [v["p99"] for _, v in stages], 0.4, label="p99")
        ax.set_yticks(y, [k for k, _ in stages])
        ax.invert_yaxis()
        ax.set_xlabel("ms per request")
        ax.legend(fontsize=8)
    else:
        _na(ax, "per-stage timings: n/a (target reports none)")
    ax.set_title("Per-stage latency")
    out = _png(fig)
    plt.close(fig)
    return out


def cdf_png(result: RunResult, slo_ms: float | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = np.array([s == "ok" for s in result.status], bool)
    fig, ax = plt.subplots(figsize=(9, 4))
    for lat, label in ((result.latency_ns[ok], "from scheduled send (reported)"),
                       (result.latency_from_send_ns[ok], "from actual send")):
        v = np.sort(lat / 1e6)
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", lw=1.2, label=label)
    if slo_ms:
        ax.axvline(slo_ms, color="tab:red", ls="--", lw=1, label=f"SLO {slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Latency CDF")
    out = _png(fig)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return str(v)


def _table(rows, header=None) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header) if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{'<tr>' + h + '</tr>' if h else ''}{body}</table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child{text-align:left}
.valid{color:#0a7a2f;font-weight:bold}.invalid{color:#b00020;font-weight:bold}
.verdict{font-size:15px;padding:8px 12px;background:#f7f7f7;border-left:4px solid #888}
img{max-width:100%;display:block;margin:8px 0}pre{background:#f7f7f7;padding:8px;font-size:12px;overflow-x:auto}
"""


def render(path, *, result: RunResult, summary: dict, valid: bool, reasons: list[str], bottleneck: str,
           telemetry: list[tuple[str, str]], meta: dict, samples: dict | None = None, slo_ms: float | None = None,
           peak: dict | None = None, extra_sections: list[tuple[str, str]] | None = None) -> str:
    """Write the report to ``path``; returns the path. ``telemetry`` is [(metric, text)]; ``samples`` is
    {(source, metric): (ts_ns, values)} as in ``RunData.samples``; ``extra_sections`` is
    [(title, trusted html)], e.g. a diagnosis."""
    e = html.escape
    lat = summary["latency_ms"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>aurora bench: {e(str(meta.get('label') or meta.get('run_id') or 'run'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>aurora bench report</h1>",
        f"<p class='verdict'><span class='{'valid' if valid else 'invalid'}'>{'VALID' if valid else 'INVALID'}</span>"
        f" &mdash; {e(summary['scenario_desc'])}<br>Bottleneck: {e(bottleneck)}</p>",
        "<ul>" + "".join(f"<li>{e(r)}</li>" for r in reasons) + "</ul>",
        "<h2>Results</h2>",
        _table([
            ("throughput (ok/s)", summary["throughput"]),
            ("issued rate (/s)", summary["issued_rate"]),
            ("achieved rate (/s)", summary["achieved_rate"]),
            ("queries", summary["queries"]),
            ("errors", summary["errors"] or "none"),
            ("duration (s)", summary["duration_s"]),
            ("mean batch size", summary["batch_size_mean"] if summary["batch_size_mean"] is not None else "n/a"),
            ("send drift p99 / max (ms)", f"{_fmt(summary['send_drift_ms']['p99'])} / "
                                          f"{_fmt(summary['send_drift_ms']['max'])}"),
        ]),
        _table([["latency (ms)"] + [lat[k] for k in ("p50", "p90", "p95", "p99", "p99.9", "max", "mean")]]
               + [[st] + [v[k] for k in ("p50", "p90", "p95", "p99", "p99.9", "max", "mean")]
                  for st, v in summary["stages_ms"].items()],
               header=["", "p50", "p90", "p95", "p99", "p99.9", "max", "mean"]),
    ]
    if peak:
        parts += ["<h2>Peak search</h2>",
                  f"<p>Highest Poisson rate with p99 &le; {e(str(slo_ms))} ms: <b>{peak['peak_rate']:.1f}/s</b></p>",
                  _table([(t["rate"], "pass" if t["passed"] else "fail", t["p99_ms"], t["error_frac"])
                          for t in peak["trials"]], header=["rate (/s)", "result", "p99 (ms)", "error fraction"])]
    parts += [
        "<h2>Timeline</h2>",
        f"<img alt='timeline' src='data:image/png;base64,{timeline_png(result, samples or {}, slo_ms)}'>",
        "<h2>Per-stage breakdown</h2>",
        f"<img alt='stages' src='data:image/png;base64,{stages_png(summary)}'>",
        "<h2>Latency CDF</h2>",
        f"<img alt='cdf' src='data:image/png;base64,{cdf_png(result, slo_ms)}'>",
        "<h2>Telemetry summary</h2>",
        _table(telemetry, header=["metric", "value"]),
    ]
    for title, body in extra_sections or []:
        parts += ([f"<h2>{e(title)}</h2>"] if title else []) + [body]
    parts += ["<h2>Config and hardware</h2>",
              _table(sorted(meta.items()), header=["key", "value"]),
              "</body></html>"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(parts))
    return str(path)
