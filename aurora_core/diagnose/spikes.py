"""Series building and spike-window detection.

Series
    Runs are grouped by (host, region) from their meta. Runs of one group are laid end to end on the wall
    clock (each run's monotonic stamps + its ``wall_minus_mono_ns``), so a deployment shows up as a
    change of label/config between consecutive runs of the same host. Times in a series are seconds
    from the series' first request.

Per-request latency
    The latency a user saw: the pipeline's ``total`` stage, widened by any user span linked to the
    request (``Span.request_id`` equal to the record's ``request_id``), e.g. a feature-store call made
    before the request entered the pipeline. ``wait`` is ``total`` minus the service stages (decode,
    preprocess, h2d, compute, d2h): the batcher queue plus every hand-off wait.

Detection (a small documented method around PELT; ``stats.pelt_l2`` gives ruptures' change points)
    1. Bin requests by arrival into intervals of width ``interval_s`` (auto: ~50 requests an interval,
       but at least 24 intervals, and 6 (two PELT segments) in each run of 60 requests or more, as long
       as each keeps >= 10 requests; at most 300; 0.1 s..60 s). Counts and rates are over active time:
       a gap between arrivals longer than ``IDLE_INTERVALS`` intervals is idle (between two runs of a
       host, or a pause inside one) and left out, so runs minutes apart keep the interval of runs laid
       back to back.
    2. The signal is (log p50, log p99) of the per-interval latency of "ok" requests, each column divided
       by a robust noise scale: MAD of first differences / (0.6745 * sqrt 2), which a level shift barely
       moves.
    3. PELT with an l2 cost, min_size ``MIN_SEG`` (3) intervals, penalty ``3 * d * ln(n)`` (d = 2 columns): a
       BIC-style penalty made conservative so that noise alone does not cut segments.
    4. Baseline (the healthy regime): anchors are tried from the lowest-level segment up (level: mean of
       its pooled log p50 and log p99); around each, adjacent segments join while they are no spike
       against it (step 5's test), and the first stretch at least max(3, 10% of the intervals) long is
       the baseline. So a calm stretch that PELT cut into short pieces is one baseline, and a saturated
       plateau the run ends in is never taken for normal because it alone is long enough. ``--baseline``
       gives it instead (T0:T1, label:NAME, run:PATH); a host without a run it names takes the matched
       runs' wall-clock span, or its automatic baseline when its requests do not overlap that span
       (``resolve_baselines``). ``Detection.baseline_reason`` says which and why.
    5. A segment is a spike when its pooled p50 or p99 is at least ``min_ratio`` (1.3) times the
       baseline's, significant at ``alpha`` (1e-3) against the noise of both sides: for p50 a one-sided
       Mann-Whitney test on the requests and a t-test on the log per-interval medians; for p99 Fisher's
       exact test on the share above the baseline's p99 (the baseline's own share counted, not taken as
       1%) and a t-test on the per-interval shares. Each pair must pass: requests of one batch or queue
       burst are slow together, and the per-interval test counts such a group once.
    6. Only spike segments merge (adjacent ones, into one window when the merged range still passes), and
       a window's edges are trimmed to the first and last interval above the baseline (p50 or p99 at least
       sqrt(min_ratio) times the baseline's). Effect size and significance are both required, so a long
       quiet run does not produce windows from tiny but "significant" drifts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aurora_core.recorder import RunData

from .settings import DEFAULTS
from .stats import (
    fisher_greater_p,
    group_medians,
    group_percentiles,
    mannwhitney_greater_p,
    pelt_l2,
    ttest_greater_p,
)

SERVICE_STAGES = ("decode", "preprocess", "h2d", "compute", "d2h")
MIN_RATIO = DEFAULTS.min_ratio
ALPHA = DEFAULTS.alpha
#: PELT's minimum segment, in intervals.
MIN_SEG = 3
#: A gap between consecutive arrivals longer than this many intervals is idle time, not traffic. It is
#: never a Poisson gap: an interval holds >= 10 requests on average, so this is >= 50 mean gaps.
IDLE_INTERVALS = 5
_MW_MAX = 4000  # Mann-Whitney on at most this many points a side (subsampled, seeded): O(n log n) anyway
#: Run files written before recorders stored the deployment/load split (``meta.deployment``,
#: ``meta.load``) hold one flat ``meta.config``: for them, these keys (aurora bench's load, verdict and
#: output options as of that format) describe the load or the run and are left out of the fingerprint.
RUN_KEYS = frozenset({
    "calibrate_s", "concurrency", "connections", "count", "duration", "find_peak", "label", "load_factor",
    "min_duration", "min_queries", "min_window_queries", "no_report", "out", "peak_trial_s", "quiet", "rate",
    "region", "replay", "replay_speed", "scenario", "seed", "slo_ms", "stability_tol", "steps"})


@dataclass
class Series:
    """Requests and telemetry of one (host, region), in seconds from ``t0_wall_ns``, in arrival order (``t``
    ascending, which ``build_series`` and the store's ``GroupSource`` guarantee)."""

    name: str
    runs: list[RunData]
    t0_wall_ns: int
    t: np.ndarray                      # arrival, s
    run_idx: np.ndarray                # which run each request came from
    ok: np.ndarray                     # bool
    e2e_ns: np.ndarray                 # user-visible latency (see module doc); -1 when unknown
    wait_ns: np.ndarray
    stage_ns: dict[str, np.ndarray]    # service stages, -1 where the stage did not happen
    bucket: np.ndarray
    queue_depth: np.ndarray
    batch: np.ndarray                  # run_idx * 2**32 + batch_id: one value per executed batch
    compute_s: np.ndarray              # [n, 2] compute start, end (s); nan when it did not happen
    form_s: np.ndarray                 # [n, 2] decode start, preprocess end (s); nan when not
    span_ns: dict[str, np.ndarray]     # linked span time per request and span name (0: none)
    unlinked_spans: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (start s, duration ns)
    samples: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (source, metric) -> (t s, value)
    events: list[dict]
    run_bounds: list[tuple[float, float]] = field(default_factory=list)  # per run (first, last arrival) s
    #: Where the columns come from when not all are held (a store group, ``fromstore.GroupSource``); None:
    #: this Series holds every column of every request.
    source: object = field(default=None, repr=False)
    #: Only what detection reads is held (t, run_idx, ok, e2e_ns); the other columns are None.
    narrow: bool = False
    #: What detection derives from the arrays (latency in ms, interval index, ranges' Lat), per width: the
    #: same ranges are pooled and judged many times over while the baseline is sought.
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def select(self, ranges=None, full: bool = True) -> Series:
        """The requests arriving in ``ranges`` ([(a, b)] s; None: all), with every column (``full``) or detection's.
        A Series that holds everything returns itself: every consumer masks by time anyway. A store-backed one
        loads just those rows, so analysis of a day-long series reads its baseline and windows, not the day."""
        if self.source is None:
            return self
        return self.source.series(ranges, full)

    @property
    def cores(self) -> int:
        cpu = self.runs[0].meta.get("cpu") or {}
        return int(cpu.get("logical_cores") or 1)

    def fingerprint(self, i: int) -> dict:
        """What a deployment changes: label, config, model, versions of run i. The config is the run's own
        ``meta.deployment`` (whoever recorded it said which options are the deployment and which the load),
        so two runs at different rates are not taken for a deployment; a run file without that split has
        its flat ``meta.config`` less ``RUN_KEYS``."""
        m = self.runs[i].meta
        fp = {k: m.get(k) for k in ("label", "config", "model", "versions")}
        if isinstance(m.get("deployment"), dict):
            fp["config"] = m["deployment"]
        elif isinstance(fp["config"], dict):
            fp["config"] = {k: v for k, v in fp["config"].items() if k not in RUN_KEYS}
        return fp


def _key(run: RunData) -> tuple[str, str]:
    return (str(run.meta.get("host") or "?"), str(run.meta.get("region") or ""))


def build_series(runs: list[RunData]) -> list[Series]:
    groups: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for (host, region), rs in groups.items():
        rs = sorted(rs, key=lambda r: _first_wall(r))
        out.append(_series(f"{host}/{region}" if region else host, rs))
    return out


def _first_wall(r: RunData) -> int:
    a = r.requests["arrival_ns"]
    return int(a[a > 0].min() + r.wall_minus_mono_ns) if np.any(a > 0) else r.wall_minus_mono_ns


def _series(name: str, runs: list[RunData]) -> Series:
    t0 = min(_first_wall(r) for r in runs)
    parts: dict[str, list] = {}
    spans_unlinked: dict[str, list] = {}
    samples: dict[tuple[str, str], list] = {}
    events: list[dict] = []
    bounds = []
    span_names = sorted({n for r in runs for n in r.spans["name"].tolist()})
    for i, r in enumerate(runs):
        q = r.requests
        off = r.wall_minus_mono_ns - t0
        arrival = q["arrival_ns"]
        keep = arrival > 0
        total = r.stage_ns("total")
        st = {s: r.stage_ns(s) for s in SERVICE_STAGES}
        service = sum(np.where(v > 0, v, 0) for v in st.values())
        wait = np.where(total >= 0, np.maximum(total - service, 0), -1)
        start, end = arrival.copy(), q["completion_ns"].copy()
        linked = {n: np.zeros(arrival.size, np.int64) for n in span_names}
        if r.spans["name"].size:
            pos = {int(rid): j for j, rid in enumerate(q["request_id"].tolist())}
            for n, s0, s1, rid in zip(r.spans["name"], r.spans["start_ns"], r.spans["end_ns"],
                                      r.spans["request_id"], strict=True):
                j = pos.get(int(rid), -1) if rid >= 0 else -1
                if j < 0:
                    spans_unlinked.setdefault(str(n), []).append(((s0 + off) / 1e9, s1 - s0))
                    continue
                linked[str(n)][j] += s1 - s0
                start[j] = min(start[j], s0)
                end[j] = max(end[j], s1)
        e2e = np.where((total >= 0) & (end >= start), end - start, -1)
        t = (arrival + off) / 1e9
        bucket = np.where(q["bucket"] > 0, q["bucket"], np.maximum(q["batch_size"], 1))
        cols = {"t": t, "run_idx": np.full(arrival.size, i), "ok": q["status"] == "ok", "e2e_ns": e2e,
                "wait_ns": wait, "bucket": bucket, "queue_depth": q["queue_depth"],
                "batch": np.where(q["batch_id"] >= 0, i * 2**32 + q["batch_id"], -1)}
        for col, (a, b) in {"compute": ("compute_start_ns", "compute_end_ns"),
                            "form": ("decode_start_ns", "preprocess_end_ns")}.items():
            ok_ = (q[a] > 0) & (q[b] >= q[a])
            cols[f"{col}0"] = np.where(ok_, (q[a] + off) / 1e9, np.nan)
            cols[f"{col}1"] = np.where(ok_, (q[b] + off) / 1e9, np.nan)
        cols.update({f"stage:{s}": v for s, v in st.items()})
        cols.update({f"span:{n}": v for n, v in linked.items()})
        for k, v in cols.items():
            parts.setdefault(k, []).append(v[keep])
        if np.any(keep):
            bounds.append((float(t[keep].min()), float(t[keep].max())))
        else:
            bounds.append((math.nan, math.nan))
        for key, (ts, val) in r.samples.items():
            samples.setdefault(key, []).append(((ts + off) / 1e9, val))
        for j in range(r.events["ts_ns"].size):
            events.append({"t": (int(r.events["ts_ns"][j]) + off) / 1e9, "source": str(r.events["source"][j]),
                           "kind": str(r.events["kind"][j]), "value": float(r.events["value"][j]),
                           "detail": str(r.events["detail"][j])})
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cat["t"], kind="stable")
    cat = {k: v[order] for k, v in cat.items()}
    samp = {}
    for key, lst in samples.items():
        ts = np.concatenate([a for a, _ in lst])
        vs = np.concatenate([b for _, b in lst])
        o = np.argsort(ts, kind="stable")
        samp[key] = (ts[o], vs[o])
    unl = {}
    for n, lst in spans_unlinked.items():
        arr = np.array(lst, dtype=np.float64).reshape(-1, 2)
        unl[n] = (arr[:, 0], arr[:, 1].astype(np.int64))
    return Series(
        name=name, runs=runs, t0_wall_ns=t0, t=cat["t"], run_idx=cat["run_idx"], ok=cat["ok"],
        e2e_ns=cat["e2e_ns"], wait_ns=cat["wait_ns"],
        stage_ns={s: cat[f"stage:{s}"] for s in SERVICE_STAGES}, bucket=cat["bucket"],
        queue_depth=cat["queue_depth"], batch=cat["batch"],
        compute_s=np.column_stack([cat["compute0"], cat["compute1"]]),
        form_s=np.column_stack([cat["form0"], cat["form1"]]), span_ns={n: cat[f"span:{n}"] for n in span_names},
        unlinked_spans=unl, samples=samp, events=sorted(events, key=lambda e: e["t"]), run_bounds=bounds,
    )


