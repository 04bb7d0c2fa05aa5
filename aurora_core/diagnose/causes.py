"""Rank the causes of one spike window against the baseline, each with numeric evidence.

Method
------
1. **Where the extra latency went.** Over the slower half of requests in each range (latency >= that
   range's median: tail-weighted, and means over one set of requests stay additive), the mean latency
   splits exactly into wait (batcher queue and hand-offs), each service stage and linked user spans.
   Compute time per batch is split into a per-item part (compute / padded batch) and a batching part
   (bigger batches under load), which counts with wait. Each component's increase, as a share of the
   summed increases, is its **share**.
2. **Load versus slowdown in the wait.** Utilisation is arrival rate x per-item service time, so the
   rise in wait is split between load and slowdown in proportion to log(rate ratio) and log(service
   ratio) (positive parts only). When the rate rose, other processes took no more CPU and this
   process's CPU time per request did not rise, the service ratio is taken from CPU time per request:
   wall-clock stretch then is our own threads queueing for the cores, a load effect.
3. **Evidence strength** per cause, from indicators with documented thresholds (below): 1 when a
   primary indicator crosses its threshold, 0.5 when only supporting ones do, else 0.
4. **Score** = share the cause can act through x strength. The top cause is claimed only when its
   score is >= ``CLAIM`` (0.3): it explains at least 30% of the extra latency with full evidence.
   Otherwise the verdict is "inconclusive", listing every check made.

Thresholds (window minus baseline unless said; the defaults of ``settings.Settings``, where each can be set)
------------------------------------------------------------------------------------------------------------
load         arrival rate >= +5% and z >= 3 in a two-sample Poisson test (the baseline's count is a sample
             too: binomial split of both ranges' arrivals by their durations) (primary). When the runs
             carry the offered load (offered_rate_per_s, offered_schedule), offered >= +5% decides instead. Cross-check: Kingman's G/G/1 wait
             ratio rho/(1-rho)*S between the ranges, rho = the busier pipeline thread's measured busy
             fraction (compute thread or batch-forming thread); the variability factor cancels when the
             traffic shape is the same. Consistent when observed/predicted is within x3, or rho >= 0.95.
             Inconsistent halves the strength.
regression   a stage's per-item service time >= +15% with one-sided Mann-Whitney p < 1e-3, and the
             label/config/model/versions of the runs covering the window differ from the baseline's.
             It explains the shifted stages' stage-specific slowdown; with no outside cause in evidence
             (neighbours' CPU, steal, cgroup quota, GPU, memory) also the part common to all stages,
             which is then the new code saturating the process.
             Load matched (rate within +-10%) gives strength 1, unmatched 0.5. No change of
             label/config: no regression claim (the shift is reported under "checked").
cpu          other processes' CPU (cpu_util_pct x cores - proc_cpu_pct, in cores) >= +0.5 core; per-item
             service >= +15% while it stretches >= 1.3x more than this process's CPU time per request
             (the work did not grow, the wait to run did: this still works when the host was already
             saturated before; only at flat load, since more load makes our own threads contend; with
             CPU time per request flat and no deployment in the window it also claims the
             stage-specific part of the slowdown);
             steal >= +5 points; cgroup_throttled_frac >= +0.05 (primary; 0 in a baseline with no quota in
             force, so a quota set while running counts; cgroup reads without a quota count as 0), with
             the quota in cores (cgroup_quota_cores, and the quota-change and cgroup-move events) named
             beside it; a quota set or lowered and then hit claims the whole stage slowdown; runq above
             the core count and >= +1, psi_cpu_some_avg10 >= +10 (supporting: our own threads raise
             them too).
hardware     per GPU: any throttle_frac_* (not low_util/sync_boost) >= +0.1, sm_clock_mhz <= 0.9x
             baseline, PCIe gen/width below max only in the window, Xid events in the window (primary);
             temp_margin_c <= 5 C, power_w >= 0.97 x power_limit_w (supporting).
idle clocks  sparse traffic (median inter-arrival >= 0.5 s) with the GPU at idle clocks (idle_clocks
             >= 0.5 or sm clock <= 0.5 x max) in the window. It replaces the generic hardware cause
             when the clock drop is that cause's only primary finding.
memory       GPU mem_used / mem_total >= 0.95, swap_used_bytes >= +64 MiB, psi_mem_some_avg10 >= +10,
             OOM / allocator-retry events (primary).
dependency   a linked user span's mean time >= +15% with Mann-Whitney p < 1e-3 (strength 1; 0.7 when the
             pipeline's own service stages also rose by more than the span).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from aurora_core.records import coverage_cap

from .settings import DEFAULTS, Settings
from .spikes import SERVICE_STAGES, Series, Window, greater_p

CLAIM = DEFAULTS.claim
_EXTERNAL_CPU = ("other processes' CPU", "cpu.steal_pct", "cpu.cgroup_throttled_frac")  # and the quota's
STAGE_SHIFT = DEFAULTS.stage_shift
LOAD_RATE_UP = DEFAULTS.load_rate_up
LOAD_Z = DEFAULTS.load_z
MATCHED_RATE = DEFAULTS.matched_rate
GPU_STAGES = ("h2d", "compute", "d2h")
_THROTTLE_REASONS = ("thermal", "power", "hw_slowdown", "hw_thermal", "power_brake", "board_limit",
                     "reliability")


@dataclass
class Evidence:
    name: str
    baseline: float | None
    window: float | None
    unit: str
    threshold: str
    passed: bool
    primary: bool = True

    def as_dict(self) -> dict:
        return {"name": self.name, "baseline": _r(self.baseline), "window": _r(self.window),
                "unit": self.unit, "threshold": self.threshold, "passed": self.passed,
                "primary": self.primary}


@dataclass
class Cause:
    cause: str           # load | regression | cpu_contention | hardware | hardware_idle_clocks | memory | dependency
    title: str
    score: float
    share: float
    strength: float
    summary: str
    evidence: list[Evidence] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"cause": self.cause, "title": self.title, "score": round(self.score, 3),
                "share": round(self.share, 3), "strength": self.strength, "summary": self.summary,
                "evidence": [e.as_dict() for e in self.evidence]}


def _r(x):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), 4)


def _strength(ev: list[Evidence]) -> float:
    if any(e.passed and e.primary for e in ev):
        return 1.0
    return 0.5 if any(e.passed for e in ev) else 0.0


# --------------------------------------------------------------------------------------------------
# Range statistics
# --------------------------------------------------------------------------------------------------
@dataclass
class Range:
    a: float
    b: float
    n_arrivals: int
    rate: float
    comp: dict[str, float]        # mean ns per component over the slower half
    item_service_ns: float        # mean per-request service with compute per item
    stage_item: dict[str, np.ndarray]  # per-request per-item service (ns) per stage, ok requests
    spans: dict[str, np.ndarray]
    busy: float                   # busier pipeline thread's busy fraction
    wait_ns: float
    queue_depth: float
    median_gap_s: float


def _busy(series: Series, a: float, b: float, sel: slice) -> float:
    """Busy fraction of the compute thread and of the batch-forming thread (one interval per batch)."""
    best = 0.0
    for iv in (series.compute_s[sel], series.form_s[sel]):
        m = ~np.isnan(iv[:, 0]) & (series.batch[sel] >= 0)
        if not np.any(m):
            continue
        keys = series.batch[sel][m]
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        del keys  # one column at a time below: a day's baseline is millions of requests
        first = np.minimum.reduceat(iv[:, 0][m][order], starts)
        last = np.maximum.reduceat(iv[:, 1][m][order], starts)
        busy = np.clip(np.minimum(last, b) - np.maximum(first, a), 0, None).sum()
        best = max(best, float(busy) / max(active_s(series, a, b), 1e-9))
    return min(best, 1.0)


def active_s(series: Series, a: float, b: float) -> float:
    """Seconds of [a, b) covered by some run: the gap between two runs of a host is not idle traffic."""
    return sum(max(0.0, min(b, r1) - max(a, r0)) for r0, r1 in series.run_bounds if r0 == r0)


def range_stats(series: Series, a: float, b: float) -> Range:
    # Arrivals are sorted, so the range is a slice: views, where masks copied a day-long series a dozen times.
    lo, hi = (int(x) for x in np.searchsorted(series.t, [a, b]))
    inr = slice(lo, hi)
    n_arr = hi - lo
    dur = max(active_s(series, a, b), 1e-9)
    ok = series.ok[inr] & (series.e2e_ns[inr] >= 0)
    e2e_all = series.e2e_ns[inr]
    e2e = e2e_all[ok]
    slow = np.zeros_like(ok)
    if e2e.size:
        slow[ok] = e2e >= np.median(e2e)
    bucket = series.bucket[inr]
    wait = series.wait_ns[inr]
    comp: dict[str, float] = {}
    any_slow = bool(np.any(slow))
    if any_slow:
        comp["e2e"] = float(e2e_all[slow].mean())
        comp["wait"] = float(wait[slow].mean())
    stage_item, service = {}, np.zeros(n_arr)
    for s in SERVICE_STAGES:  # one stage at a time: the peak is a few arrays of the range, not a dozen
        v = np.maximum(series.stage_ns[s][inr], 0)
        item = v / bucket if s == "compute" else v.astype(np.float64)
        if any_slow:
            comp[s] = float(v[slow].mean())
            comp[f"{s}_item"] = float(item[slow].mean())
        service += item
        stage_item[s] = item[ok]
    spans = {n: v[inr] for n, v in series.span_ns.items()}
    if any_slow:
        comp["bucket"] = float(bucket[slow].mean())
        for n, v in spans.items():
            comp[f"span:{n}"] = float(v[slow].mean())
    item_service_ns = float(service[ok].mean()) if np.any(ok) else math.nan
    del service
    gaps = np.diff(series.t[inr])
    median_gap_s = float(np.median(gaps)) if gaps.size else math.inf
    del gaps
    return Range(
        a=a, b=b, n_arrivals=n_arr, rate=n_arr / dur, comp=comp, item_service_ns=item_service_ns,
        stage_item=stage_item, spans={n: v[ok] for n, v in spans.items()}, busy=_busy(series, a, b, inr),
        wait_ns=float(wait[ok].mean()) if np.any(ok) else math.nan,
        queue_depth=float(series.queue_depth[inr].mean()) if n_arr else math.nan, median_gap_s=median_gap_s)


def _mean_in(series: Series, key, a: float, b: float) -> float | None:
    s = series.samples.get(key)
    if s is None:
        return None
    m = (s[0] >= a) & (s[0] < b)
    return float(np.mean(s[1][m])) if np.any(m) else None


def _interval_mean(series: Series, key, a: float, b: float) -> float | None:
    """Time-weighted mean over [a, b) of a metric whose sample at t covers the interval since the previous
    one: the throttled fractions, from cumulative counters read every tick or, where NVML prices them high,
    every 10th (1 s). A window shorter than that still sees the sample that covers it. A sample covers at
    most twice the series' median spacing, so a gap (between runs, a stale sampler) weighs nothing."""
    s = series.samples.get(key)
    if s is None or s[0].size == 0:
        return None
    t, v = s
    cap = coverage_cap(t.tolist())
    start = np.maximum(np.concatenate(([t[0] - cap], t[:-1])), t - cap)
    w = np.clip(np.minimum(t, b) - np.maximum(start, a), 0.0, None)
    return float(np.dot(w, v) / w.sum()) if w.sum() > 0 else _mean_in(series, key, a, b)


