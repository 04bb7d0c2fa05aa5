"""Latency diagnosis over run files: ``diagnose`` (spike windows and their causes) and ``compare``.

``diagnose(runs)`` groups runs by (host, region), lays each group's runs end to end on the wall clock,
finds spike windows (``spikes``), ranks their causes with numeric evidence (``causes``) and, with
several hosts or regions, says whether each spike is confined to some of them. ``compare(before,
after)`` is the deployment gate (``compare``). ``report`` renders text and an HTML section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from aurora_core.recorder import RunData, load_run

from .causes import CLAIM, analyze
from .settings import DEFAULTS, Settings
from .spikes import Detection, Series, Window, build_series, detect, parse_baseline, resolve_baselines

__all__ = ["DiagnoseResult", "diagnose", "compare", "load_runs", "CLAIM", "Settings"]


def load_runs(runs) -> list[RunData]:
    return [r if isinstance(r, RunData) else load_run(r) for r in runs]


@dataclass
class DiagnoseResult:
    """``data`` is the JSON-ready result; ``series``/``detections`` keep the arrays for plots."""

    data: dict
    series: list[Series] = field(default_factory=list, repr=False)
    detections: list[Detection] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return self.data


def _win_dict(w: Window) -> dict:
    return {"start_s": round(w.start_s, 3), "end_s": round(w.end_s, 3), "p50_ms": round(w.p50_ms, 3),
            "p99_ms": round(w.p99_ms, 3), "ratio_p50": round(w.ratio_p50, 3), "ratio_p99": round(w.ratio_p99, 3),
            "p_value": float(f"{w.p_value:.3g}"), "n": w.n}


def _confinement_views(series: list[Series], dets: list[Detection]) -> list[Series]:
    """Per series, its requests (detection's columns) in the other series' windows shifted onto its clock:
    all that ``_confinement`` reads of it. A store-backed series reads just those ranges."""
    views = []
    for j, o in enumerate(series):
        ranges = [(w.start_s + (s.t0_wall_ns - o.t0_wall_ns) / 1e9, w.end_s + (s.t0_wall_ns - o.t0_wall_ns) / 1e9)
                  for i, (s, d) in enumerate(zip(series, dets, strict=True)) if i != j for w in d.windows]
        views.append(ranges)
    def view(o: Series, r):
        with _engine_errors(o):
            return o.select(r, full=False) if r else None

    with ThreadPoolExecutor(2) as ex:  # each a short read of one host's files
        return list(ex.map(view, series, views))


def _engine_errors(s: Series):
    """A query-time engine failure on a store-backed series (a file that retention removed since the scan, a
    damaged page) as the store's StoreError naming the file; a no-op for run files."""
    if s.source is None:
        return contextlib.nullcontext()
    from aurora_core.store.reader import engine_errors

    return engine_errors(s.source.store, "diagnose")


def _confinement(i: int, w: Window, verdict: str, all_series: list[Series], views: list[Series | None],
                 dets: list[Detection], verdicts: list[list[str]]) -> dict:
    """Is the spike of series ``i`` in ``w`` also on the other hosts/regions at the same wall-clock time?

    ``affected``: hosts whose own detector found a spike overlapping >= 30% of this window (one rule for
    every host). ``same_cause``: those of them whose overlapping window got the same verdict. A spike is
    ``confined`` when some host with data at that time was unaffected; its cause is ``cause_confined``
    when no other host shows it at that time. views: ``_confinement_views``."""
    s = all_series[i]
    out = {"affected": [s.name], "same_cause": [s.name], "unaffected": [], "no_data": [], "detail": {}}
    for j, (o, d) in enumerate(zip(all_series, dets, strict=True)):
        if j == i:
            continue
        shift = (s.t0_wall_ns - o.t0_wall_ns) / 1e9
        a, b = w.start_s + shift, w.end_s + shift
        v = views[j]
        m = (v.t >= a) & (v.t < b) & v.ok & (v.e2e_ns >= 0)
        if np.count_nonzero(m) < 20 or d.baseline is None:
            out["no_data"].append(o.name)
            continue
        lat = v.e2e_ns[m] / 1e6
        overlaps = [(max(0.0, min(b, x.end_s) - max(a, x.start_s)), k) for k, x in enumerate(d.windows)]
        overlap = sum(ov for ov, _ in overlaps)
        hit = overlap >= 0.3 * (b - a)
        out["affected" if hit else "unaffected"].append(o.name)
        theirs = sorted({verdicts[j][k] for ov, k in overlaps if ov > 0})
        if hit and verdict != "inconclusive" and verdict in theirs:
            out["same_cause"].append(o.name)
        # Its baseline's p50/p99 are detection's, over the same requests the old per-call mask selected.
        out["detail"][o.name] = {
            "ratio_p50": round(float(np.percentile(lat, 50) / d.baseline.p50_ms), 3),
            "ratio_p99": round(float(np.percentile(lat, 99) / d.baseline.p99_ms), 3),
            "overlap_with_its_windows": round(overlap / (b - a), 3), "its_verdicts": theirs}
    out["confined"] = bool(out["unaffected"])
    out["cause_confined"] = verdict != "inconclusive" and len(out["same_cause"]) == 1 and (
        len(out["affected"]) + len(out["unaffected"]) > 1)
    return out


def diagnose(runs, interval_s: float | None = None, min_ratio: float | None = None,
             baseline: str | None = None, settings: Settings | None = None, progress=None,
             **selection) -> DiagnoseResult:
    """Find spike windows in ``runs`` (run files, RunData, store roots or Stores) and rank their causes.

    baseline: the span taken as normal, "T0:T1" (seconds from a series' first request), "label:NAME" or
    "run:PATH_OR_RUN_ID"; None picks it (``spikes.detect``). ValueError when it matches no run of any
    series; a series without a matching run takes the matched runs' wall-clock span or, when its requests do
    not overlap that span, the automatic baseline (``spikes.resolve_baselines``; its baseline_reason says).
    settings: the thresholds (``settings.Settings``; defaults documented there); min_ratio, when given,
    overrides its ``min_ratio``.
    progress: called as progress(done, total, name, n_requests) after each series (host) is diagnosed.
    selection: since, until, region, host, label (see ``fromstore.load_series``), for stores. A store's
    series are read one host at a time and hold no request arrays afterwards (``Series.select`` reads them)."""
    cfg = settings or DEFAULTS
    if min_ratio is not None:
        cfg = dataclasses.replace(cfg, min_ratio=min_ratio)
    min_ratio = cfg.min_ratio
    spec = parse_baseline(baseline) if baseline is not None else None
    if isinstance(runs, (str, bytes)) or not hasattr(runs, "__iter__"):
        runs = [runs]
    runs = list(runs)
    if not runs:
        raise ValueError("diagnose: expected at least one run file or store")
    store_info = None
    from . import fromstore

    if all(isinstance(r, RunData) for r in runs) and not any(v is not None for v in selection.values()):
        series = build_series(runs)
    else:
        series, store_info = fromstore.load_series(runs, **selection)
    spans = resolve_baselines(series, spec) if spec is not None else [None] * len(series)
    stores = (store_info or {}).pop("stores", [])
    grids = {id(st): fromstore.overview_grid(st) for st in stores}
    rows: dict[int, list] = {id(st): [] for st in stores}
    grid_of = lambda s: grids.get(id(s.source.store)) if s.source is not None else None  # noqa: E731

    def one(k: int):
        s = series[k]
        with _engine_errors(s):
            held = s.select(full=False)
            det = detect(held, interval_s, min_ratio, cfg.alpha, baseline=spans[k])
            grid = grid_of(s)
            row = fromstore.host_intervals(held, grid) if grid is not None else None
            count = int(held.t.size)
            del held  # before the analysis reads its ranges with every column
            full = _for_analysis(s, det)
            return det, [analyze(full, det.baseline, w, cfg) for w in det.windows], count, row

    # One series at a time per worker: a store-backed one is read (detection's columns), judged, analysed on
    # just its baseline and windows, and let go, so memory is the largest hosts', not the fleet's. Two
    # workers over a fleet: one reads (DuckDB releases the GIL) while the other judges.
    workers = int(os.environ.get("AURORA_DIAGNOSE_WORKERS", "2")) if len(series) > 1 and stores and (os.cpu_count() or 1) > 1 else 1
    results = []
    with ThreadPoolExecutor(workers) as ex:
        for k, res in enumerate(ex.map(one, range(len(series)))):
            results.append(res)
            if progress is not None:
                progress(k + 1, len(series), series[k].name, res[2])
    dets = [r[0] for r in results]
    analyses = [r[1] for r in results]
    counts = [r[2] for r in results]
    for s, r in zip(series, results, strict=True):
        if r[3] is not None:
            rows[id(s.source.store)].append(r[3])
    if store_info is not None:
        store_info["overview"] = [fromstore.fleet_overview(st, rows=rows[id(st)]) for st in stores]
    verdicts = [[an.verdict for an in row] for row in analyses]
    views = _confinement_views(series, dets) if len(series) > 1 else []
    out_series, summary = [], []
    for i, (s, det) in enumerate(zip(series, dets, strict=True)):
        windows = []
        for w, an in zip(det.windows, analyses[i], strict=True):
            entry = {**_win_dict(w), **an.as_dict()}
            if len(series) > 1:
                entry["confinement"] = _confinement(i, w, an.verdict, series, views, dets, verdicts)
            windows.append(entry)
            summary.append(_line(s.name, w, det.baseline, entry))
        if det.baseline is None:
            summary.append(f"{s.name}: no successful requests with a latency: nothing to judge")
        elif not det.windows:
            summary.append(f"{s.name}: no spike window (p50/p99 stayed within x{min_ratio} of the baseline "
                           "or the change was not significant)")
        out_series.append({
            "name": s.name,
            "runs": [_run_info(r) for r in s.runs],
            "n_requests": counts[i],
            "interval_s": round(det.interval_s, 4),
            "segments": [[round(a, 3), round(b, 3)] for a, b in det.segments],
            "baseline": _win_dict(det.baseline) if det.baseline else None,
            "baseline_reason": det.baseline_reason,
            "windows": windows,
        })
    data = {"series": out_series, "summary": summary,
            "method": {"min_ratio": min_ratio, "alpha": cfg.alpha, "claim_score": cfg.claim,
                       "settings": dataclasses.asdict(cfg)}}
    if store_info is not None:
        data["store"] = store_info
    return DiagnoseResult(data, series, dets)


def _for_analysis(s: Series, det: Detection) -> Series:
    """``s`` with every column for the baseline and the windows (what ``analyze`` reads); a store-backed
    series loads those ranges only."""
    if not det.windows:
        return s
    return s.select([(det.baseline.start_s, det.baseline.end_s)] + [(w.start_s, w.end_s) for w in det.windows])


def _run_info(r) -> dict:
    """r: a RunData, or a store segment (``store.reader.Segment``) standing in for one."""
    m = r.meta
    return {"path": str(r.path), "host": m.get("host"), "region": m.get("region"), "label": m.get("label"),
            "run_id": m.get("run_id"), "started_wall": m.get("started_wall"),
            "n_requests": getattr(r, "n_selected", r.n_requests)}


def _line(name: str, w: Window, base: Window, entry: dict) -> str:
    head = (f"{name}: spike {w.start_s:.1f}-{w.end_s:.1f} s, p99 {base.p99_ms:.1f} -> {w.p99_ms:.1f} ms "
            f"(x{w.ratio_p99:.2f}), p50 x{w.ratio_p50:.2f}")
    if entry["verdict"] == "inconclusive":
        line = f"{head}: inconclusive"
    else:
        top = entry["causes"][0]
        line = f"{head}: {top['title']} (score {top['score']:.2f}): {top['summary']}"
    conf = entry.get("confinement")
    if conf:
        if conf["confined"]:
            line += f" [spike confined to {', '.join(conf['affected'])}; not on {', '.join(conf['unaffected'])}]"
        elif len(conf["affected"]) > 1:
            line += f" [spike also on {', '.join(conf['affected'][1:])}]"
        if conf["cause_confined"] and len(conf["affected"]) > 1:
            line += f" [this cause only on {name}]"
        elif len(conf["same_cause"]) > 1:
            line += f" [same cause on {', '.join(conf['same_cause'][1:])}]"
    return line


def compare(before, after, **kw):
    from .compare import compare as _compare

    return _compare(before, after, **kw)