# --------------------------------------------------------------------------------------------------
# Intervals and change points
# --------------------------------------------------------------------------------------------------
@dataclass
class Intervals:
    edges: np.ndarray     # s, len n+1
    count: np.ndarray     # arrivals (all statuses)
    p50_ms: np.ndarray    # nan where no ok request
    p99_ms: np.ndarray


def _width(n: int, active_s: float, shortest_run_s: float) -> float:
    rate = n / active_s
    # A hair over span / 6, so that a run starting on an interval edge ends inside its 6th interval
    # rather than opening a 7th for its last request alone.
    per_run = shortest_run_s / (2 * MIN_SEG) * (1 + 1e-9)
    width = max(min(50.0 / rate, active_s / 24.0, per_run), 10.0 / rate, active_s / 300.0)
    return float(min(max(width, 0.1), 60.0))


def auto_interval(series: Series) -> float:
    """~50 requests an interval, but at least 24 intervals, and 2 * MIN_SEG in each run of 60 requests or
    more, while each keeps >= 10 requests; <= 300. Over active time: idle gaps (longer than
    IDLE_INTERVALS intervals) are dropped and the width recomputed until no further gap turns idle
    (each round only narrows the width, so it stops after a few)."""
    if series.t.size < 2:
        return 1.0
    n = series.t.size
    per_run = np.bincount(series.run_idx, minlength=len(series.run_bounds))
    shortest = min((b - a for (a, b), k in zip(series.run_bounds, per_run, strict=True)
                    if k >= 2 * MIN_SEG * 10 and b > a), default=math.inf)
    gaps = np.diff(series.t)
    active = float(gaps.sum()) or 1.0
    width = _width(n, active, shortest)
    for _ in range(20):
        busy = float(gaps[gaps <= IDLE_INTERVALS * width].sum())
        if not 0 < busy < active:
            break
        active = busy
        width = _width(n, active, shortest)
    # Runs weeks apart: the timeline still gets at most MAX_INTERVALS (intervals() refuses more).
    return max(width, float(series.t[-1] - series.t[0]) / (MAX_INTERVALS - 1))