def _max_in(series: Series, key, a: float, b: float) -> float | None:
    s = series.samples.get(key)
    if s is None:
        return None
    m = (s[0] >= a) & (s[0] < b)
    return float(np.max(s[1][m])) if np.any(m) else None


def _min_in(series: Series, key, a: float, b: float) -> float | None:
    s = series.samples.get(key)
    if s is None:
        return None
    m = (s[0] >= a) & (s[0] < b)
    return float(np.min(s[1][m])) if np.any(m) else None


def _delta_ev(series, base, win, source, metric, thr, unit, primary=True, label=None, mean=_mean_in) -> Evidence | None:
    vb = mean(series, (source, metric), base.a, base.b)
    vw = mean(series, (source, metric), win.a, win.b)
    if vb is None or vw is None:
        return None
    return Evidence(label or f"{source}.{metric}", vb, vw, unit, f"window - baseline >= {thr}",
                    vw - vb >= thr, primary)


# --------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------
@dataclass
class Analysis:
    causes: list[Cause]
    verdict: str
    checked: list[str]
    shares: dict[str, float]
    baseline: dict
    window: dict
    answers: dict = field(default_factory=dict)  # the report's four questions (``_answers``)

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "causes": [c.as_dict() for c in self.causes],
                "checked": self.checked, "shares": {k: round(v, 3) for k, v in self.shares.items()},
                "baseline": self.baseline, "window": self.window, "answers": self.answers}


