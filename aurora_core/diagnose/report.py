"""Terminal text for diagnose and compare results (their HTML pages are ``diagnose.html``)."""

from __future__ import annotations

from . import DiagnoseResult


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
