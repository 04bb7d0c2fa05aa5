"""Spike detection on simulated runs: the baseline is the healthy regime, windows are significant against
both sides' noise, window edges (issue 18). Deterministic: seeded arrivals and service times."""

from __future__ import annotations

import numpy as np
import pytest
from test_incidents import simulate_run

from aurora_core.cli import main
from aurora_core.diagnose import diagnose
from aurora_core.diagnose.causes import load_rose
from aurora_core.diagnose.spikes import Intervals, _trim, parse_baseline
from aurora_core.loadgen import poisson_schedule, step_schedule
from aurora_core.recorder import load_run

WIDTHS = [None, 0.1, 0.25, 0.5]  # automatic, and the fine widths that chopped the calm half


def _ramp(lo: float, hi: float, dur: float, seed: int) -> np.ndarray:
    """Poisson arrivals whose rate rises linearly from lo to hi over dur (thinning), seconds."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / hi, int(hi * dur * 1.5)))
    t = t[t < dur]
    return t[rng.random(t.size) < (lo + (hi - lo) * t / dur) / hi]


def _single_server(tmp_path, name, arrivals, item_ms=lambda t: 6.0, seed=1):
    """One request at a time, 8 ms of service (2 ms CPU + 6 ms compute): 125/s capacity."""
    return simulate_run(tmp_path / name, arrivals, meta={"label": "v1"}, item_ms=item_ms, max_batch=1, seed=seed)


def _covering(series: dict, t: float) -> list[dict]:
    return [w for w in series["windows"] if w["start_s"] <= t < w["end_s"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("spikes")
    return {
        # +20% at 10 s from 0.8 of capacity: the queue grows after the step and the run ends inside it.
        **{f"step{s}": _single_server(d, f"step{s}", step_schedule([(0, 100), (10, 120)], 20, seed=s) / 1e9)
           for s in (0, 1)},
        "ramp": _single_server(d, "ramp", _ramp(100, 120, 20, 0)),
        # a cold start: service twice as slow for the first 2 s, then normal
        "cold": _single_server(d, "cold", poisson_schedule(100, 20, seed=0) / 1e9,
                               item_ms=lambda t: 12.0 if t < 2 else 6.0),
    }


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", ["step0", "step1"])
def test_step_that_holds_to_the_end_of_the_run(runs, name, width):
    """The saturated plateau after the step is never the baseline (at 0.1 s the old detector took it, and
    found nothing or an inconclusive window): the calm first half, cut by PELT into short pieces, is."""
    s = diagnose([runs[name]], interval_s=width).data["series"][0]
    b = s["baseline"]
    assert b["start_s"] < 1.0 and b["end_s"] <= 12.5, s
    w = _covering(s, 14.0)
    assert w and w[0]["verdict"] == "load", s["windows"]
    assert "lowest-latency" in s["baseline_reason"]


@pytest.mark.parametrize("width", WIDTHS)
def test_slow_ramp_over_the_whole_run(runs, width):
    s = diagnose([runs["ramp"]], interval_s=width).data["series"][0]
    assert s["baseline"]["start_s"] < 1.0 and s["baseline"]["end_s"] < 15.0, s["baseline"]
    late = [w for w in s["windows"] if w["end_s"] > 17.0]  # the slowest part of the run is a window
    assert late and all(w["verdict"] in ("load", "inconclusive") for w in s["windows"]), s["windows"]


@pytest.mark.parametrize("width", WIDTHS)
def test_cold_start_is_the_spike(runs, width):
    s = diagnose([runs["cold"]], interval_s=width).data["series"][0]
    assert 2.0 <= s["baseline"]["start_s"] < 4.0 and s["baseline"]["end_s"] > 9.0, s["baseline"]
    w = _covering(s, 1.0)
    assert w and w[0]["ratio_p50"] > 3, s["windows"]


def test_explicit_baseline_span_label_and_run(tmp_path, runs, capsys):
    res = diagnose([runs["step1"]], baseline="0:9.5")
    s = res.data["series"][0]
    assert (s["baseline"]["start_s"], s["baseline"]["end_s"]) == (0.0, 9.5)
    assert s["baseline_reason"].startswith("given") and _covering(s, 18.0)
    assert all(w["start_s"] >= 9.5 or w["end_s"] <= 0.0 for w in s["windows"])
    a = simulate_run(tmp_path / "a", poisson_schedule(40, 6, seed=1) / 1e9, meta={"label": "v1", "host": "h"},
                     item_ms=lambda t: 6.0, seed=1)
    b = simulate_run(tmp_path / "b", poisson_schedule(40, 6, seed=2) / 1e9, meta={"label": "v2", "host": "h"},
                     item_ms=lambda t: 15.0, seed=2)
    ra, rb = load_run(a), load_run(b)
    rb.meta["wall_minus_mono_ns"] = (ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].max()) + 100_000_000
                                     - int(rb.requests["arrival_ns"].min()))
    for spec in ("label:v1", f"run:{a}"):
        s = diagnose([ra, rb], baseline=spec).data["series"][0]
        a0, a1 = diagnose([ra, rb]).series[0].run_bounds[0]
        assert s["baseline"]["start_s"] == pytest.approx(a0, abs=1e-3), spec
        assert s["baseline"]["end_s"] == pytest.approx(a1, abs=1e-3), spec
        assert spec in s["baseline_reason"]
        assert [w["verdict"] for w in s["windows"]] == ["regression"], s["windows"]
    with pytest.raises(ValueError, match="matches no run"):
        diagnose([ra, rb], baseline="label:v9")
    for bad in ("5", "3:1", "a:b", "1:nan"):
        with pytest.raises(ValueError, match="--baseline"):
            parse_baseline(bad)
    assert main(["diagnose", str(a), str(b), "--baseline", "label:v1"]) == 0
    out = capsys.readouterr().out
    assert "normal (baseline)" in out and "why: given: --baseline label:v1" in out
    assert main(["diagnose", str(a), "--baseline", "label:nope"]) == 2


def test_baseline_naming_runs_of_one_host_only(tmp_path, capsys):
    """label:/run: naming runs of some hosts only (a run id, a label one host never ran) is no error: a
    host without a matching run takes their wall-clock span, or its automatic baseline when its requests
    do not overlap that span; its baseline_reason says which. An error only when no host matches."""
    a = simulate_run(tmp_path / "a", poisson_schedule(40, 6, seed=1) / 1e9, meta={"label": "v1", "host": "h1"},
                     item_ms=lambda t: 6.0, seed=1)
    b = simulate_run(tmp_path / "b", poisson_schedule(40, 6, seed=2) / 1e9, meta={"label": "v2", "host": "h1"},
                     item_ms=lambda t: 15.0, seed=2)
    c = simulate_run(tmp_path / "c", poisson_schedule(40, 12, seed=3) / 1e9, meta={"label": "v2", "host": "h2"},
                     item_ms=lambda t: 6.0 if t < 6 else 15.0, seed=3)
    ra, rb, rc, rd = load_run(a), load_run(b), load_run(c), load_run(c)
    rb.meta["wall_minus_mono_ns"] = (ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].max()) + 100_000_000
                                     - int(rb.requests["arrival_ns"].min()))
    rd.meta.update(host="h3", wall_minus_mono_ns=rd.wall_minus_mono_ns + 3600 * 10**9)  # an hour later
    for spec in ("label:v1", f"run:{a}", f"run:{ra.meta['run_id']}"):
        res = diagnose([ra, rb, rc, rd], baseline=spec)
        h1, h2, h3 = (next(x for x in res.data["series"] if x["name"] == n) for n in ("h1", "h2", "h3"))
        s1, s2 = (next(x for x in res.series if x.name == n) for n in ("h1", "h2"))
        assert h1["baseline_reason"] == f"given: --baseline {spec} (1 run(s))"
        shift = (s1.t0_wall_ns - s2.t0_wall_ns) / 1e9  # h1's seconds -> h2's
        assert h2["baseline"]["start_s"] == pytest.approx(h1["baseline"]["start_s"] + shift, abs=1e-3)
        assert h2["baseline"]["end_s"] == pytest.approx(h1["baseline"]["end_s"] + shift, abs=1e-3)
        assert h2["baseline_reason"].startswith(f"given: --baseline {spec} matches no run of h2; the same "
                                                "wall-clock span as the matched run(s) on h1"), h2
        assert _covering(h2, 9.0) and not _covering(h2, 3.0), h2["windows"]
        assert h3["baseline_reason"].startswith(f"--baseline {spec} matches no run of h3, and its requests do "
                                                "not overlap"), h3
        assert "automatic: the lowest-latency" in h3["baseline_reason"] and h3["baseline"]["start_s"] < 1.0
    with pytest.raises(ValueError, match="matches no run of h1, h2, h3"):
        diagnose([ra, rb, rc, rd], baseline="label:v9")
    for spec in ("label:v1", f"run:{a}", f"run:{ra.meta['run_id']}"):
        assert main(["diagnose", str(a), str(c), "--baseline", spec]) == 0, spec
        assert "why: given: --baseline " + spec + " matches no run of h2" in capsys.readouterr().out
    assert main(["diagnose", str(a), str(c), "--baseline", "label:v9"]) == 2


def _null_pair(tmp_path, seed, rate=40.0, max_batch=8, item=8.0, meta=None):
    """Two back-to-back runs of one configuration (the second starts 25 ms after the first's last arrival)."""
    meta = {"label": "v1", "host": "h", **(meta or {})}
    runs = [load_run(simulate_run(tmp_path / f"{n}{seed}", poisson_schedule(rate, 6, seed=2 * seed + k) / 1e9, meta=meta,
                                  item_ms=lambda t: item, max_batch=max_batch, seed=2 * seed + k))
            for k, n in enumerate("ab")]
    ra, rb = runs
    rb.meta["wall_minus_mono_ns"] = (ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].max()) + 25_000_000
                                     - int(rb.requests["arrival_ns"].min()))
    return diagnose(runs)