def _summary_range(r: Range) -> dict:
    return {"start_s": round(r.a, 3), "end_s": round(r.b, 3), "arrival_rate_per_s": _r(r.rate),
            "mean_wait_ms": _r(r.wait_ns / 1e6), "item_service_ms": _r(r.item_service_ns / 1e6),
            "busy_frac": _r(r.busy), "queue_depth": _r(r.queue_depth)}


def analyze(series: Series, baseline: Window, window: Window, cfg: Settings = DEFAULTS) -> Analysis:
    base = range_stats(series, baseline.start_s, baseline.end_s)
    win = range_stats(series, window.start_s, window.end_s)
    checked: list[str] = []

    # 1. shares of the extra latency
    d = {}
    if base.comp and win.comp:
        # compute = bucket * per-item: per-item change at the window's batch size is service; the rest
        # (bigger batches) is a load effect, counted with wait.
        d_item = win.comp["bucket"] * (win.comp["compute_item"] - base.comp["compute_item"])
        d_compute = win.comp["compute"] - base.comp["compute"]
        d["wait"] = win.comp["wait"] - base.comp["wait"] + (d_compute - d_item)
        for s in SERVICE_STAGES:
            d[s] = d_item if s == "compute" else win.comp[s] - base.comp[s]
        for n in series.span_ns:
            d[f"span:{n}"] = win.comp[f"span:{n}"] - base.comp[f"span:{n}"]
    pos = {k: max(v, 0.0) for k, v in d.items()}
    tot = sum(pos.values())
    shares = {k: (v / tot if tot > 0 else 0.0) for k, v in pos.items()}
    if tot <= 0:
        checked.append("no component of the latency rose on average over the slower half of requests")

    # 2. load versus slowdown in the wait
    rate_ratio = win.rate / base.rate if base.rate > 0 else math.inf
    s_ratio = win.item_service_ns / base.item_service_ns if base.item_service_ns > 0 else 1.0
    rose, z = load_rose(series, base, win, cfg)
    work_ratio, work_note = _work_ratio(series, base, win, rose, s_ratio, cfg)
    lr, ls = max(math.log(rate_ratio), 0.0) if math.isfinite(rate_ratio) else 1.0, max(math.log(work_ratio), 0.0)
    f_load = lr / (lr + ls) if lr + ls > 0 else 0.0
    wait_share = shares.get("wait", 0.0)
    stage_pos = {s: pos.get(s, 0.0) for s in SERVICE_STAGES}
    stage_tot = sum(stage_pos.values())
    common = _common_fraction(base, win)

    def part(stages, frac) -> float:
        d_st = sum(stage_pos[s] * frac(s) for s in stages)
        return (d_st / tot if tot > 0 else 0.0) + (1 - f_load) * wait_share * (d_st / stage_tot if stage_tot else 0.0)

    def slowdown_share(stages) -> float:  # every increase of these stages
        return part(stages, lambda s: 1.0)

    def specific_share(stages) -> float:  # what a common slowdown factor does not explain
        return part(stages, lambda s: 1.0 - common[s])

    common_share = part(SERVICE_STAGES, lambda s: common[s])

    load = _load(series, base, win, rose, z, rate_ratio, s_ratio, f_load * wait_share, checked, work_note, cfg)
    cpu = _cpu(series, base, win, rose, common_share, slowdown_share(SERVICE_STAGES), checked, cfg)
    hw = _hardware(series, base, win, slowdown_share(GPU_STAGES), checked, cfg)
    mem = _memory(series, base, win, slowdown_share(SERVICE_STAGES), checked, cfg)
    # With no outside cause in evidence (neighbours' CPU, steal, cgroup quota, GPU, memory), a slowdown
    # common to every stage after a deployment is the new code saturating the process: the regression
    # then takes it too, not only its stage-specific part.
    external = (cpu is not None and any(e.passed and (e.name in _EXTERNAL_CPU or e.name.startswith("cgroup CPU quota"))
                                        for e in cpu.evidence)) or any(
        c is not None and c.strength >= 1 for c in (*hw, mem))
    reg = _regression(series, base, win, rate_ratio, specific_share if external else slowdown_share, checked, cfg)
    spans: dict[str, dict] = {}
    causes = [load, reg, cpu, *hw, mem, _dependency(series, base, win, shares, checked, spans, cfg)]
    causes = sorted([c for c in causes if c is not None and c.strength > 0], key=lambda c: -c.score)
    verdict = causes[0].cause if causes and causes[0].score >= cfg.claim else "inconclusive"
    if verdict == "inconclusive":
        top = max(shares, key=shares.get) if tot > 0 else None
        if top:
            checked.append(f"largest part of the extra latency: {top} ({shares[top]:.0%}); "
                           f"no cause reached a score of {cfg.claim}")
    answers = {
        "deployment": {k: [_short(a), _short(b)] for k, (a, b) in deployment_change(series, base, win).items()},
        "load": {"rose": rose, "rate_ratio": _r(rate_ratio), "z": _r(z), "baseline_per_s": _r(base.rate),
                 "window_per_s": _r(win.rate), "offered_per_s": [_r(offered_rate(series, base)),
                                                                 _r(offered_rate(series, win))]},
        "dependency": spans,
    }
    return Analysis(causes, verdict, checked, shares, _summary_range(base), _summary_range(win), answers)


