"""``aurora compare BEFORE AFTER``: the deployment gate.

Per stage, the p50 and p99 of the "ok" requests on each side, their difference (AFTER - BEFORE) with a
percentile-bootstrap confidence interval (``n_boot`` resamples of each side, seeded; sides above
``BOOT_MAX`` requests are subsampled first, which widens the interval a little, never narrows it), and a
one-sided Mann-Whitney U test that AFTER's times are larger.

Stages are of two kinds:
* service stages (decode, preprocess, h2d, per-item compute = compute / padded batch, d2h): the work
  done for one request;
* load-sensitive ones (queue, wait = total - service, compute per batch, total): they grow with the
  offered load through queueing and bigger batches.

Load matching: the offered rate (meta ``offered_rate_per_s``, set by the load generator, when both sides
have it), else the measured arrival rate (requests / seconds covered), must agree within
``load_tolerance`` (10%). A measured rate is a Poisson count, so the sides count as unmatched only when
the 95% interval of the rate ratio (log-ratio +- 1.96 sqrt(1/n_b + 1/n_a)) lies wholly outside the
tolerance band: a short run's sampling noise alone does not make the load unmatched. Queue depth is reported but not used to match, because a slower service
deepens the queue at the same load. When the load is not matched, nothing is judged (a queueing
effect must not read as a regression, and on a shared CPU even per-request service times rise with
load); the verdict says so and asks for a run at matched load.

A stage regresses when its p50 or p99 rose significantly beyond ``threshold`` (relative, default 10%):
the lower end of the bootstrap interval of the difference lies above ``threshold`` x BEFORE's value
(not merely above 0), and the Mann-Whitney p-value is below ``alpha``. A rise whose interval still
reaches below the threshold is not shown to exceed it: two live runs of unchanged code on a shared
host differ by that much (a null pair here measured wait p50 +10.3%, interval from +3.8%, p=2e-4:
hand-off waits of ~0.8 ms moved by 0.08 ms of scheduler noise), and a gate must not fail on it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from aurora_core.recorder import RunData, load_run
from aurora_core.records import STAGES

SERVICE = ("decode", "preprocess", "h2d", "compute_item", "d2h")
LOAD_SENSITIVE = ("queue", "wait", "compute", "total")
BOOT_MAX = 20_000
_MW_MAX = 20_000


def _as_runs(x) -> list[RunData]:
    if isinstance(x, (list, tuple)):
        return [r if isinstance(r, RunData) else load_run(r) for r in x]
    return [x if isinstance(x, RunData) else load_run(x)]


def stage_samples(runs: list[RunData]) -> dict[str, np.ndarray]:
    """Per stage, ms of each ok request where the stage happened (all runs of one side pooled)."""
    out: dict[str, list] = {}
    for r in runs:
        ok = r.requests["status"] == "ok"
        dur = {s: r.stage_ns(s) for s in STAGES}
        svc = sum(np.where(dur[s] > 0, dur[s], 0) for s in ("decode", "preprocess", "h2d", "compute", "d2h"))
        bucket = np.where(r.requests["bucket"] > 0, r.requests["bucket"], np.maximum(r.requests["batch_size"], 1))
        dur["wait"] = np.where(dur["total"] >= 0, np.maximum(dur["total"] - svc, 0), -1)
        dur["compute_item"] = np.where(dur["compute"] >= 0, dur["compute"] / bucket, -1)
        for s in (*SERVICE, *LOAD_SENSITIVE):
            v = dur[s]
            out.setdefault(s, []).append(v[ok & (v >= 0)] / 1e6)
    return {s: np.concatenate(v) for s, v in out.items()}


def load_figures(runs: list[RunData]) -> dict:
    n, secs, qd = 0, 0.0, []
    for r in runs:
        a = r.requests["arrival_ns"]
        a = a[a > 0]
        if a.size > 1:
            n += a.size
            secs += (a.max() - a.min()) / 1e9
        qd.append(r.requests["queue_depth"])
    q = np.concatenate(qd) if qd else np.zeros(0)
    return {"arrival_rate_per_s": n / secs if secs > 0 else math.nan, "requests": n,
            "queue_depth_mean": float(q.mean()) if q.size else math.nan}


def bootstrap_delta(b: np.ndarray, a: np.ndarray, q: float, n_boot: int, rng, level: float = 0.95):
    """Percentile-bootstrap CI of percentile(a, q) - percentile(b, q)."""
    if b.size > BOOT_MAX:
        b = rng.choice(b, BOOT_MAX, replace=False)
    if a.size > BOOT_MAX:
        a = rng.choice(a, BOOT_MAX, replace=False)
    deltas = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(a.size, b.size))  # bound memory: chunk x n floats per side
    for i in range(0, n_boot, chunk):
        k = min(chunk, n_boot - i)
        pa = np.percentile(a[rng.integers(0, a.size, (k, a.size))], q, axis=1)
        pb = np.percentile(b[rng.integers(0, b.size, (k, b.size))], q, axis=1)
        deltas[i:i + k] = pa - pb
    lo, hi = np.percentile(deltas, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def compare(before, after, threshold: float = 0.10, alpha: float = 0.01, n_boot: int = 1000,
            load_tolerance: float = 0.10, seed: int = 0) -> dict:
    """Compare two runs (paths, RunData, or lists of them per side). Returns a JSON-ready dict."""
    rb, ra = _as_runs(before), _as_runs(after)
    sb, sa = stage_samples(rb), stage_samples(ra)
    lb, la = load_figures(rb), load_figures(ra)
    offered = [_offered(rb), _offered(ra)]
    if None not in offered:
        rate_ratio = offered[1] / offered[0]
        matched = abs(rate_ratio - 1) <= load_tolerance
        how = f"offered rate {offered[0]:.1f} -> {offered[1]:.1f}/s"
    else:
        rate_ratio = la["arrival_rate_per_s"] / lb["arrival_rate_per_s"] if lb["arrival_rate_per_s"] > 0 else math.nan
        matched = False
        if math.isfinite(rate_ratio) and la["requests"] and lb["requests"]:
            half = 1.96 * math.sqrt(1 / la["requests"] + 1 / lb["requests"])
            lo, hi = rate_ratio * math.exp(-half), rate_ratio * math.exp(half)
            matched = hi >= 1 - load_tolerance and lo <= 1 + load_tolerance
        how = f"arrival rate {lb['arrival_rate_per_s']:.1f} -> {la['arrival_rate_per_s']:.1f}/s"
    matched = bool(matched)
    rate_ratio = float(rate_ratio)
    warning = None
    if not matched:
        warning = (f"load not matched: {how} "
                   f"(x{rate_ratio:.2f}, tolerance {load_tolerance:.0%}); queueing and contention change with load, "
                   "so no stage is judged. Rerun AFTER at BEFORE's offered rate.")
    rng = np.random.default_rng(seed)
    rows, regressions = [], []
    for s in (*SERVICE, *LOAD_SENSITIVE):
        b, a = sb[s], sa[s]
        row = {"stage": s, "kind": "service" if s in SERVICE else "load-sensitive", "n": [int(b.size), int(a.size)]}
        if b.size < 10 or a.size < 10:
            row["note"] = "fewer than 10 requests with this stage on a side: not compared"
            rows.append(row)
            continue
        for name, q in (("p50", 50.0), ("p99", 99.0)):
            vb, va = float(np.percentile(b, q)), float(np.percentile(a, q))
            lo, hi = bootstrap_delta(b, a, q, n_boot, rng)
            row[name] = [round(vb, 4), round(va, 4)]
            row[f"{name}_delta_ms"] = round(va - vb, 4)
            row[f"{name}_ci_ms"] = [round(lo, 4), round(hi, 4)]
            row[f"{name}_rel"] = round((va - vb) / vb, 4) if vb > 0 else None
        bs = b if b.size <= _MW_MAX else rng.choice(b, _MW_MAX, replace=False)
        as_ = a if a.size <= _MW_MAX else rng.choice(a, _MW_MAX, replace=False)
        p = float(stats.mannwhitneyu(as_, bs, alternative="greater").pvalue)
        row["mw_p_greater"] = float(f"{p:.3g}")
        # Significantly beyond the threshold: the whole interval above threshold x BEFORE (module doc).
        worse = [n for n in ("p50", "p99")
                 if row[f"{n}_rel"] is not None and row[f"{n}_ci_ms"][0] > threshold * row[n][0]]
        if not matched:
            row["regression"] = False
            row["note"] = "not judged: load not matched"
        else:
            row["regression"] = bool(worse) and p < alpha
            if row["regression"]:
                regressions.append(s)
                row["note"] = f"{'/'.join(worse)} up beyond {threshold:.0%} (whole CI), Mann-Whitney p={p:.1e}"
        rows.append(row)
    verdict = "load not matched" if not matched else ("regression" if regressions else "no regression")
    return {
        "before": {"runs": [_info(r) for r in rb], **lb},
        "after": {"runs": [_info(r) for r in ra], **la},
        "load": {"matched": matched, "rate_ratio": round(rate_ratio, 4) if math.isfinite(rate_ratio) else None,
                 "tolerance": load_tolerance, "basis": "offered" if None not in offered else "measured",
                 "queue_depth_mean": [round(lb["queue_depth_mean"], 3), round(la["queue_depth_mean"], 3)],
                 "warning": warning},
        "stages": rows,
        "regressions": regressions,
        "verdict": verdict,
        "threshold": threshold,
        "alpha": alpha,
        "n_boot": n_boot,
    }


def _offered(runs: list[RunData]) -> float | None:
    vals = {r.meta.get("offered_rate_per_s") for r in runs}
    if len(vals) != 1:
        return None
    v = vals.pop()
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def _info(r: RunData) -> dict:
    m = r.meta
    return {"path": str(r.path), "host": m.get("host"), "label": m.get("label"), "config": m.get("config"),
            "n_requests": r.n_requests}