def _long_run(tmp_path, seed):
    """One steady 60 s run."""
    return diagnose([simulate_run(tmp_path / f"long{seed}", poisson_schedule(40, 60, seed=seed + 500) / 1e9,
                                  meta={"label": "v1"}, item_ms=lambda t: 8.0, seed=seed)])


NULL_CASES = {
    "pair, batching at 40/s": _null_pair,
    "one long steady run": _long_run,
    # Near saturation (one request at a time, 0.72 of capacity): the previous detector claimed a cause
    # in 3 of these 20 (a Poisson burst against a short calm baseline, taken as "load").
    "pair, one at a time at 90/s": lambda p, s: _null_pair(p, s, rate=90.0, max_batch=1, item=6.0),
    # The runs say what was offered (aurora bench writes it): the previous detector claimed 2 of 20.
    "pair, batching at 60/s, offered rate in meta": lambda p, s: _null_pair(p, s, rate=60.0,
                                                                               meta={"offered_rate_per_s": 60.0}),
}


@pytest.mark.parametrize("case", list(NULL_CASES))
def test_null_cases_claim_nothing_in_19_of_20_seeds(tmp_path, case):
    """Poisson noise alone (no change): a cause is claimed in at most 1 of 20 seeded repetitions (issue 18
    asks for >= 19 of 20 claiming nothing; these seeds claim nothing in 20 of 20). Spike windows left
    inconclusive are allowed: a queue burst is a real slowdown, with no cause to name."""
    claims = []
    for seed in range(20):
        res = NULL_CASES[case](tmp_path, seed)
        claimed = [w for s in res.data["series"] for w in s["windows"] if w["verdict"] != "inconclusive"]
        if claimed:
            claims.append((seed, res.data["summary"]))
    assert len(claims) <= 1, claims