#: Intervals on one timeline; ~40 MB of arrays at the bound, where 1e-6 s on a 10 s run reached 1 GB.
MAX_INTERVALS = 1_000_000


def intervals(series: Series, width: float) -> Intervals:
    if series.t.size > 1 and np.any(series.t[1:] < series.t[:-1]):  # detection slices by time (searchsorted)
        raise ValueError(f"diagnose: the requests of {series.name} are not in arrival order")
    t0 = float(series.t[0]) if series.t.size else 0.0
    n = max(1, int(math.ceil((float(series.t[-1]) - t0) / width + 1e-9))) if series.t.size else 1
    if n > MAX_INTERVALS:  # each array below holds one entry per interval, filled or not
        raise ValueError(f"diagnose: an interval of {width:g} s cuts the {float(series.t[-1]) - t0:.0f} s timeline "
                         f"into {n:,} intervals (at most {MAX_INTERVALS:,}); pass a wider --interval")
    edges = t0 + width * np.arange(n + 1)
    lat, block, good = _per_request(series, width)
    idx = np.clip(block, 0, n - 1)
    count = np.bincount(idx, minlength=n)
    gi, gl = idx[good], lat[good]  # in arrival order, so grouped by interval
    p50, p99 = group_percentiles(gl, np.searchsorted(gi, np.arange(n + 1)), [50, 99])
    return Intervals(edges, count, p50, p99)