def _common_fraction(base: Range, win: Range) -> dict[str, float]:
    """Per stage, the fraction of its increase that a slowdown common to all stages explains.

    Contention and memory pressure slow every CPU stage alike; a regression slows one. The common
    factor is the median of the per-item stage ratios (stages taking >= 1% of the baseline service
    time), so one regressed stage does not move it."""
    ratios = {}
    base_total = sum(base.comp.get(f"{s}_item", 0.0) for s in SERVICE_STAGES)
    for s in SERVICE_STAGES:
        b, w = base.comp.get(f"{s}_item", 0.0), win.comp.get(f"{s}_item", 0.0)
        if base_total > 0 and b >= 0.01 * base_total:
            ratios[s] = w / b
    u = float(np.median(list(ratios.values()))) if ratios else 1.0
    return {s: ((min(ratios[s], u) - 1) / (ratios[s] - 1) if s in ratios and ratios[s] > 1 and u > 1 else 0.0)
            for s in SERVICE_STAGES}


def load_rose(series: Series, base: Range, win: Range, cfg: Settings = DEFAULTS) -> tuple[bool, float]:
    """Did the load rise from base to win? Returns (rose, z).

    When the runs say what load was offered (``offered_rate_per_s``, or ``offered_schedule`` from a step
    scenario), that decides: offered x``load_rate_up`` or more rose, anything less did not, whatever the
    arrivals did (a Poisson burst of a steady issuer is not a load change). Otherwise the measured arrival
    rate must be up by ``load_rate_up`` and beyond the Poisson noise of both ranges (z >= ``load_z``):
    given the n_b + n_w arrivals of both ranges, equal rates put each in the window with probability
    T_w / (T_b + T_w), so n_w is binomial; z is its standard score. A short baseline's own count is then as
    uncertain as it is (a 5.5 s baseline at 35.5/s against an 11 s window at 41.4/s is z = 1.8 here;
    taking the baseline's rate as exact gave 3.3)."""
    tb, tw = active_s(series, base.a, base.b), active_s(series, win.a, win.b)
    n = base.n_arrivals + win.n_arrivals
    z = 0.0
    if tb > 0 and tw > 0 and n > 0:
        p = tw / (tb + tw)
        z = (win.n_arrivals - n * p) / math.sqrt(n * p * (1 - p))
    ob, ow = offered_rate(series, base), offered_rate(series, win)
    if ob and ow:
        return bool(ow / ob >= cfg.load_rate_up), z
    ratio = win.rate / base.rate if base.rate > 0 else math.inf
    return bool(ratio >= cfg.load_rate_up and z >= cfg.load_z), z


def offered_rate(series: Series, r: Range) -> float | None:
    """The mean offered rate over [r.a, r.b) from the covering runs' meta: ``offered_rate_per_s`` (steady),
    or ``offered_schedule`` [[t_s, rate], ...] (t from the run's first arrival). None when a covering run
    says nothing."""
    total = dur = 0.0
    for i, (r0, r1) in enumerate(series.run_bounds):
        a, b = max(r.a, r0), min(r.b, r1)
        if not b > a:
            continue
        m = series.runs[i].meta
        steps = m.get("offered_schedule")
        if not steps and isinstance(m.get("offered_rate_per_s"), int | float):
            steps = [[0.0, float(m["offered_rate_per_s"])]]
        try:
            steps = sorted((float(t), float(x)) for t, x in steps or ())
        except (TypeError, ValueError):
            steps = []
        if not steps:
            return None
        for k, (t, x) in enumerate(steps):
            lo, hi = r0 + t, (r0 + steps[k + 1][0]) if k + 1 < len(steps) else math.inf
            part = max(0.0, min(b, hi) - max(a, lo))
            total, dur = total + part * x, dur + part
    return total / dur if dur > 0 else None


def _cpu_per_request(series: Series, r: Range) -> float | None:
    own = _mean_in(series, ("cpu", "proc_cpu_pct"), r.a, r.b)
    n = _n_ok(series, r)
    return own / 100 * active_s(series, r.a, r.b) / n if own is not None and n else None


def _other_cores(series: Series, r: Range) -> float | None:
    util, own = _mean_in(series, ("cpu", "cpu_util_pct"), r.a, r.b), _mean_in(series, ("cpu", "proc_cpu_pct"), r.a, r.b)
    return None if util is None or own is None else max(util / 100 * series.cores - own / 100, 0.0)


