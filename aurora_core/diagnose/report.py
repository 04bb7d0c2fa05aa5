"""Terminal text and an HTML section (evidence plots as base64 PNG) for diagnose and compare results.

``render_section(result)`` takes a ``DiagnoseResult`` (plots need its arrays), the JSON dict of either
command (text and tables only), and returns one self-contained ``<section>`` for the bench report.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from . import DiagnoseResult
from .spikes import SERVICE_STAGES, Series


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------
def answers(data: dict) -> list[str]:
    """The four questions, each answered with its number or "no", over every spike window of every series:
    does a deployment line up, how far did the load rise, is the spike confined to some hosts/regions, did a
    dependency grow. Where several windows answer yes, the first is named and the others counted."""
    wins = [(s["name"], w) for s in data["series"] for w in s["windows"]]
    if not wins:
        return [f"{q}: no (no spike window)" for q in
                ("deployment lines up", "load rose", "confined to some hosts/regions", "dependency grew")]

    def line(question, hits, no):
        if not hits:
            return f"{question}: {no}"
        (name, w), text = hits[0]
        more = f" (and {len(hits) - 1} more window(s))" if len(hits) > 1 else ""
        return f"{question}: {text} [{name} {w['start_s']:.1f}-{w['end_s']:.1f} s]{more}"

    dep = [((n, w), "yes: " + "; ".join(f"{k} {a} -> {b}" for k, (a, b) in w["answers"]["deployment"].items()))
           for n, w in wins if w.get("answers", {}).get("deployment")]
    load = [((n, w), _load_answer(w["answers"]["load"])) for n, w in wins if w.get("answers", {}).get("load", {}).get("rose")]
    ratios = [w["answers"]["load"]["rate_ratio"] for _, w in wins if w.get("answers", {}).get("load", {}).get("rate_ratio")]
    load_no = "no" + (f" (rate x{max(ratios):.2f} at most, not beyond both sides' Poisson noise)" if ratios else "")
    conf = [((n, w), f"yes: {', '.join(w['confinement']['affected'])} (not {', '.join(w['confinement']['unaffected'])})")
            for n, w in wins if (w.get("confinement") or {}).get("confined")]
    n_series = len(data["series"])
    conf_no = "no (one host/region in the data)" if n_series == 1 else "no (seen on every host/region with data)"
    grew = [((n, w), "; ".join(f"{k} {v['baseline_ms']:.2f} -> {v['window_ms']:.2f} ms (x{v['ratio']:.2f})"
                               for k, v in w["answers"]["dependency"].items() if v["grew"]))
            for n, w in wins if any(v["grew"] for v in w.get("answers", {}).get("dependency", {}).values())]
    has_spans = any(w.get("answers", {}).get("dependency") for _, w in wins)
    return [line("deployment lines up", dep, "no"), line("load rose", load, load_no),
            line("confined to some hosts/regions", conf, conf_no),
            line("dependency grew", grew, "no" if has_spans else "no (no span linked to requests)")]


def _load_answer(ld: dict) -> str:
    measured = f"{ld['baseline_per_s']:.1f} -> {ld['window_per_s']:.1f} req/s"
    ob, ow = ld.get("offered_per_s") or (None, None)
    if ob and ow:  # the runs' offered load decided (causes.load_rose)
        return f"+{ow / ob - 1:.0%} offered ({ob:.1f} -> {ow:.1f} req/s; arrivals {measured})"
    return f"+{ld['rate_ratio'] - 1:.0%} ({measured}, z {ld['z']:.1f})"


def text_diagnose(result) -> str:
    data = result.data if isinstance(result, DiagnoseResult) else result
    out = answers(data) + [""]
    for s in data["series"]:
        labels = ", ".join(sorted({str(r["label"]) for r in s["runs"] if r.get("label")})) or "-"
        out.append(f"== {s['name']}  ({len(s['runs'])} run(s), {s['n_requests']} requests, labels: {labels}, "
                   f"interval {s['interval_s']:.2f} s)")
        b = s["baseline"]
        if b:
            out.append(f"   normal (baseline) {b['start_s']:.1f}-{b['end_s']:.1f} s: p50 {b['p50_ms']:.2f} ms, "
                       f"p99 {b['p99_ms']:.2f} ms, n={b['n']}")
            if s.get("baseline_reason"):
                out.append(f"     why: {s['baseline_reason']}")
        if not s["windows"]:
            out.append("   no spike window")
        for w in s["windows"]:
            out.append(f"-- spike {w['start_s']:.1f}-{w['end_s']:.1f} s: p50 {w['p50_ms']:.2f} ms (x{w['ratio_p50']:.2f}), "
                       f"p99 {w['p99_ms']:.2f} ms (x{w['ratio_p99']:.2f}), Mann-Whitney p={w['p_value']:.1e}, n={w['n']}")
            verdict = w["verdict"]
            out.append(f"   verdict: {verdict.upper() if verdict == 'inconclusive' else verdict}")
            for i, c in enumerate(w["causes"], 1):
                out.append(f"   {i}. {c['title']}  score {c['score']:.2f} (explains {c['share']:.0%} x evidence "
                           f"{c['strength']:.1f})")
                out.append(f"      {c['summary']}")
                for e in c["evidence"]:
                    mark = "x" if e["passed"] else " "
                    out.append(f"      [{mark}] {e['name']}: {_v(e['baseline'])} -> {_v(e['window'])} {e['unit']} "
                               f"({e['threshold']})")
            conf = w.get("confinement")
            if conf:
                msg = (f"confined to {', '.join(conf['affected'])}" if conf["confined"]
                       else f"seen on {', '.join(conf['affected'])}")
                if conf["unaffected"]:
                    msg += f"; unaffected: {', '.join(conf['unaffected'])}"
                if conf["no_data"]:
                    msg += f"; no data at that time: {', '.join(conf['no_data'])}"
                msg += ("; this cause on no other host" if conf["cause_confined"]
                        else f"; same cause on {', '.join(conf['same_cause'])}")
                out.append(f"   hosts/regions: {msg}")
            out.append("   checked:")
            out.extend(f"     - {c}" for c in w["checked"])
    return "\n".join(out)


def _v(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def text_compare(res: dict) -> str:
    out = [f"BEFORE {', '.join(r['path'] for r in res['before']['runs'])} (label {_labels(res['before'])})",
           f"AFTER  {', '.join(r['path'] for r in res['after']['runs'])} (label {_labels(res['after'])})"]
    ld = res["load"]
    out.append(f"load ({ld['basis']}): rate x{_v(ld['rate_ratio'])}, queue depth {ld['queue_depth_mean'][0]} -> "
               f"{ld['queue_depth_mean'][1]}: {'matched' if ld['matched'] else 'NOT MATCHED'}")
    if ld["warning"]:
        out.append(f"WARNING: {ld['warning']}")
    env = res.get("environment")
    if env is not None:
        out.append(f"environment: {'matched' if env['matched'] else 'NOT MATCHED'}"
                   + (f" ({env['note']})" if env.get("note") else ""))
    out += [f"WARNING: {w}" for w in _compare_warnings(res)]
    out.append(f"{'stage':<14}{'p50 before':>11}{'after':>10}  {'delta ms [95% CI]':>28}{'p99 before':>11}{'after':>10}"
               f"  {'delta ms [95% CI]':>28}{'MW p':>10}  verdict")
    for r in res["stages"]:
        if "p50" not in r:
            out.append(f"{r['stage']:<14}  {r.get('note', '')}")
            continue
        cells = []
        for q in ("p50", "p99"):
            lo, hi = r[f"{q}_ci_ms"]
            rel = r[f"{q}_rel"]
            delta = f"{r[q + '_delta_ms']:+.3f} [{lo:+.3f},{hi:+.3f}]" + (f" {rel:+.0%}" if rel is not None else "")
            cells.append(f"{r[q][0]:>11.3f}{r[q][1]:>10.3f}  {delta:>28}")
        verdict = "REGRESSION" if r.get("regression") else ""
        out.append(f"{r['stage']:<14}{cells[0]}{cells[1]}{r['mw_p_greater']:>10.1e}  {verdict} {r.get('note', '') if not verdict else ''}")
    out.append(f"verdict: {res['verdict'].upper()}" + (f" in {', '.join(res['regressions'])}" if res["regressions"] else "")
               + f" (threshold {res['threshold']:.0%}, alpha {res['alpha']})")
    return "\n".join(out)


def _labels(side: dict) -> str:
    # A run without a label reads "-", as diagnose's "labels: -", not "None".
    return ", ".join(sorted({"-" if r.get("label") is None else str(r["label"]) for r in side["runs"]}))


def _compare_warnings(res: dict) -> list[str]:
    """The environment check's warning and the runs' own (an interrupted run), beside the load's."""
    env = res.get("environment") or {}
    return [w for w in (env.get("warning"), *res.get("warnings", ())) if w]


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="evidence plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _timeline_plot(s: Series, det, windows: list[dict]) -> str:
    plt = _plt()
    iv = det.intervals
    mid = (iv.edges[:-1] + iv.edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.plot(mid, iv.p50_ms, label="p50", lw=1.2)
    ax.plot(mid, iv.p99_ms, label="p99", lw=1.2)
    if det.baseline:
        ax.axvspan(det.baseline.start_s, det.baseline.end_s, color="tab:green", alpha=0.08, label="baseline")
    for w in windows:
        ax.axvspan(w["start_s"], w["end_s"], color="tab:red", alpha=0.15)
    for (a, _), r in zip(s.run_bounds[1:], s.runs[1:], strict=True):
        ax.axvline(a, color="k", ls=":", lw=0.8)
        ax.text(a, 0.98, f" {r.meta.get('label') or ''}", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("s")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{s.name}: latency per {det.interval_s:.2f} s interval (red: spike windows)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _binned(t: np.ndarray, v: np.ndarray, edges: np.ndarray, how=np.mean) -> np.ndarray:
    # Sorted once and cut per filled interval, as spikes.intervals does: runs days apart make most
    # intervals empty, and a scan of every value per interval took seconds.
    out = np.full(edges.size - 1, np.nan)
    idx = np.searchsorted(edges, t, side="right") - 1
    keep = (idx >= 0) & (idx < out.size)
    order = np.argsort(idx[keep], kind="stable")
    idx, v = idx[keep][order], v[keep][order]
    bounds = np.searchsorted(idx, np.arange(out.size + 1))
    for k in np.flatnonzero(bounds[1:] > bounds[:-1]):
        out[k] = how(v[bounds[k]:bounds[k + 1]])
    return out


def _evidence_plot(s: Series, det, w: dict) -> str | None:
    """One plot of the quantities behind the top cause (or the components when inconclusive)."""
    plt = _plt()
    iv = det.intervals
    edges = iv.edges
    mid = (edges[:-1] + edges[1:]) / 2
    cause = w["causes"][0]["cause"] if w["causes"] and w["verdict"] != "inconclusive" else "inconclusive"
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ok = s.ok & (s.e2e_ns >= 0)
    title = ""
    if cause == "load":
        width = np.diff(edges)
        ax.plot(mid, iv.count / width, label="arrival rate (req/s)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(mid, _binned(s.t[ok], s.wait_ns[ok] / 1e6, edges), color="tab:red", label="mean wait (ms)")
        ax2.set_ylabel("wait (ms)")
        ax.set_ylabel("req/s")
        title = "load: arrival rate and wait"
    elif cause == "dependency":
        for n, v in s.span_ns.items():
            m = ok & (v > 0)
            ax.plot(mid, _binned(s.t[m], v[m] / 1e6, edges, np.median), label=f"span {n} (median ms)")
        ax.plot(mid, _binned(s.t[ok], s.wait_ns[ok] / 1e6 + sum(np.maximum(x[ok], 0) for x in s.stage_ns.values()) / 1e6,
                             edges, np.median), label="pipeline total (median ms)")
        title = "dependency: user span vs pipeline"
    elif cause in ("hardware", "hardware_idle_clocks"):
        gpus = sorted({src for src, _ in s.samples if src.startswith("gpu")})
        for g in gpus[:2]:
            for key, val in s.samples.items():
                if key[0] == g and key[1].startswith("throttle_frac_") and np.nanmax(val[1]) > 0:
                    ax.plot(val[0], val[1], label=f"{g} {key[1]}")
            clk = s.samples.get((g, "sm_clock_mhz"))
            if clk is not None:
                ax2 = ax.twinx()
                ax2.plot(clk[0], clk[1], color="k", lw=0.8, label=f"{g} SM clock (MHz)")
                ax2.set_ylabel("MHz")
        ax.set_ylabel("fraction throttled")
        title = "hardware: throttled fraction by reason and SM clock"
    elif cause == "cpu_contention":
        util, own = s.samples.get(("cpu", "cpu_util_pct")), s.samples.get(("cpu", "proc_cpu_pct"))
        if own is not None:
            ax.plot(own[0], own[1] / 100, label="this process CPU (cores)")
            if util is not None and util[0].size == own[0].size:
                ax.plot(util[0], np.maximum(util[1] / 100 * s.cores - own[1] / 100, 0), label="other processes (cores)")
        rq = s.samples.get(("cpu", "runq"))
        if rq is not None:
            ax.plot(rq[0], rq[1] / s.cores, label="runq / cores", lw=0.8)
        ax.set_ylabel("cores")
        ax2 = ax.twinx()
        svc = sum(np.maximum(v, 0) / (s.bucket if k == "compute" else 1) for k, v in s.stage_ns.items())
        ax2.plot(mid, _binned(s.t[ok], svc[ok] / 1e6, edges, np.median), color="k", lw=1, label="service (ms/item)")
        ax2.set_ylabel("service ms/item (black)")
        title = "CPU contention: CPU used vs service time"
    elif cause == "memory":
        for key in (("cpu", "psi_mem_some_avg10"), ("cpu", "swap_used_bytes")):
            val = s.samples.get(key)
            if val is not None:
                ax.plot(val[0], val[1], label=f"{key[1]}")
        title = "memory pressure: host telemetry"
    else:  # regression or inconclusive: per-stage service time
        for st in SERVICE_STAGES:
            v = s.stage_ns[st]
            m = ok & (v > 0)
            if np.any(m):
                per = v[m] / (s.bucket[m] if st == "compute" else 1)
                ax.plot(mid, _binned(s.t[m], per / 1e6, edges, np.median), label=f"{st} (median ms/item)")
        ax.plot(mid, _binned(s.t[ok], s.wait_ns[ok] / 1e6, edges, np.median), label="wait (median ms)", ls="--")
        ax.set_yscale("log")
        title = f"{cause}: service time per stage"
    ax.axvspan(w["start_s"], w["end_s"], color="tab:red", alpha=0.12)
    ax.set_xlabel("s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _diagnose_html(result) -> str:
    data = result.data if isinstance(result, DiagnoseResult) else result
    parts = ['<section class="aurora-diagnose"><h2>Latency diagnosis</h2>', "<ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in answers(data)] + ["</ul>"]
    for i, s in enumerate(data["series"]):
        parts.append(f"<h3>{html.escape(s['name'])}</h3>")
        b = s.get("baseline")
        if b:
            parts.append(f"<p>Normal (baseline) {b['start_s']:.1f}-{b['end_s']:.1f} s: p50 {b['p50_ms']:.2f} ms, "
                         f"p99 {b['p99_ms']:.2f} ms; {html.escape(s.get('baseline_reason') or '')}</p>")
        if isinstance(result, DiagnoseResult):
            parts.append(_timeline_plot(result.series[i], result.detections[i], s["windows"]))
        if not s["windows"]:
            parts.append("<p>No spike window: p50 and p99 stayed near the baseline.</p>")
        for w in s["windows"]:
            parts.append(f"<h4>Spike {w['start_s']:.1f}-{w['end_s']:.1f} s: p99 x{w['ratio_p99']:.2f}, "
                         f"p50 x{w['ratio_p50']:.2f} &mdash; {html.escape(_verdict_title(w))}</h4>")
            conf = w.get("confinement")
            if conf:
                parts.append(f"<p>Hosts/regions: affected {html.escape(', '.join(conf['affected']))}; unaffected "
                             f"{html.escape(', '.join(conf['unaffected']) or 'none')}"
                             + (f"; no data {html.escape(', '.join(conf['no_data']))}" if conf["no_data"] else "")
                             + ("; this cause on no other host" if conf["cause_confined"]
                                else f"; same cause on {html.escape(', '.join(conf['same_cause']))}") + "</p>")
            parts.append("<table><tr><th>cause</th><th>score</th><th>explains</th><th>evidence</th><th>summary</th></tr>")
            for c in w["causes"]:
                parts.append(f"<tr><td>{html.escape(c['title'])}</td><td>{c['score']:.2f}</td><td>{c['share']:.0%}</td>"
                             f"<td>{c['strength']:.1f}</td><td>{html.escape(c['summary'])}</td></tr>")
            parts.append("</table>")
            if isinstance(result, DiagnoseResult):
                parts.append(_evidence_plot(result.series[i], result.detections[i], w) or "")
            parts.append("<details><summary>checked</summary><ul>"
                         + "".join(f"<li>{html.escape(c)}</li>" for c in w["checked"]) + "</ul></details>")
    parts.append("</section>")
    return "\n".join(parts)


def _verdict_title(w: dict) -> str:
    if w["verdict"] == "inconclusive" or not w["causes"]:
        return "inconclusive"
    return w["causes"][0]["title"]


def _compare_html(res: dict) -> str:
    ld = res["load"]
    parts = ['<section class="aurora-compare"><h2>Before / after comparison</h2>',
             f"<p>Verdict: <b>{html.escape(res['verdict'])}</b>"
             + (f" in {html.escape(', '.join(res['regressions']))}" if res["regressions"] else "") + "</p>"]
    parts += [f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in (ld["warning"], *_compare_warnings(res)) if w]
    parts.append("<table><tr><th>stage</th><th>p50 before</th><th>p50 after</th><th>p50 delta [95% CI]</th>"
                 "<th>p99 before</th><th>p99 after</th><th>p99 delta [95% CI]</th><th>MW p</th><th>verdict</th></tr>")
    for r in res["stages"]:
        if "p50" not in r:
            continue
        cells = "".join(f"<td>{r[q][0]:.3f}</td><td>{r[q][1]:.3f}</td><td>{r[q + '_delta_ms']:+.3f} "
                        f"[{r[q + '_ci_ms'][0]:+.3f}, {r[q + '_ci_ms'][1]:+.3f}]</td>" for q in ("p50", "p99"))
        parts.append(f"<tr><td>{r['stage']}</td>{cells}<td>{r['mw_p_greater']:.1e}</td>"
                     f"<td>{'REGRESSION' if r.get('regression') else html.escape(r.get('note', ''))}</td></tr>")
    parts.append("</table></section>")
    return "\n".join(parts)


def render_section(result) -> str:
    """An HTML ``<section>`` for a DiagnoseResult, a diagnose JSON dict, or a compare dict."""
    if isinstance(result, dict) and "stages" in result and "verdict" in result:
        return _compare_html(result)
    return _diagnose_html(result)
