"""The diagnose and compare pages, built from ``aurora_core.page`` components.

Diagnose: the four answers first (deployment, traffic, where, dependencies), then the fleet at a glance
(one small p99 plot per host, the most deviating first), then per host the linked time series behind the
verdicts: p50/p99 with spike windows shaded and the baseline marked, arrival rate and queue wait,
per-stage service time, user spans, and the telemetry each verdict rests on. Every plot is per-interval
aggregates on the wall clock, so all hosts share one zoomable time axis.
"""

from __future__ import annotations

import numpy as np

from aurora_core.page import Card, Page, Plot, binned, table

from . import DiagnoseResult
from .report import _compare_warnings
from .spikes import SERVICE_STAGES, Series

#: Hosts that get the full set of panels; the rest of a fleet is in the small multiples. Each host's
#: panels are ~6 plots: 48 hosts in full would be ~300 plots and a page far slower to open.
DETAIL_HOSTS = 6

_TELEMETRY = {  # verdict -> [(panel title, unit, [(source prefix, metric, line name)])]
    "cpu_contention": [("CPU: this process vs the rest of the host", "cores",
                        [("cpu", "proc_cores", "this process"), ("cpu", "other_cores", "other processes"),
                         ("cpu", "cgroup_throttled_frac", "cgroup throttled fraction"),
                         ("cpu", "steal_pct", "steal %")])],
    "hardware": [("GPU throttling", "fraction", [("gpu", "throttle_frac_", "")]),
                 ("GPU SM clock", "MHz", [("gpu", "sm_clock_mhz", "SM clock")])],
    "hardware_idle_clocks": [("GPU SM clock", "MHz", [("gpu", "sm_clock_mhz", "SM clock")])],
    "memory": [("Memory pressure", "", [("cpu", "psi_mem_some_avg10", "PSI memory some (avg10)"),
                                        ("cpu", "swap_used_bytes", "swap used (bytes)"),
                                        ("gpu", "mem_used_frac", "")])],
}


def _deviation(entry: dict) -> float:
    return max((w["ratio_p99"] for w in entry["windows"]), default=1.0)


def _spans(s: Series, entry: dict, shift: float) -> list:
    out = [(shift + w["start_s"], shift + w["end_s"], "spike") for w in entry["windows"]]
    if entry["baseline"]:
        b = entry["baseline"]
        out.insert(0, (shift + b["start_s"], shift + b["end_s"], "baseline"))
    return out


def _marks(s: Series, shift: float) -> list:
    """A vertical line where the deployment changes between consecutive runs of the host."""
    out = []
    for i in range(1, len(s.runs)):
        if s.fingerprint(i) != s.fingerprint(i - 1):
            out.append((shift + s.run_bounds[i][0], f"{s.runs[i].meta.get('label') or 'config change'}"))
    return out