def _work_ratio(series, base: Range, win: Range, rose: bool, s_ratio, cfg: Settings = DEFAULTS) -> tuple[float, str]:
    """The service ratio used to split wait between load and slowdown.

    When the load rose, other processes took no more CPU, and this process's CPU time per request did
    not rise, the stretched wall-clock service is our own threads waiting for the cores: a load effect.
    Then the work per request is measured by CPU time per request instead of wall-clock service."""
    cb, cw = _cpu_per_request(series, base), _cpu_per_request(series, win)
    ob, ow = _other_cores(series, base), _other_cores(series, win)
    if not rose or None in (cb, cw, ob, ow) or not cb or ow - ob >= cfg.others_cores_more:
        return s_ratio, ""
    return cw / cb, f"; CPU time per request {cb * 1e3:.2f} -> {cw * 1e3:.2f} ms (work per request x{cw / cb:.2f})"


def _load(series, base: Range, win: Range, rose: bool, z: float, rate_ratio, s_ratio, share, checked,
          work_note="", cfg: Settings = DEFAULTS) -> Cause | None:
    """rose, z: ``load_rose`` of (base, win)."""
    ob, ow = offered_rate(series, base), offered_rate(series, win)
    if ob and ow:
        ev = [Evidence("offered rate (run meta)", ob, ow, "req/s", f"x{cfg.load_rate_up} (it decides: measured "
                       f"arrivals {base.rate:.1f} -> {win.rate:.1f}/s, z={z:.1f}, vary by Poisson noise)", rose)]
    else:
        ev = [Evidence("arrival rate", base.rate, win.rate, "req/s",
                       f"x{cfg.load_rate_up} and two-sample Poisson z >= {cfg.load_z} (z={z:.1f})", rose)]
    ev.append(Evidence("per-item service time", base.item_service_ns / 1e6, win.item_service_ns / 1e6,
                       "ms", f"flat: within +{cfg.stage_shift - 1:.0%}", s_ratio < cfg.stage_shift, primary=False))
    ev.append(Evidence("mean wait", base.wait_ns / 1e6, win.wait_ns / 1e6, "ms", "rises", win.wait_ns > base.wait_ns,
                       primary=False))
    ev.append(Evidence("queue depth at arrival", base.queue_depth, win.queue_depth, "requests", "rises",
                       win.queue_depth > base.queue_depth, primary=False))

    def kingman(r: Range) -> float:
        rho = min(r.busy, 0.99)
        return rho / (1 - rho) * r.item_service_ns

    pred = kingman(win) / kingman(base) if kingman(base) > 0 else math.inf
    obs = win.wait_ns / base.wait_ns if base.wait_ns > 0 else math.inf
    k = cfg.kingman_within
    consistent = win.busy >= cfg.saturated_busy or (math.isfinite(pred) and pred > 0 and 1 / k <= obs / pred <= k)
    ev.append(Evidence("pipeline busy fraction (bottleneck thread)", base.busy, win.busy, "",
                       f">= {cfg.saturated_busy} saturated, or Kingman wait ratio within x{k:g} of observed "
                       f"(predicted x{pred:.2f}, observed x{obs:.2f})", consistent, primary=False))
    strength = 1.0 if ev[0].passed else 0.0
    if strength and not consistent:
        strength = 0.5
    summary = (f"arrival rate {base.rate:.1f} -> {win.rate:.1f}/s ({rate_ratio - 1:+.0%}), mean wait "
               f"{base.wait_ns / 1e6:.2f} -> {win.wait_ns / 1e6:.2f} ms, per-item service {s_ratio - 1:+.0%}, "
               f"busy {base.busy:.2f} -> {win.busy:.2f} (Kingman predicts wait x{pred:.2f}, observed x{obs:.2f})"
               f"{work_note}")
    checked.append(f"load: {summary}")
    return Cause("load", "Load / queueing", share * strength, share, strength, summary, ev)


def _dominant_run(series: Series, r: Range) -> int:
    m = (series.t >= r.a) & (series.t < r.b)
    if not np.any(m):
        return 0
    return int(np.bincount(series.run_idx[m]).argmax())


def deployment_change(series: Series, base: Range, win: Range) -> dict:
    """label/config/model/versions that differ between the runs covering the baseline and the window."""
    fb, fw = series.fingerprint(_dominant_run(series, base)), series.fingerprint(_dominant_run(series, win))
    return {k: (fb[k], fw[k]) for k in fb if fb[k] != fw[k]}


def _regression(series, base: Range, win: Range, rate_ratio, slowdown_share, checked, cfg: Settings = DEFAULTS) -> Cause | None:
    shifted, ev = [], []
    for s in SERVICE_STAGES:
        b, w = base.stage_item[s], win.stage_item[s]
        b, w = b[b > 0], w[w > 0]
        if b.size < 3 or w.size < 3:
            continue
        ratio = float(w.mean() / b.mean())
        p = greater_p(w, b)
        hit = ratio >= cfg.stage_shift and p < cfg.alpha
        ev.append(Evidence(f"{s} per-item service time", float(b.mean() / 1e6), float(w.mean() / 1e6), "ms",
                           f"x{cfg.stage_shift} and Mann-Whitney p < {cfg.alpha} (p={p:.1e})", hit, primary=False))
        if hit:
            shifted.append((s, ratio))
    changed = deployment_change(series, base, win)
    what = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in changed.items())
    ev.append(Evidence(f"deployment change ({what or 'none'})", None, None, "",
                       "label/config/model/versions differ between baseline and window runs", bool(changed)))
    matched = abs(rate_ratio - 1) <= cfg.matched_rate
    ev.append(Evidence("load matched (arrival rate)", base.rate, win.rate, "req/s",
                       f"within +-{cfg.matched_rate:.0%}", matched, primary=False))
    stages = [s for s, _ in shifted]
    desc = ", ".join(f"{s} x{r:.2f}" for s, r in shifted) or "none"
    if changed:
        checked.append(f"regression: stages shifted: {desc}; change: {what}")
    else:
        checked.append(f"regression: stages shifted: {desc}; no label/config/model/version change between "
                       "baseline and window, so no regression is claimed")
    strength = (1.0 if matched else 0.5) if (shifted and changed) else 0.0
    share = slowdown_share(stages) if stages else 0.0
    summary = f"service time shifted in {desc}"
    if changed:
        summary += f", lined up with {', '.join(changed)} change " + "; ".join(
            f"{_short(a)} -> {_short(b)}" for a, b in changed.values())
    if not matched:
        summary += f" (load not matched: rate x{rate_ratio:.2f})"
    return Cause("regression", "Code / config regression", share * strength, share, strength, summary, ev)


