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

Environment matching: each side's telemetry over its requests (first arrival to last completion) is
checked the way ``aurora bench`` names a CPU-contended or hardware-throttled run, and a finding counts only
when that side also had more of it than the other side by the margin ``aurora diagnose`` uses for a cause
(``settings.Settings``' ``ENV_SETTINGS``, changed with ``settings=`` or ``aurora compare --set``; defaults here):
other processes' CPU (``cpu_util_pct`` x cores - ``proc_cpu_pct``) with the CPU > 90% busy, > 25% of it
taken by others and >= 0.5 core more than the other side; CPU steal > 5% mean and >= 5 points more;
cgroup quota throttling > 5% of periods and >= 5 points more; on GPUs, a limiting throttle reason (power,
thermal, board limit, reliability, hardware slowdown, power brake) > 5% of the time and >= 10 points more.
Two of these a deployment trips by itself at matched load, so they count only with evidence that the machine
changed: cgroup quota throttling only while this process's own CPU did not rise more than 10% over the
other side's (a deploy that burns more CPU runs into its quota: that is the regression), and a GPU power or
board-limit cap only when its enforced power limit (``power_limit_w``) was lowered by 5% or more. Against a
server on the same host (``aurora bench --url``), other processes' CPU is not counted, as in bench's verdict.
Run queue and CPU pressure (PSI) are reported, not used: this process's own threads raise them too. When
the environment was not matched (a noisy neighbour, a throttled GPU), nothing is judged either: a gate must
not blame a deploy for a contended machine. Both sides equally contended still count as matched.

Inputs: each side needs at least ``MIN_REQUESTS`` (10) ok requests with a measured total; below that no
stage can be compared (the per-stage minimum), and a gate that compared nothing must not pass. Fewer raise
ValueError, as do out-of-range options.

A stage regresses when its p50 or p99 rose significantly beyond ``threshold`` (relative, default 10%) and
``min_delta_ms`` (absolute, default 0.5 ms; ``MIN_DELTA_MS``):
the lower end of the bootstrap interval of the difference lies above both ``threshold`` x BEFORE's value
(not merely above 0), and the Mann-Whitney p-value is below ``alpha``. A rise whose interval still
reaches below the threshold is not shown to exceed it: two live runs of unchanged code on a shared
host differ by that much (a null pair here measured wait p50 +10.3%, interval from +3.8%, p=2e-4:
hand-off waits of ~0.8 ms moved by 0.08 ms of scheduler noise), and a gate must not fail on it.
"""

from __future__ import annotations

import math

import numpy as np

from aurora_core.recorder import RunData, load_run
from aurora_core.records import STAGES
from aurora_core.report import (
    CGROUP_THROTTLED_FRAC,
    CPU_BUSY_PCT,
    LIMITING_REASONS,
    OTHERS_PCT,
    STEAL_PCT,
    THROTTLED_FRAC,
)

from .settings import DEFAULTS, Settings
from .stats import mannwhitney_greater_p

SERVICE = ("decode", "preprocess", "h2d", "compute_item", "d2h")
LOAD_SENSITIVE = ("queue", "wait", "compute", "total")
BOOT_MAX = 20_000
_MW_MAX = 20_000
MIN_REQUESTS = 10  # per side and per stage: fewer is not compared
MIN_BOOT = 100  # fewer resamples leave each 2.5% end of the interval to one or two draws
#: The settings the environment check judges by (the margins between the sides); the only ones compare reads.
ENV_SETTINGS = ("others_cores_more", "steal_more", "cgroup_throttled_more", "throttled_more")


def _as_runs(x) -> list[RunData]:
    """Run files, RunData, store roots (all of it) or selections of a store (``store.Store``): its segments."""
    from aurora_core.store import Store, is_store, open_store

    out = []
    for r in x if isinstance(x, (list, tuple)) else [x]:
        if isinstance(r, RunData):
            out.append(r)
        elif isinstance(r, Store) or is_store(r):
            st = r if isinstance(r, Store) else open_store(r)
            st.require("compare")
            out += st.run_data()
        else:
            out.append(load_run(r))
    return out


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


#: The smallest stage shift (ms, at the confidence interval's lower bound) compare calls a regression. Below
#: it, timer and scheduler granularity move a stage from run to run: two live runs of one configuration,
#: served in alternating blocks, showed a 1 ms queue stage and a 1 ms decode stage shifted by 0.1-0.3 ms
#: with Mann-Whitney p < 0.01 in 2 of 5 CI dry runs on the 2-core VM.
MIN_DELTA_MS = 0.5


def compare(before, after, threshold: float = 0.10, alpha: float = 0.01, n_boot: int = 1000,
            load_tolerance: float = 0.10, seed: int = 0, settings: Settings | None = None,
            min_delta_ms: float = MIN_DELTA_MS) -> dict:
    """Compare two runs (paths, RunData, or lists of them per side). Returns a JSON-ready dict.
    settings: the environment check's margins (``ENV_SETTINGS`` of ``settings.Settings``; default DEFAULTS).
    Raises ValueError for an out-of-range option or a side with fewer than MIN_REQUESTS ok requests."""
    check_options(threshold=threshold, alpha=alpha, n_boot=n_boot, load_tolerance=load_tolerance)
    rb, ra = _as_runs(before), _as_runs(after)
    sb, sa = stage_samples(rb), stage_samples(ra)
    for side, runs, smp in (("BEFORE", rb, sb), ("AFTER", ra, sa)):
        n_ok = int(smp["total"].size)
        if n_ok < MIN_REQUESTS:
            what = "no requests" if not sum(r.n_requests for r in runs) else f"{n_ok} ok requests with a measured total"
            raise ValueError(f"{side} {_paths(runs)} has {what}; at least {MIN_REQUESTS} are needed on each side "
                             "(below that no stage can be compared, and a gate that compared nothing must not pass)")
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
    if not math.isfinite(rate_ratio):
        warning = ("load not checked: a side has no arrival times and no offered rate in its meta, so no "
                   "stage is judged. Rerun with a load generator that records them.")
    elif not matched:
        warning = (f"load not matched: {how} "
                   f"(x{rate_ratio:.2f}, tolerance {load_tolerance:.0%}); queueing and contention change with load, "
                   "so no stage is judged. Rerun AFTER at BEFORE's offered rate.")
    env = environment_check(rb, ra, settings or DEFAULTS)
    judged = matched and env["matched"]
    why = " and ".join(w for w, m in (("load", matched), ("environment", env["matched"])) if not m)
    rng = np.random.default_rng(seed)
    rows, regressions = [], []
    for s in (*SERVICE, *LOAD_SENSITIVE):
        b, a = sb[s], sa[s]
        row = {"stage": s, "kind": "service" if s in SERVICE else "load-sensitive", "n": [int(b.size), int(a.size)]}
        if b.size < MIN_REQUESTS or a.size < MIN_REQUESTS:
            row["note"] = f"fewer than {MIN_REQUESTS} requests with this stage on a side: not compared"
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
        p = mannwhitney_greater_p(as_, bs)
        row["mw_p_greater"] = float(f"{p:.3g}")
        # Significantly beyond the threshold: the whole interval above threshold x BEFORE (module doc).
        worse = [n for n in ("p50", "p99") if row[f"{n}_rel"] is not None
                 and row[f"{n}_ci_ms"][0] > max(threshold * row[n][0], min_delta_ms)]
        if not judged:
            row["regression"] = False
            row["note"] = f"not judged: {why} not matched"
        else:
            row["regression"] = bool(worse) and p < alpha
            if row["regression"]:
                regressions.append(s)
                row["note"] = (f"{'/'.join(worse)} up beyond {threshold:.0%} and {min_delta_ms:g} ms (whole CI), "
                               f"Mann-Whitney p={p:.1e}")
        rows.append(row)
    if not matched:
        verdict = "load not matched"
    elif not env["matched"]:
        verdict = "environment not matched"
    else:
        verdict = "regression" if regressions else "no regression"
    warnings = [f"{side} run {r.path} was cut short (interrupted, or an error) before its planned end: it holds "
                "only the requests served until then" for side, runs in (("BEFORE", rb), ("AFTER", ra))
                for r in runs if r.meta.get("interrupted")]
    return {
        "before": {"runs": [_info(r) for r in rb], **lb},
        "after": {"runs": [_info(r) for r in ra], **la},
        "load": {"matched": matched, "rate_ratio": round(rate_ratio, 4) if math.isfinite(rate_ratio) else None,
                 "tolerance": load_tolerance, "basis": "offered" if None not in offered else "measured",
                 "queue_depth_mean": [round(lb["queue_depth_mean"], 3), round(la["queue_depth_mean"], 3)],
                 "warning": warning},
        "environment": env,
        "warnings": warnings,
        "stages": rows,
        "regressions": regressions,
        "verdict": verdict,
        "threshold": threshold,
        "min_delta_ms": min_delta_ms,
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


def check_options(threshold: float, alpha: float, n_boot: int, load_tolerance: float) -> None:
    """Raise ValueError naming the first out-of-range option by its ``aurora compare`` flag."""
    def bad(name, want, got):
        raise ValueError(f"{name} must be {want}, got {got!r}")

    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= MIN_BOOT):
        bad("--boot (bootstrap resamples)", f"an integer >= {MIN_BOOT}", n_boot)
    if not (math.isfinite(threshold) and threshold >= 0):
        bad("--threshold (relative rise, 0.10 = 10%)", "a number >= 0", threshold)
    if not (0 < alpha < 1):
        bad("--alpha (significance level)", "between 0 and 1 (exclusive)", alpha)
    if not (math.isfinite(load_tolerance) and load_tolerance >= 0):
        bad("--load-tolerance (relative rate difference, 0.10 = 10%)", "a number >= 0", load_tolerance)


def _paths(runs: list[RunData]) -> str:
    return ", ".join(str(r.path) for r in runs)


def _mean(runs: list[RunData], source: str, metric: str) -> float | None:
    """Mean of a metric over the samples taken while each run served requests (first arrival to last
    completion): warm-up and calibration before the traffic are not the environment it ran in."""
    vals = []
    for r in runs:
        s = r.samples.get((source, metric))
        a = r.requests["arrival_ns"]
        if s is None or not np.any(a > 0):
            continue
        lo, hi = a[a > 0].min(), max(int(r.requests["completion_ns"].max()), int(a.max()))
        vals.append(s[1][(s[0] >= lo) & (s[0] <= hi)])
    v = np.concatenate(vals) if vals else np.zeros(0)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def environment_figures(runs: list[RunData]) -> dict:
    """One side's CPU and GPU telemetry means over its requests (None where not measured)."""
    cpu = runs[0].meta.get("cpu") or {}
    cores = cpu.get("logical_cores") if isinstance(cpu, dict) else None
    f = {m: _mean(runs, "cpu", m) for m in ("cpu_util_pct", "proc_cpu_pct", "steal_pct", "cgroup_throttled_frac",
                                             "runq", "psi_cpu_some_avg10")}
    f["cores"] = cores
    util, own = f["cpu_util_pct"], f["proc_cpu_pct"]
    # Against a server on this host (aurora bench --url) the server is another process: as in bench's verdict,
    # other processes' CPU is no evidence there.
    remote = any((r.meta.get("config") or {}).get("url") for r in runs)
    if util is not None and own is not None and cores and not remote:
        f["others_pct"] = util - own / cores  # % of all cores used by other processes (as aurora bench)
        f["others_cores"] = max(util / 100 * cores - own / 100, 0.0)  # as aurora diagnose
    gpus = sorted({src for r in runs for src, _ in r.samples if src.startswith("gpu")})
    f["gpu_throttle"] = {g: {k: v for k in LIMITING_REASONS if (v := _mean(runs, g, f"throttle_frac_{k}")) is not None}
                         for g in gpus}
    f["gpu_power_limit_w"] = {g: v for g in gpus if (v := _mean(runs, g, "power_limit_w")) is not None}
    return f


#: Limits the deployment can trip by itself at matched load: more CPU per request runs into the cgroup quota,
#: more power into the GPU's power cap. They count as the environment only with evidence that it changed.
OWN_CPU_MORE = 1.10  # this process's CPU over the other side's (x) beyond which quota throttling is its own
POWER_CAPS = ("power", "board_limit")
POWER_LIMIT_LOWER = 0.95  # an enforced power limit this much below the other side's: the cap was lowered


def _findings(side: str, other: str, me: dict, them: dict, cfg: Settings) -> list[str]:
    """What ``side`` had beyond ``other`` (module doc); the other side's figure follows each finding."""
    def more(key, margin):
        return them.get(key) is None or me[key] - them[key] >= margin

    def vs(x, fmt, unit=""):
        return "not measured" if x is None else format(x, fmt) + unit

    out = []
    if (me.get("others_pct") is not None and me["cpu_util_pct"] > CPU_BUSY_PCT and me["others_pct"] > OTHERS_PCT
            and more("others_cores", cfg.others_cores_more)):
        out.append(f"{side} was CPU-contended: other processes used {me['others_pct']:.0f}% of the CPU against "
                   f"this one's {me['proc_cpu_pct'] / me['cores']:.0f}% ({other}: {vs(them.get('others_pct'), '.0f', '%')})")
    if me["steal_pct"] is not None and me["steal_pct"] > STEAL_PCT and more("steal_pct", cfg.steal_more):
        out.append(f"{side} had CPU steal {me['steal_pct']:.1f}% mean, the hypervisor running someone else "
                   f"({other}: {vs(them.get('steal_pct'), '.1f', '%')})")
    cg = me["cgroup_throttled_frac"]
    own, their_own = me["proc_cpu_pct"], them.get("proc_cpu_pct")
    own_rose = own is not None and their_own is not None and own > OWN_CPU_MORE * their_own
    if (cg is not None and cg > CGROUP_THROTTLED_FRAC and more("cgroup_throttled_frac", cfg.cgroup_throttled_more)
            and not own_rose):
        out.append(f"{side}'s cgroup CPU quota throttled {cg:.0%} of periods "
                   f"({other}: {vs(them.get('cgroup_throttled_frac'), '.0%')})")
    for g, reasons in me["gpu_throttle"].items():
        limit, their_limit = me["gpu_power_limit_w"].get(g), them.get("gpu_power_limit_w", {}).get(g)
        lowered = limit is not None and their_limit is not None and limit < POWER_LIMIT_LOWER * their_limit
        for k, v in reasons.items():
            o = them["gpu_throttle"].get(g, {}).get(k)
            if v > THROTTLED_FRAC and (o is None or v - o >= cfg.throttled_more) and (k not in POWER_CAPS or lowered):
                why = f", its power limit lowered to {limit:.0f} W from {their_limit:.0f} W" if k in POWER_CAPS else ""
                out.append(f"{side}'s {g} was throttled ({k}) {v:.0%} of the time ({other}: {vs(o, '.0%')}){why}")
    return out


def environment_check(rb: list[RunData], ra: list[RunData], settings: Settings = DEFAULTS) -> dict:
    """Was the machine the same on both sides? (module doc). Returns figures per side, findings and a warning."""
    fb, fa = environment_figures(rb), environment_figures(ra)
    findings = _findings("BEFORE", "AFTER", fb, fa, settings) + _findings("AFTER", "BEFORE", fa, fb, settings)
    checked = [side for side, f in (("BEFORE", fb), ("AFTER", fa))
               if f["cpu_util_pct"] is not None or f["gpu_throttle"]]
    warning = None
    if findings:
        warning = ("environment not matched: " + "; ".join(findings) + ". The runs are not comparable, so no "
                   "stage is judged. Rerun both on a quiet machine (or AFTER under BEFORE's conditions).")
    note = None
    if len(checked) < 2:
        missing = " and ".join(side for side in ("BEFORE", "AFTER") if side not in checked)
        note = f"environment not checked on {missing}: no CPU or GPU telemetry in the run"
    nested = ("gpu_throttle", "gpu_power_limit_w")
    rnd = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in fb.items() if k not in nested}
    rna = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in fa.items() if k not in nested}
    return {"matched": not findings, "findings": findings, "warning": warning, "note": note,
            "margins": {k: getattr(settings, k) for k in ENV_SETTINGS},
            "before": {**rnd, **{k: fb[k] for k in nested}}, "after": {**rna, **{k: fa[k] for k in nested}}}