def _sample_line(s: Series, prefix: str, metric: str, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Interval means of a telemetry metric (every source starting with ``prefix``; a metric ending in
    ``_`` matches every metric with that stem). Derived lines: proc_cores, other_cores (CPU) and
    mem_used_frac (GPU memory used / total, what the memory cause judges)."""
    if prefix == "cpu" and metric in ("proc_cores", "other_cores"):
        own, util = s.samples.get(("cpu", "proc_cpu_pct")), s.samples.get(("cpu", "cpu_util_pct"))
        if own is None:
            return {}
        if metric == "proc_cores":
            return {"": binned(own[0], own[1] / 100, edges)}
        if util is None or util[0].size != own[0].size:
            return {}
        return {"": binned(own[0], np.maximum(util[1] / 100 * s.cores - own[1] / 100, 0), edges)}
    out = {}
    if metric == "mem_used_frac":
        for (src, m), (ts, used) in sorted(s.samples.items()):
            total = s.samples.get((src, "mem_total_bytes"))
            if src.startswith(prefix) and m == "mem_used_bytes" and total is not None and total[0].size == ts.size:
                out[f"{src} memory used fraction"] = binned(ts, used / np.maximum(total[1], 1), edges)
        return out
    for (src, m), (ts, vals) in sorted(s.samples.items()):
        hit = m.startswith(metric) if metric.endswith("_") else m == metric
        if src.startswith(prefix) and hit and ts.size and np.nanmax(np.abs(vals)) > 0:
            out[f"{src} {m[len(metric):] if metric.endswith('_') else ''}".strip()] = binned(ts, vals, edges)
    return out


def _host_plots(s: Series, det, entry: dict, shift: float) -> list[Plot]:
    iv = det.intervals
    edges = iv.edges
    x = shift + (edges[:-1] + edges[1:]) / 2
    spans, marks = _spans(s, entry, shift), _marks(s, shift)
    ok = s.ok & (s.e2e_ns >= 0)
    kw = {"spans": spans, "marks": marks}
    plots = [Plot(f"{s.name}: latency per {det.interval_s:.2f} s interval (red: spike, green: baseline)", x,
                  {"p50": iv.p50_ms, "p99": iv.p99_ms}, unit="ms", log=True, height=200, **kw),
             Plot(f"{s.name}: arrival rate", x, {"arrivals/s": iv.count / np.diff(edges)}, unit="req/s", **kw),
             Plot(f"{s.name}: queue wait and queue depth", x,
                  {"mean wait (ms)": binned(s.t[ok], s.wait_ns[ok] / 1e6, edges),
                   "queue depth at arrival": binned(s.t, s.queue_depth.astype(np.float64), edges)}, **kw)]
    stages = {}
    for st in SERVICE_STAGES:
        v = s.stage_ns[st]
        m = ok & (v > 0)
        if np.any(m):
            per = v[m] / (s.bucket[m] if st == "compute" else 1)
            stages[st] = binned(s.t[m], per / 1e6, edges, np.median)
    plots.append(Plot(f"{s.name}: service time per stage (median ms per item)", x, stages, unit="ms", log=True,
                      empty="" if stages else "no stage timings in these runs", **kw))
    spans_lines = {}
    for n, v in s.span_ns.items():
        m = ok & (v > 0)
        if np.any(m):
            spans_lines[f"span {n}"] = binned(s.t[m], v[m] / 1e6, edges, np.median)
    plots.append(Plot(f"{s.name}: dependencies (user spans linked to requests, median ms)", x, spans_lines,
                      unit="ms", empty="" if spans_lines else "no user spans linked to requests in these runs",
                      **kw))
    verdicts = []
    for w in entry["windows"]:
        v = w["verdict"]
        verdicts += [v] if v in _TELEMETRY and v not in verdicts else []
    for v in verdicts:
        for title, unit, specs in _TELEMETRY[v]:
            lines = {}
            for prefix, metric, name in specs:
                for k, arr in _sample_line(s, prefix, metric, edges).items():
                    lines[name or k] = arr
            plots.append(Plot(f"{s.name}: {title} (behind the {v.replace('_', ' ')} verdict)", x, lines,
                              unit=unit, empty="" if lines else "this telemetry was not recorded in these runs",
                              **kw))
    return plots


def add_diagnosis(page: Page, result, cards: list[Card] | None = None) -> Page:
    """Append a diagnosis (a DiagnoseResult; a JSON dict gives cards and tables only) to ``page``."""
    data = result.data if isinstance(result, DiagnoseResult) else result
    for name, w in _windows(data):
        verdict = "inconclusive" if w["verdict"] == "inconclusive" or not w["causes"] else w["causes"][0]["title"]
        page.p(f"Spike on {name}, {w['start_s']:.1f}-{w['end_s']:.1f} s: p99 x{w['ratio_p99']:.2f}, "
               f"p50 x{w['ratio_p50']:.2f}: {verdict}", cls="verdict")
    if cards:
        page.cards(cards)
    entries = data["series"]
    have_arrays = isinstance(result, DiagnoseResult)
    if have_arrays:
        shifts = [s.t0_wall_ns / 1e9 for s in result.series]
        order = sorted(range(len(entries)), key=lambda i: -_deviation(entries[i]))
        if len(entries) > 1:
            page.h("The fleet at a glance")
            page.p(f"p99 per interval on each host, the most deviating first (peak spike ratio in the title); "
                   f"{len(entries)} hosts.", cls="sub")
            small = []
            for i in order:
                s, det, e = result.series[i], result.detections[i], entries[i]
                iv = det.intervals
                x = shifts[i] + (iv.edges[:-1] + iv.edges[1:]) / 2
                dev = _deviation(e)
                small.append(Plot(f"{e['name']}" + (f": p99 x{dev:.2f}" if e["windows"] else ": no spike"), x,
                                  {"p99": iv.p99_ms}, unit="ms", log=True, height=120,
                                  spans=_spans(s, e, shifts[i])))
            page.multiples(small)
        shown = [i for i in order if entries[i]["windows"]][:DETAIL_HOSTS] or order[:1]
        rest = len(entries) - len(shown)
        page.h("Time series behind the verdicts")
        if rest > 0:
            page.p(f"Full panels for the {len(shown)} most deviating host(s); the other {rest} are in the fleet "
                   "view above and in the details below.", cls="sub")
        for i in shown:
            page.h(entries[i]["name"], 3)
            page.plots(_host_plots(result.series[i].select(), result.detections[i], entries[i], shifts[i]))
    page.h("Details for engineers")
    for e in entries:
        b = e["baseline"]
        page.h(f"{e['name']}: {e['n_requests']} requests, interval {e['interval_s']:.2f} s", 3)
        page.p(f"Normal (baseline) {b['start_s']:.1f}-{b['end_s']:.1f} s: p50 {b['p50_ms']:.2f} ms, "
               f"p99 {b['p99_ms']:.2f} ms" + (f"; why: {e['baseline_reason']}" if e.get("baseline_reason") else "")
               if b else "No baseline: no successful request with a latency.")
        if not e["windows"]:
            page.p("No spike window: p50 and p99 stayed near the baseline.")
        for w in e["windows"]:
            title = "inconclusive" if w["verdict"] == "inconclusive" or not w["causes"] else w["causes"][0]["title"]
            page.p(f"Spike {w['start_s']:.1f}-{w['end_s']:.1f} s: p99 x{w['ratio_p99']:.2f}, "
                   f"p50 x{w['ratio_p50']:.2f}: {title}")
            page.table([(c["title"], c["score"], f"{c['share']:.0%}", c["strength"], c["summary"])
                        for c in w["causes"]], header=["cause", "score", "explains", "evidence", "summary"])
            ev = [(c["title"], ev["name"], ev["baseline"], ev["window"], ev["unit"], ev["threshold"],
                   "yes" if ev["passed"] else "no") for c in w["causes"] for ev in c["evidence"]]
            if ev:
                page.raw("<details><summary>evidence</summary>" + table(
                    ev, header=["cause", "indicator", "baseline", "window", "unit", "threshold", "passed"])
                         + "</details>")
            page.raw("<details><summary>checked</summary><ul>"
                     + "".join(f"<li>{_esc(c)}</li>" for c in w["checked"]) + "</ul></details>")
    return page


def _esc(s) -> str:
    from aurora_core.page import esc

    return esc(str(s))


def _windows(data: dict) -> list[tuple[str, dict]]:
    return [(e["name"], w) for e in data["series"] for w in e["windows"]]


def _cause(w: dict, name: str) -> dict | None:
    return next((c for c in w["causes"] if c["cause"] == name and c["strength"] > 0), None)


def _answer(w: dict, key: str):
    return (w.get("answers") or {}).get(key)


def diagnose_cards(data: dict) -> list[Card]:
    """The four answers as cards: the same per-window answers as the text report's first lines
    (``report.answers``), with the number, the confidence and what was checked."""
    wins = _windows(data)
    if not wins:
        return [Card("Spike", "no spike window", status="no",
                     detail=f"checked {len(data['series'])} host(s): p50 and p99 stayed near the baseline, or the "
                            "change was not significant against both sides' noise")]
    cards = []
    dep = [(n, w) for n, w in wins if _answer(w, "deployment")]
    if dep:
        n, w = dep[0]
        change = "; ".join(f"{k} {_s(a)} → {_s(b)}" for k, (a, b) in _answer(w, "deployment").items())
        reg = _cause(w, "regression")
        cards.append(Card("Deployment", f"{change} lines up with the spike at {w['start_s']:.0f} s on {n}",
                          f"explains {reg['share']:.0%}" if reg else "no stage shifted",
                          _confidence(w, reg) if reg else "", "yes", reg["summary"] if reg else ""))
    else:
        labels = sorted({str(r.get("label")) for e in data["series"] for r in e["runs"] if r.get("label")})
        cards.append(Card("Deployment", "no deployment in the spike windows", status="no",
                          detail=f"labels seen: {', '.join(labels) or 'none'}; every window's runs have its "
                                 "baseline's label, config, model and versions"))
    load = [(n, w) for n, w in wins if (_answer(w, "load") or {}).get("rose")]
    if load:
        n, w = load[0]
        ld, c = _answer(w, "load"), _cause(w, "load")
        ob, ow = ld.get("offered_per_s") or (None, None)
        figure = (f"{ow / ob - 1:+.0%} offered" if ob and ow else f"{ld['rate_ratio'] - 1:+.0%} arrivals")
        cards.append(Card("Traffic", f"arrivals rose on {n} from {w['start_s']:.0f} s"
                          + (f"; queueing explains {c['share']:.0%} of the extra latency" if c else ""), figure,
                          _confidence(w, c) if c else f"Poisson z {ld['z']:.1f}", "yes",
                          f"{ld['baseline_per_s']:.1f} → {ld['window_per_s']:.1f} req/s"))
    else:
        rr = [_answer(w, "load")["rate_ratio"] for _, w in wins if (_answer(w, "load") or {}).get("rate_ratio")]
        cards.append(Card("Traffic", "the load did not rise significantly in any spike window",
                          f"largest change: arrivals {max(rr, key=lambda r: abs(r - 1)) - 1:+.0%}" if rr else "",
                          status="no", detail="a rise counts when it is significant against the Poisson noise of "
                                              "both the baseline and the window (or the runs' offered rate rose)"))
    cards.append(_where_card(data, wins))
    grew = [(n, w, k, v) for n, w in wins for k, v in (_answer(w, "dependency") or {}).items() if v["grew"]]
    if grew:
        n, w, k, v = grew[0]
        c = _cause(w, "dependency")
        cards.append(Card("Dependencies", f"{k} grew on {n} from {w['start_s']:.0f} s",
                          f"{v['baseline_ms']:.3g} → {v['window_ms']:.3g} ms", _confidence(w, c) if c else "", "yes",
                          c["summary"] if c else ""))
    else:
        spans = any(_answer(w, "dependency") for _, w in wins)
        cards.append(Card("Dependencies", "no dependency span grew" if spans else "no dependency spans recorded",
                          status="no" if spans else "inconclusive",
                          detail="" if spans else "record calls to other services as spans linked to the request "
                                                  "(README: with pipe.request() as ctx) to check them"))
    return cards


def _s(v) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _where_card(data: dict, wins) -> Card:
    hosts = [e["name"] for e in data["series"]]
    if len(hosts) < 2:
        return Card("Where", f"one host in the data ({hosts[0]})", status="inconclusive",
                    detail="give diagnose runs or stores of several hosts or regions to see whether a spike is "
                           "confined")
    # The same rule as the text report (report.answers): the first window whose spike some host with data
    # at that time did not share; hosts without data then are neither affected nor spared.
    hit = [(n, w["confinement"]) for n, w in wins if (w.get("confinement") or {}).get("confined")]
    if not hit:
        return Card("Where", "not confined: seen on every host/region with data", status="no",
                    detail=f"checked {len(wins)} spike window(s) on {len(hosts)} hosts")
    n, conf = hit[0]
    affected, unaffected = list(conf["affected"]), list(conf["unaffected"])
    with_data = affected + unaffected
    region = {h: h.split("/", 1)[1] if "/" in h else "" for h in with_data}
    # Name regions when the spike covers whole regions (of the hosts with data) and nothing outside them.
    whole = all(region[h] and all(x in affected for x in with_data if region[x] == region[h]) for h in affected)
    where = ", ".join(sorted({region[h] for h in affected})) if whole else ", ".join(affected)
    spared = sorted({region[h] for h in unaffected}) if whole else unaffected
    detail = "unaffected: " + ", ".join(spared)
    if conf.get("no_data"):
        detail += "; no data at that time: " + ", ".join(conf["no_data"])
    if len(hit) > 1:
        detail += f"; {len(hit) - 1} more confined window(s)"
    return Card("Where", f"confined to {where} ({len(affected)} of {len(with_data)} hosts with data)",
                f"{len(affected)}/{len(with_data)} hosts", status="yes", detail=detail)


def _confidence(w: dict, c: dict) -> str:
    return f"{'high' if c['strength'] >= 1 else 'medium'} (evidence {c['strength']:.1f}, spike p={w['p_value']:.0e})"


def compare_cards(res: dict) -> list[Card]:
    ld, env = res["load"], res.get("environment")
    verdict = res["verdict"]
    cards = [Card("Deployment gate", verdict, ", ".join(res["regressions"]) if res["regressions"] else "",
                  status="yes" if res["regressions"] else "no",
                  detail=f"alpha {res.get('alpha', '')}, threshold {res.get('threshold', '')}".strip(", ")),
             Card("Load matched", "yes" if ld["matched"] else "no",
                  f"rate x{ld['rate_ratio']:.2f}" if ld.get("rate_ratio") is not None else "",
                  status="no" if ld["matched"] else "yes", detail=ld.get("warning") or "")]
    if env is not None:
        cards.append(Card("Environment matched", "yes" if env["matched"] else "no", status="no" if env["matched"]
                          else "yes", detail=env.get("note") or ""))
    return cards


def diagnose_page(result) -> Page:
    data = result.data if isinstance(result, DiagnoseResult) else result
    n = sum(e["n_requests"] for e in data["series"])
    page = Page("aurora diagnose", f"{len(data['series'])} host(s), {n:,} requests")
    return add_diagnosis(page, result, diagnose_cards(data))


def compare_page(res: dict, page: Page | None = None) -> Page:
    page = page or Page("aurora compare", "Before / after comparison")
    page.cards(compare_cards(res))
    for w in _compare_warnings(res):
        page.p(f"Warning: {w}")
    rows = []
    for r in res["stages"]:
        if "p50" not in r:
            continue
        rows.append([r["stage"]] + [x for q in ("p50", "p99") for x in (
            r[q][0], r[q][1], f"{r[q + '_delta_ms']:+.3f} [{r[q + '_ci_ms'][0]:+.3f}, {r[q + '_ci_ms'][1]:+.3f}]")]
            + [f"{r['mw_p_greater']:.1e}", "REGRESSION" if r.get("regression") else r.get("note", "")])
    page.h("Per-stage latency, before and after (ms)")
    page.table(rows, header=["stage", "p50 before", "p50 after", "p50 delta [95% CI]", "p99 before", "p99 after",
                             "p99 delta [95% CI]", "MW p", "verdict"])
    return page