def _short(v) -> str:
    s = v if isinstance(v, str) else str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _cpu(series, base: Range, win: Range, rose: bool, share, full_share, checked, cfg: Settings = DEFAULTS) -> Cause | None:
    """share: the part of the slowdown common to all stages. When service stretched while the CPU time
    per request stayed flat (< x1.15), no stage did more work, so every stage's slowdown is waiting to
    run: ``full_share``. (A regression adds work: CPU per request rises with it.) rose: ``load_rose``
    of (base, win)."""
    ev: list[Evidence] = []
    cores = series.cores
    util = ("cpu", "cpu_util_pct")
    own = ("cpu", "proc_cpu_pct")
    ub, uw = _mean_in(series, util, base.a, base.b), _mean_in(series, util, win.a, win.b)
    ob, ow = _mean_in(series, own, base.a, base.b), _mean_in(series, own, win.a, win.b)
    if None not in (ub, uw, ob, ow):
        other_b = max(ub / 100 * cores - ob / 100, 0.0)
        other_w = max(uw / 100 * cores - ow / 100, 0.0)
        ev.append(Evidence("other processes' CPU", other_b, other_w, "cores",
                           f"window - baseline >= {cfg.others_cores_more}", other_w - other_b >= cfg.others_cores_more))
    if ob is not None and ow is not None:
        # Wall-clock service per request against CPU time per request: when service stretches but the
        # CPU it burns does not, the threads were runnable and waiting (or the CPU was taken from them).
        nb, nw = _n_ok(series, base), _n_ok(series, win)
        # With more load our own threads contend among themselves, so stretch only counts at flat load.
        if nb and nw and base.item_service_ns > 0 and not rose:
            cpu_b = ob / 100 * active_s(series, base.a, base.b) / nb
            cpu_w = ow / 100 * active_s(series, win.a, win.b) / nw
            svc = win.item_service_ns / base.item_service_ns
            stretch = svc / (cpu_w / cpu_b) if cpu_b > 0 and cpu_w > 0 else 1.0
            hit = svc >= cfg.stage_shift and stretch >= cfg.cpu_stretch
            # New code can itself make the process wait (locks, thread pools, saturating its CPU share),
            # so with a deployment in the window the stretch does not single out neighbours: it is then
            # supporting evidence only, and claims the common part of the slowdown only.
            deployed = bool(deployment_change(series, base, win))
            ev.append(Evidence("service time / own CPU time per request", 1.0, stretch, "x",
                               f">= {cfg.cpu_stretch} with service >= x{cfg.stage_shift} (service x{svc:.2f}, CPU/request "
                               f"{cpu_b * 1e3:.2f} -> {cpu_w * 1e3:.2f} ms)", hit, primary=not deployed))
            if hit and cpu_b > 0 and cpu_w / cpu_b < cfg.stage_shift and not deployed:
                share = max(share, full_share)
    for metric, thr, unit, primary in (("steal_pct", cfg.steal_more, "%", True),
                                       ("psi_cpu_some_avg10", cfg.psi_cpu_more, "%", False)):
        e = _delta_ev(series, base, win, "cpu", metric, thr, unit, primary)
        if e:
            ev.append(e)
    cg = _cgroup_quota(series, base, win, cfg)
    ev += cg
    if len(cg) == 2 and cg[1].passed:
        # The quota was set or lowered and the process then hit it: its threads were stopped by the kernel,
        # so every stretched stage's slowdown is waiting (the CPU per request may still rise a little:
        # cold caches after each throttled period).
        share = max(share, full_share)
    rb, rw = _mean_in(series, ("cpu", "runq"), base.a, base.b), _mean_in(series, ("cpu", "runq"), win.a, win.b)
    if rb is not None and rw is not None:
        ev.append(Evidence("cpu.runq", rb, rw, "tasks", f"> {cores} cores and window - baseline >= 1",
                           rw > cores and rw - rb >= 1, primary=False))
    if not ev:
        checked.append("cpu contention: no CPU telemetry in the run")
        return None
    strength = _strength(ev)
    fired = [e for e in ev if e.passed]
    summary = ", ".join(f"{e.name} {_fmt(e.baseline)} -> {_fmt(e.window)} {e.unit}".strip() for e in fired) or "none"
    checked.append(f"cpu contention: {summary if fired else 'no indicator crossed its threshold'}")
    return Cause("cpu_contention", "CPU contention", share * strength, share, strength,
                 f"{summary}; service stages explain {share:.0%} of the extra latency", ev)