def _noise_scale(x: np.ndarray) -> float:
    d = np.diff(x)
    if d.size < 2:
        return 1.0
    s = float(np.median(np.abs(d - np.median(d)))) / (0.6745 * math.sqrt(2))
    return s if s > 1e-9 else float(np.std(d) / math.sqrt(2)) or 1.0


def change_points(iv: Intervals) -> list[int]:
    """Interval indices (into the non-empty intervals) where segments start, first one 0."""
    good = ~np.isnan(iv.p99_ms)
    x = np.column_stack([np.log(iv.p50_ms[good]), np.log(iv.p99_ms[good])])
    n = x.shape[0]
    if n < 6:
        return [0]
    x = x / np.array([_noise_scale(x[:, 0]), _noise_scale(x[:, 1])])
    pen = 3.0 * x.shape[1] * math.log(n)
    ends = pelt_l2(x, pen, MIN_SEG, jump=1)
    return [0] + [int(e) for e in ends[:-1]]


@dataclass
class Window:
    start_s: float
    end_s: float
    p50_ms: float
    p99_ms: float
    ratio_p50: float
    ratio_p99: float
    p_value: float
    n: int


@dataclass
class Detection:
    interval_s: float
    intervals: Intervals
    segments: list[tuple[float, float]]
    baseline: Window | None
    windows: list[Window]
    baseline_reason: str = ""  # which span was taken as normal, and why


