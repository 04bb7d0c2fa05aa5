"""aurora compare: bootstrap intervals, Mann-Whitney, load matching, thresholds, exit codes."""

from __future__ import annotations

import json

import numpy as np

from aurora_core.cli import main
from aurora_core.diagnose.compare import bootstrap_delta, compare
from aurora_core.diagnose.report import render_section, text_compare
from aurora_core.recorder import Recorder
from aurora_core.records import RequestRecord


def make_run(path, *, n=600, rate=100.0, preprocess_ms=2.0, compute_ms=5.0, seed=0, meta=None):
    """Independent requests with lognormal stage times (sigma 0.25), Poisson arrivals at ``rate``."""
    rng = np.random.default_rng(seed)
    t = 1_000_000_000 + np.cumsum(rng.exponential(1 / rate, n) * 1e9).astype(np.int64)
    with Recorder(path, meta={"label": "x", **(meta or {})}) as rec:
        for i in range(n):
            a = int(t[i])
            q = int(rng.lognormal(np.log(0.5e6), 0.25))
            dec = int(rng.lognormal(np.log(1e6), 0.25))
            pre = int(rng.lognormal(np.log(preprocess_ms * 1e6), 0.25))
            com = int(rng.lognormal(np.log(compute_ms * 1e6), 0.25))
            r = RequestRecord(request_id=i, arrival_ns=a, enqueue_ns=a + 1000, batch_closed_ns=a + q,
                              decode_start_ns=a + q, decode_end_ns=a + q + dec, preprocess_start_ns=a + q + dec,
                              preprocess_end_ns=a + q + dec + pre, compute_start_ns=a + q + dec + pre,
                              compute_end_ns=a + q + dec + pre + com, d2h_end_ns=a + q + dec + pre + com + 1000,
                              completion_ns=a + q + dec + pre + com + 2000, batch_id=i, batch_size=1, bucket=1)
            rec(r)
    return path


def _row(res, stage):
    return next(r for r in res["stages"] if r["stage"] == stage)


def test_bootstrap_interval_covers_a_known_shift():
    rng = np.random.default_rng(0)
    b = rng.normal(10, 1, 2000)
    a = rng.normal(11, 1, 2000)  # true p50 shift 1.0
    lo, hi = bootstrap_delta(b, a, 50, 500, np.random.default_rng(1))
    assert lo < 1.0 < hi and lo > 0.8 and hi < 1.2
    lo, hi = bootstrap_delta(b, rng.normal(10, 1, 2000), 50, 500, np.random.default_rng(2))
    assert lo < 0 < hi  # no shift: the interval straddles 0


def test_slower_preprocess_is_a_regression_and_only_there(tmp_path):
    before = make_run(tmp_path / "b", seed=1, meta={"offered_rate_per_s": 100})
    after = make_run(tmp_path / "a", seed=2, preprocess_ms=3.0, meta={"offered_rate_per_s": 100})
    res = compare(before, after, n_boot=300)
    assert res["load"]["matched"] and res["verdict"] == "regression"
    assert "preprocess" in res["regressions"]
    for stage in ("decode", "compute_item", "queue"):
        assert stage not in res["regressions"]
    row = _row(res, "preprocess")
    assert row["p50_ci_ms"][0] > 0 and 0.3 < row["p50_rel"] < 0.7
    assert row["mw_p_greater"] < 1e-6
    assert "REGRESSION" in text_compare(res) and "<table>" in render_section(res)
    json.dumps(res)


def test_same_config_is_not_a_regression(tmp_path):
    before = make_run(tmp_path / "b", seed=3)
    after = make_run(tmp_path / "a", seed=4)
    res = compare(before, after, n_boot=300)
    assert res["load"]["basis"] == "measured" and res["load"]["matched"]
    assert res["verdict"] == "no regression" and res["regressions"] == []


def test_threshold_is_configurable(tmp_path):
    before = make_run(tmp_path / "b", n=3000, seed=5)
    after = make_run(tmp_path / "a", n=3000, seed=6, preprocess_ms=2.1)  # +5%
    assert "preprocess" not in compare(before, after, threshold=0.10, n_boot=200)["regressions"]
    assert "preprocess" in compare(before, after, threshold=0.02, n_boot=200)["regressions"]


def test_unmatched_load_is_not_judged(tmp_path):
    before = make_run(tmp_path / "b", seed=7, rate=100, meta={"offered_rate_per_s": 100})
    # More load and a genuinely slower preprocess: still no verdict, because load differs.
    after = make_run(tmp_path / "a", seed=8, rate=120, preprocess_ms=4.0, meta={"offered_rate_per_s": 120})
    res = compare(before, after, n_boot=200)
    assert not res["load"]["matched"] and res["verdict"] == "load not matched"
    assert res["regressions"] == [] and "load not matched" in res["load"]["warning"]


def test_measured_rate_mismatch_needs_more_than_noise(tmp_path):
    """Without an offered rate, a +50% measured rate over 600 requests is unmatched; +3% is noise."""
    b = make_run(tmp_path / "b", seed=9, rate=100)
    res = compare(b, make_run(tmp_path / "a", seed=10, rate=150), n_boot=100)
    assert not res["load"]["matched"]
    res = compare(b, make_run(tmp_path / "c", seed=11, rate=103), n_boot=100)
    assert res["load"]["matched"]


def test_cli_exit_codes(tmp_path, capsys):
    b = make_run(tmp_path / "b", seed=12, meta={"offered_rate_per_s": 100})
    same = make_run(tmp_path / "same", seed=13, meta={"offered_rate_per_s": 100})
    slow = make_run(tmp_path / "slow", seed=14, preprocess_ms=3.0, meta={"offered_rate_per_s": 100})
    more = make_run(tmp_path / "more", seed=15, rate=130, meta={"offered_rate_per_s": 130})
    assert main(["compare", str(b), str(same), "--boot", "100"]) == 0
    assert main(["compare", str(b), str(slow), "--boot", "100"]) == 1
    assert main(["compare", str(b), str(more), "--boot", "100"]) == 0
    assert main(["compare", str(b), str(more), "--boot", "100", "--fail-on-unmatched-load"]) == 3
    capsys.readouterr()
    assert main(["compare", str(b), str(slow), "--boot", "100", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "regression"
    assert main(["compare", str(b), str(tmp_path / "missing")]) == 2