def _cgroup_quota(series, base: Range, win: Range, cfg: Settings = DEFAULTS) -> list[Evidence]:
    """Throttling by the cgroup's CPU quota, and the quota itself in cores. A quota set or lowered while
    the process ran shows as a throttled fraction in the window only: the baseline, with no quota in force,
    was throttled for none of its time (0, not unknown)."""
    qkey = ("cpu", "cgroup_quota_cores")
    tw, under_w = _throttled_reads(series, win)
    if tw is None or not under_w:
        return []
    tb, under_b = _throttled_reads(series, base)
    tb = 0.0 if tb is None and _mean_in(series, qkey, base.a, base.b) is None else tb
    if tb is None:
        return []
    throttled = tw - tb >= cfg.cgroup_throttled_more
    out = [Evidence("cpu.cgroup_throttled_frac", tb, tw, "", f"window - baseline >= {cfg.cgroup_throttled_more}",
                    throttled)]
    qb, qw = _mean_in(series, qkey, base.a, base.b), _mean_in(series, qkey, win.a, win.b)
    # The window's edges lag a change by up to an interval, so the baseline may hold a few reads under the
    # window's quota: its quota is the one in force for most of it (unlimited when most reads had none).
    if qb is not None and under_b < 0.5:
        qb = None
    if qw is not None:
        changes = [e["detail"] for e in series.events if e["kind"] in ("cgroup_quota_change", "cgroup_move")
                   and min(base.a, win.a) <= e["t"] < win.b]  # the baseline may follow the window
        out.append(Evidence(f"cgroup CPU quota ({qb if qb is not None else 'unlimited'} -> {qw:g} cores"
                            + (f"; {'; '.join(changes)}" if changes else "") + ")", qb, qw, "cores",
                            "lower in the window (or set only there) while the throttled fraction rose",
                            throttled and (qb is None or qw < qb)))
    return out


def _throttled_reads(series, r: Range) -> tuple[float | None, float]:
    """The cgroup's throttled fraction over r, and the share of r's cgroup reads under a quota. The
    fraction is recorded only while a quota is in force; a cgroup read (cgroup_nr_throttled, every tick)
    without it was throttled for none of that tick, so it counts as 0: a quota set near the end of the
    baseline does not make the whole baseline look throttled."""
    s, reads = series.samples.get(("cpu", "cgroup_throttled_frac")), series.samples.get(("cpu", "cgroup_nr_throttled"))
    if s is None:
        return None, 0.0
    m = (s[0] >= r.a) & (s[0] < r.b)
    k = int(np.count_nonzero(m))
    n = max(k, int(np.count_nonzero((reads[0] >= r.a) & (reads[0] < r.b))) if reads is not None else 0)
    return (float(np.sum(s[1][m])) / n, k / n) if n else (None, 0.0)


def _n_ok(series: Series, r: Range) -> int:
    return int(np.count_nonzero((series.t >= r.a) & (series.t < r.b) & series.ok))


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"


def _gpu_sources(series: Series) -> list[str]:
    return sorted({s for s, _ in series.samples if s.startswith("gpu")})


def _hardware(series, base: Range, win: Range, share, checked, cfg: Settings = DEFAULTS) -> list[Cause]:
    out = []
    gpus = _gpu_sources(series)
    if not gpus:
        checked.append("hardware: no GPU telemetry in the run")
        return out
    for g in gpus:
        ev: list[Evidence] = []
        for reason in _THROTTLE_REASONS:
            e = _delta_ev(series, base, win, g, f"throttle_frac_{reason}", cfg.throttled_more, "of time",
                          label=f"{g} throttled ({reason})", mean=_interval_mean)
            if e:
                ev.append(e)
        cb, cw = _mean_in(series, (g, "sm_clock_mhz"), base.a, base.b), _mean_in(series, (g, "sm_clock_mhz"), win.a, win.b)
        if cb and cw is not None:
            ev.append(Evidence(f"{g} SM clock", cb, cw, "MHz", f"window <= {cfg.sm_clock_ratio} x baseline",
                               cw <= cfg.sm_clock_ratio * cb))
        tm = _min_in(series, (g, "temp_margin_c"), win.a, win.b)
        if tm is not None:
            tb = _min_in(series, (g, "temp_margin_c"), base.a, base.b)
            ev.append(Evidence(f"{g} temperature margin (min)", tb, tm, "C", f"<= {cfg.temp_margin_c:g} C",
                               tm <= cfg.temp_margin_c, primary=False))
        pw, pl = _max_in(series, (g, "power_w"), win.a, win.b), _mean_in(series, (g, "power_limit_w"), win.a, win.b)
        if pw is not None and pl:
            pb = _max_in(series, (g, "power_w"), base.a, base.b)
            ev.append(Evidence(f"{g} power vs limit (max)", pb / pl if pb else None, pw / pl, "x limit",
                               f">= {cfg.power_of_limit}", pw / pl >= cfg.power_of_limit, primary=False))
        for kind in ("gen", "width"):
            cur, mx = (g, f"pcie_{kind}"), (g, f"pcie_{kind}_max")
            cw_, mw = _min_in(series, cur, win.a, win.b), _mean_in(series, mx, win.a, win.b)
            cb_ = _min_in(series, cur, base.a, base.b)
            if cw_ is not None and mw:
                down = cw_ < mw and (cb_ is None or cb_ >= mw)
                ev.append(Evidence(f"{g} PCIe {kind} (min)", cb_, cw_, f"of max {mw:g}",
                                   "below max only in the window", down))
        xids = [e for e in series.events if e["source"] == g and e["kind"] == "xid" and win.a <= e["t"] < win.b]
        ev.append(Evidence(f"{g} Xid events", None, float(len(xids)), "events", ">= 1", bool(xids)))
        strength = _strength(ev)
        fired = [e for e in ev if e.passed]
        summary = ", ".join(f"{e.name} {_fmt(e.baseline)} -> {_fmt(e.window)} {e.unit}".strip() for e in fired)
        checked.append(f"hardware {g}: {summary or 'no indicator crossed its threshold'}")
        idle = _idle_clocks(series, g, win, share, cfg)
        # Idling lowers the clock by design: when the idle case holds and the clock drop is the only
        # primary finding, the generic "hardware-bound" reading would name the same thing less exactly.
        clock_only = [e.name for e in ev if e.passed and e.primary] == [f"{g} SM clock"]
        if strength and not (idle and clock_only):
            out.append(Cause("hardware", f"Hardware-bound ({g})", share * strength, share, strength,
                             f"{summary}; GPU-side stages explain {share:.0%} of the extra latency", ev))
        if idle:
            checked.append(f"idle clocks {g}: {idle.summary}")
            out.append(idle)
    return out