@dataclass
class Lat:
    """The successful requests of a range: latency (ms) and the detection interval each arrived in. The
    baseline and each segment are judged many times (``_auto_baseline`` tries every anchor), so what the
    tests read of one side is computed once."""

    ms: np.ndarray
    block: np.ndarray
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return int(self.ms.size)

    def pct(self) -> tuple[float, float]:
        """(p50, p99) in ms."""
        if "pct" not in self._memo:
            p50, p99 = np.percentile(self.ms, [50, 99])
            self._memo["pct"] = float(p50), float(p99)
        return self._memo["pct"]

    def memo(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


def _per_request(series: Series, width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latency ms, interval index from the first arrival, has a latency and succeeded), per request."""
    key = ("per_request", width)
    if key not in series.memo:
        series.memo[key] = (series.e2e_ns / 1e6, ((series.t - series.t[0]) // width).astype(np.int64),
                            series.ok & (series.e2e_ns >= 0))
    return series.memo[key]


def _pooled(series: Series, a: float, b: float, width: float) -> Lat:
    key = ("pooled", a, b, width)
    if key not in series.memo:
        lo, hi = np.searchsorted(series.t, [a, b])  # t is sorted: the range is a slice
        ms, block, good = (x[lo:hi] for x in _per_request(series, width))
        series.memo[key] = Lat(ms[good], block[good])
    return series.memo[key]


def _per_block(x: Lat, values: np.ndarray, stat: str) -> np.ndarray:
    """The median, or the mean of 0/1 ``values`` (a share; its sum is exact), of ``values`` (one per request
    of ``x``) in each interval holding >= 3 of its requests."""
    if x.size == 0:
        return np.empty(0)
    blk = x.block  # in arrival order (``_pooled`` slices the sorted series), so each interval is one run
    cut = np.flatnonzero(np.r_[True, blk[1:] != blk[:-1], True])
    size = np.diff(cut)
    out = group_medians(values, cut) if stat == "median" else np.add.reduceat(values, cut[:-1]) / size
    return out[size >= 3]


def block_p(v: np.ndarray, base: np.ndarray) -> float:
    """One-sided two-sample t-test p-value (pooled variance) on per-interval figures: the interval, not the
    request, is the unit. Pooled, because a short window has too few intervals to estimate its own spread
    (Welch's test on three intervals of a x12 step gave p = 0.015), and a rank test on three intervals
    cannot go below 1/C(n+3, 3)."""
    if v.size < 1 or base.size < 2 or v.size + base.size < 4:
        return 1.0
    p = ttest_greater_p(v, base)
    if math.isnan(p):  # no spread on either side: the figures either all rose or did not
        return 0.0 if v.min() > base.max() else 1.0
    return p


def _subsample(x: np.ndarray, rng) -> np.ndarray:
    return x if x.size <= _MW_MAX else rng.choice(x, _MW_MAX, replace=False)


def greater_p(a: np.ndarray, b: np.ndarray) -> float:
    """One-sided Mann-Whitney U p-value for "a tends to be larger than b" (seeded subsample)."""
    if a.size < 3 or b.size < 3:
        return 1.0
    rng = np.random.default_rng(0)
    return mannwhitney_greater_p(_subsample(a, rng), _subsample(b, rng))


def tail_p(v: np.ndarray, base: np.ndarray, threshold: float) -> float:
    """One-sided Fisher exact p-value for "a larger share of ``v`` than of ``base`` lies above ``threshold``".

    Two-sample on purpose: the baseline's p99 from a few hundred requests rests on a handful of them, so its
    own share above the threshold is counted with its noise, not taken as an exact 1%."""
    if v.size == 0 or base.size == 0:
        return 1.0
    kv, kb = int(np.count_nonzero(v > threshold)), int(np.count_nonzero(base > threshold))
    return fisher_greater_p(kv, v.size, kb, base.size)


def _level(v: Lat) -> float:
    """Segment level: mean of log p50 and log p99, the two columns PELT cut on."""
    if v.size == 0:
        return math.inf
    p50, p99 = v.pct()
    return 0.5 * (math.log(max(p50, 1e-9)) + math.log(max(p99, 1e-9)))


def _judge(v: Lat, base: Lat, min_ratio, alpha, a, b) -> Window | None:
    """A range is a spike when its median shifted or its tail grew by ``min_ratio``, significantly against
    the noise of both sides. Median: one-sided Mann-Whitney on the requests, and a t-test on the log
    per-interval medians. Tail: a larger share above the baseline's p99 than the baseline's own, by Fisher's exact test
    on the requests and a t-test on the per-interval shares. Both tests are two-sample, so a short
    baseline's own noise widens them; each must pass (the larger p counts), because the requests of one
    batch or one queue burst are slow together, and the per-interval test counts such a group once."""
    if v.size < 3 or base.size < 3:
        return None
    b50, b99 = base.pct()
    p50, p99 = v.pct()
    r50, r99 = p50 / b50, p99 / b99
    ps = []
    if r50 >= min_ratio:
        med = lambda x: x.memo("block_median", lambda: np.log(_per_block(x, x.ms, "median")))  # noqa: E731
        ps.append(max(greater_p(v.ms, base.ms), block_p(med(v), med(base))))
    if r99 >= min_ratio:
        share = lambda x: x.memo(("share", b99), lambda: _per_block(x, (x.ms > b99).astype(float), "mean"))  # noqa: E731
        ps.append(max(tail_p(v.ms, base.ms, b99), block_p(share(v), share(base))))
    p = min(ps) if ps else 1.0
    return Window(a, b, p50, p99, r50, r99, p, int(v.size)) if p < alpha else None


def parse_baseline(spec: str) -> tuple[str, object]:
    """``--baseline`` text -> ("span", (t0, t1)) | ("label", name) | ("run", path or run_id)."""
    text = spec.strip()
    head, sep, rest = text.partition(":")
    if head in ("label", "run") and sep and rest:
        return head, rest
    try:
        t0, t1 = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"diagnose: --baseline expects T0:T1 (seconds from the series' first request), "
                         f"label:NAME or run:PATH_OR_RUN_ID, got {spec!r}") from None
    if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
        raise ValueError(f"diagnose: --baseline {spec!r}: expected T0 < T1, both finite")
    return "span", (t0, t1)


def _matched(series: Series, kind: str, val: str) -> list[int]:
    """The runs of ``series`` a label:/run: baseline names (runs without requests left out)."""
    def hit(i: int) -> bool:
        m = series.runs[i].meta
        if kind == "label":
            return str(m.get("label")) == val
        p = series.runs[i].path
        return str(m.get("run_id")) == val or (p is not None and Path(val).resolve() in
                                               (Path(p).resolve(), Path(p).resolve().parent))

    return [i for i in range(len(series.runs)) if hit(i) and not math.isnan(series.run_bounds[i][0])]


def resolve_baselines(all_series: list[Series], spec: tuple[str, object]) -> list[tuple[float | None, float | None, str]]:
    """A parsed ``--baseline`` -> per series (start s, end s, why) on its own timeline; (None, None, why)
    where it falls back to the automatic baseline. A label:/run: names runs of some hosts only (a run id,
    a label one host never ran): a series without a matching run takes the matched runs' wall-clock span
    when it holds >= 3 of its successful requests, else the automatic baseline; ``why`` says which.
    ValueError when no run of any series matches."""
    kind, val = spec
    if kind == "span":
        t0, t1 = val
        return [(t0, t1, f"given: --baseline {t0:g}:{t1:g}")] * len(all_series)
    given = f"--baseline {kind}:{val}"
    out: list = [None] * len(all_series)
    wall = []  # matched (start, end) wall-clock ns, to map onto series without a match
    for k, s in enumerate(all_series):
        idx = _matched(s, kind, val)
        if idx:
            a, b = min(s.run_bounds[i][0] for i in idx), max(s.run_bounds[i][1] for i in idx)
            out[k] = (a, math.nextafter(b, math.inf), f"given: {given} ({len(idx)} run(s))")
            wall.append((s.t0_wall_ns + a * 1e9, s.t0_wall_ns + b * 1e9, s.name))
    if not wall:
        labels = sorted({str(r.meta.get("label")) for s in all_series for r in s.runs})
        raise ValueError(f"diagnose: {given} matches no run of {', '.join(s.name for s in all_series)} "
                         f"(labels: {labels}); give a label or run that was recorded, or T0:T1")
    wa, wb = min(w[0] for w in wall), max(w[1] for w in wall)
    hosts = ", ".join(w[2] for w in wall)
    for k, s in enumerate(all_series):
        if out[k] is not None:
            continue
        a, b = (wa - s.t0_wall_ns) / 1e9, math.nextafter((wb - s.t0_wall_ns) / 1e9, math.inf)
        v = s.select([(a, b)], full=False)
        n = int(np.count_nonzero((v.t >= a) & (v.t < b) & v.ok & (v.e2e_ns >= 0)))
        if n >= 3:
            out[k] = (a, b, f"given: {given} matches no run of {s.name}; the same wall-clock span as the "
                            f"matched run(s) on {hosts}")
        else:
            out[k] = (None, None, f"{given} matches no run of {s.name}, and its requests do not overlap the "
                                  f"matched run(s) on {hosts} ({n} in that span); ")
    return out


def _auto_baseline(segments, lens, pooled, min_len: int, min_ratio, alpha) -> tuple[int, int, str]:
    """The healthy regime: the lowest-latency stretch of adjacent calm segments at least ``min_len``
    intervals long. Anchors are tried from the lowest level up; around each, adjacent segments join while
    they are no spike against it (``_judge``: the same effect size and significance a window needs), so a
    calm stretch that PELT cut into short pieces is one baseline, and a saturated plateau at the end of the
    run is not taken for normal because it alone is long enough. Returns (first, last) segment, why."""
    order = sorted(range(len(segments)), key=lambda i: _level(pooled[i]))
    best = None
    for anchor in order:
        ref = pooled[anchor]
        lo = hi = anchor
        while lo > 0 and _touching(segments, lo - 1, lo) and _judge(pooled[lo - 1], ref, min_ratio, alpha,
                                                                     *segments[lo - 1]) is None:
            lo -= 1
        while hi + 1 < len(segments) and _touching(segments, hi, hi + 1) and _judge(
                pooled[hi + 1], ref, min_ratio, alpha, *segments[hi + 1]) is None:
            hi += 1
        total = sum(lens[lo:hi + 1])
        if total >= min_len:
            why = (f"automatic: the lowest-latency stretch of >= {min_len} intervals; "
                   f"{hi - lo + 1} adjacent segment(s), {total} intervals, none a spike against the calmest "
                   f"of them ({segments[anchor][0]:.1f}-{segments[anchor][1]:.1f} s)")
            return lo, hi, why
        if best is None or total > best[2]:
            best = (lo, hi, total, anchor)
    lo, hi, total, anchor = best
    return lo, hi, (f"automatic: no calm stretch reaches {min_len} intervals; the longest ({total} intervals, "
                    f"{hi - lo + 1} segment(s)) was taken")


def _touching(segments, i: int, j: int) -> bool:
    """Segments i and j meet (no idle gap of empty intervals between them)."""
    return math.isclose(segments[i][1], segments[j][0])


def _trim(iv: Intervals, a: float, b: float, b50: float, b99: float, min_ratio: float) -> tuple[float, float]:
    """Cut [a, b) down to the intervals from the first to the last one above the baseline: p50 or p99 at
    least sqrt(min_ratio) (the geometric midpoint between normal and a spike) times the baseline's. PELT
    places a change point where the cost is lowest, which can leave flat intervals at a window's edges."""
    edge = math.sqrt(min_ratio)
    k = np.flatnonzero((iv.edges[:-1] >= a - 1e-9) & (iv.edges[1:] <= b + 1e-9) & ~np.isnan(iv.p99_ms))
    above = k[(iv.p50_ms[k] >= edge * b50) | (iv.p99_ms[k] >= edge * b99)]
    if above.size == 0:
        return a, b
    return float(iv.edges[above[0]]), float(iv.edges[above[-1] + 1])


def detect(series: Series, interval_s: float | None = None, min_ratio: float = MIN_RATIO,
           alpha: float = ALPHA, baseline: tuple[float | None, float | None, str] | None = None) -> Detection:
    """Spike windows of one series. baseline: a ``resolve_baselines`` entry, or None for the automatic one
    (so is an entry without a span: its ``why`` then leads the automatic reason)."""
    try:
        return _detect(series, interval_s, min_ratio, alpha, baseline)
    finally:
        series.memo.clear()  # per-request arrays: a series kept for plots need not carry them


def _detect(series: Series, interval_s, min_ratio, alpha, baseline) -> Detection:
    width = interval_s or auto_interval(series)
    iv = intervals(series, width)
    good = np.flatnonzero(~np.isnan(iv.p99_ms))
    if good.size == 0:
        return Detection(width, iv, [], None, [], "no successful request with a latency")
    starts = change_points(iv)
    seg_idx = [(good[s], good[e - 1] if e > 0 else good[-1])
               for s, e in zip(starts, starts[1:] + [good.size], strict=True)]
    segments = [(float(iv.edges[a]), float(iv.edges[b + 1])) for a, b in seg_idx]
    lens = [int(np.count_nonzero((good >= a) & (good <= b))) for a, b in seg_idx]
    pooled = [_pooled(series, *ab, width) for ab in segments]
    ba, bb, why = baseline or (None, None, "")
    if ba is None:
        min_len = max(3, int(0.1 * good.size))
        lo, hi, auto_why = _auto_baseline(segments, lens, pooled, min_len, min_ratio, alpha)
        why += auto_why
        ba, bb = segments[lo][0], segments[hi][1]
        cands = [ab for i, ab in enumerate(segments) if not lo <= i <= hi]
    else:
        cands = [(x, y) for a, b in segments for x, y in ((a, min(b, ba)), (max(a, bb), b)) if y > x]
    base = _pooled(series, ba, bb, width)
    if base.size < 3:
        raise ValueError(f"diagnose: the baseline {ba:.1f}-{bb:.1f} s of {series.name} holds {base.size} "
                         "successful requests (at least 3 needed); pick a longer span")
    b50, b99 = base.pct()
    base_w = Window(ba, bb, b50, b99, 1.0, 1.0, 1.0, int(base.size))
    spikes = [(a, b) for a, b in cands if _judge(_pooled(series, a, b, width), base, min_ratio, alpha, a, b)]
    # Only spike segments merge: a calm segment after a spike is not folded into it.
    groups: list[list[tuple[float, float]]] = []
    for a, b in spikes:
        if groups and math.isclose(groups[-1][-1][1], a):
            groups[-1].append((a, b))
        else:
            groups.append([(a, b)])
    wins: list[Window] = []
    for g in groups:
        merged = _window(series, iv, width, base, min_ratio, alpha, g[0][0], g[-1][1])
        wins += [merged] if merged else [w for w in (_window(series, iv, width, base, min_ratio, alpha, a, b)
                                                     for a, b in g) if w]
    return Detection(width, iv, segments, base_w, wins, why)


def _window(series, iv, width, base: Lat, min_ratio, alpha, a, b) -> Window | None:
    """Judge [a, b) trimmed to the intervals above the baseline; untrimmed when the trimmed one fails."""
    ta, tb = _trim(iv, a, b, *base.pct(), min_ratio)
    return (_judge(_pooled(series, ta, tb, width), base, min_ratio, alpha, ta, tb)
            or _judge(_pooled(series, a, b, width), base, min_ratio, alpha, a, b))