def test_load_test_counts_the_baselines_own_noise():
    """The issue's case: a 5.5 s baseline at 35.5/s against an 11 s window at 41.4/s is z ~ 1.8 (no load
    claim); taken as exact, the baseline's rate gave z = 3.3."""
    from types import SimpleNamespace

    series = SimpleNamespace(run_bounds=[(0.0, 200.0)], runs=[SimpleNamespace(meta={})])
    base = SimpleNamespace(a=0.0, b=5.5, n_arrivals=195, rate=195 / 5.5)
    win = SimpleNamespace(a=10.0, b=21.0, n_arrivals=455, rate=455 / 11)
    rose, z = load_rose(series, base, win)
    assert not rose and z == pytest.approx(1.8, abs=0.1)
    big = SimpleNamespace(a=0.0, b=110.0, n_arrivals=3900, rate=3900 / 110)  # 20x the baseline: significant
    assert load_rose(series, big, win)[0]
    # When the run says what was offered, that decides: a steady issuer's burst is no load rise, a step is.
    series.runs[0].meta["offered_rate_per_s"] = 40.0
    assert not load_rose(series, big, win)[0]
    series.runs[0].meta = {"offered_schedule": [[0, 40.0], [10.0, 48.0]]}
    assert load_rose(series, base, win)[0] and not load_rose(series, big, win)[0]  # big: mostly after the step
    assert not load_rose(series, SimpleNamespace(a=12.0, b=30.0, n_arrivals=0, rate=0.0), win)[0]


def test_window_does_not_swallow_the_calm_time_after_it(tmp_path):
    """Compute x2.5 from 4 to 7 s of a 14 s run: the window ends at the spike's end (within an interval),
    not at the end of the calm segment after it."""
    run = simulate_run(tmp_path / "w", poisson_schedule(40, 14, seed=1) / 1e9, meta={"label": "v1"},
                       item_ms=lambda t: 15.0 if 4.0 <= t < 7.0 else 6.0, seed=3)
    for width in (None, 0.25, 0.5):
        s = diagnose([run], interval_s=width).data["series"][0]
        w = _covering(s, 5.5)
        assert w and w[0]["end_s"] <= 7.0 + 2 * s["interval_s"] + 0.3, (width, s["windows"], s["segments"])


def test_trim_cuts_flat_intervals_at_the_edges():
    edges = np.arange(11.0)
    p50 = np.array([10, 10, 10, 25, 30, 10, 28, 10, 10, np.nan], float)  # interval 9 is empty
    p50 = np.r_[p50, 10.0]
    iv = Intervals(edges, np.full(10, 50), p50[:10], np.where(np.isnan(p50[:10]), np.nan, 2 * p50[:10]))
    assert _trim(iv, 0.0, 10.0, 10.0, 20.0, 1.3) == (3.0, 7.0)  # the dip at 5 is inside: kept
    assert _trim(iv, 0.0, 3.0, 10.0, 20.0, 1.3) == (0.0, 3.0)   # nothing above: left alone