def _idle_clocks(series, g, win: Range, share, cfg: Settings = DEFAULTS) -> Cause | None:
    if win.median_gap_s < cfg.idle_gap_s:
        return None
    ic = _mean_in(series, (g, "idle_clocks"), win.a, win.b)
    clk, mx = _mean_in(series, (g, "sm_clock_mhz"), win.a, win.b), _mean_in(series, (g, "sm_clock_max_mhz"), win.a, win.b)
    ev = [Evidence("median inter-arrival", None, win.median_gap_s, "s", f">= {cfg.idle_gap_s} (sparse traffic)", True)]
    if ic is not None:
        ev.append(Evidence(f"{g} idle clocks", None, ic, "fraction", f">= {cfg.idle_clock_ratio}", ic >= cfg.idle_clock_ratio))
    if clk is not None and mx:
        ev.append(Evidence(f"{g} SM clock / max", None, clk / mx, "", f"<= {cfg.idle_clock_ratio}",
                           clk / mx <= cfg.idle_clock_ratio))
    if not any(e.passed for e in ev[1:]):
        return None
    return Cause("hardware_idle_clocks", f"Idle clocks before sparse traffic ({g})", share, share, 1.0,
                 f"traffic sparse (median gap {win.median_gap_s:.2f} s) and {g} at idle clocks", ev)


def _memory(series, base: Range, win: Range, share, checked, cfg: Settings = DEFAULTS) -> Cause | None:
    ev: list[Evidence] = []
    for g in _gpu_sources(series):
        used, total = _max_in(series, (g, "mem_used_bytes"), win.a, win.b), _mean_in(series, (g, "mem_total_bytes"), win.a, win.b)
        if used is not None and total:
            ub = _max_in(series, (g, "mem_used_bytes"), base.a, base.b)
            ev.append(Evidence(f"{g} memory used (max)", ub / total if ub else None, used / total, "x total",
                               f">= {cfg.gpu_mem_full}", used / total >= cfg.gpu_mem_full))
    e = _delta_ev(series, base, win, "cpu", "swap_used_bytes", cfg.swap_more_bytes, "bytes")
    if e:
        ev.append(e)
    for metric in ("psi_mem_some_avg10",):
        e = _delta_ev(series, base, win, "cpu", metric, cfg.psi_mem_more, "%")
        if e:
            ev.append(e)
    ooms = [e for e in series.events if win.a <= e["t"] < win.b and ("oom" in e["kind"] or "alloc" in e["kind"])]
    ev.append(Evidence("OOM / allocator-retry events", None, float(len(ooms)), "events", ">= 1", bool(ooms)))
    strength = _strength(ev)
    fired = [e for e in ev if e.passed]
    summary = ", ".join(f"{e.name} {_fmt(e.baseline)} -> {_fmt(e.window)} {e.unit}".strip() for e in fired)
    checked.append(f"memory pressure: {summary or 'no indicator crossed its threshold'}")
    return Cause("memory", "Memory pressure", share * strength, share, strength, summary or "none", ev)


def _dependency(series, base: Range, win: Range, shares, checked, found: dict, cfg: Settings = DEFAULTS) -> Cause | None:
    """found: filled with each linked span's figures (name -> baseline_ms, window_ms, ratio, grew)."""
    best: Cause | None = None
    service_share = sum(shares.get(s, 0.0) for s in SERVICE_STAGES)
    for n in series.span_ns:
        b, w = base.spans[n], win.spans[n]
        b, w = b[b > 0], w[w > 0]
        if b.size < 3 or w.size < 3:
            continue
        ratio, p = float(w.mean() / b.mean()), greater_p(w, b)
        share = shares.get(f"span:{n}", 0.0)
        grew = ratio >= cfg.stage_shift and p < cfg.alpha
        found[n] = {"baseline_ms": _r(b.mean() / 1e6), "window_ms": _r(w.mean() / 1e6), "ratio": _r(ratio),
                    "grew": bool(grew)}
        ev = [Evidence(f"span {n!r} mean time", float(b.mean() / 1e6), float(w.mean() / 1e6), "ms",
                       f"x{cfg.stage_shift} and Mann-Whitney p < {cfg.alpha} (p={p:.1e})", grew),
              Evidence("pipeline service stages' share of the extra latency", None, service_share, "",
                       f"below the span's share ({share:.0%})", service_share < share, primary=False)]
        strength = (1.0 if service_share < share else 0.7) if grew else 0.0
        summary = (f"span {n!r} {b.mean() / 1e6:.2f} -> {w.mean() / 1e6:.2f} ms (x{ratio:.2f}), "
                   f"{share:.0%} of the extra latency; pipeline stages {service_share:.0%}")
        checked.append(f"dependency: {summary}")
        c = Cause("dependency", f"External dependency ({n})", share * strength, share, strength, summary, ev)
        if best is None or c.score > best.score:
            best = c
    for n, (ts, dur) in series.unlinked_spans.items():
        mb, mw = (ts >= base.a) & (ts < base.b), (ts >= win.a) & (ts < win.b)
        if mb.sum() >= 3 and mw.sum() >= 3:
            checked.append(f"dependency: span {n!r} (not linked to requests) {dur[mb].mean() / 1e6:.2f} -> "
                           f"{dur[mw].mean() / 1e6:.2f} ms; unlinked spans cannot be apportioned to latency")
    if not series.span_ns and not series.unlinked_spans:
        checked.append("dependency: no user spans in the run")
    return best
