"""aurora compare: bootstrap intervals, Mann-Whitney, load matching, thresholds, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aurora_core.cli import main
from aurora_core.diagnose.compare import bootstrap_delta, compare
from aurora_core.diagnose.html import compare_page
from aurora_core.diagnose.report import text_compare
from aurora_core.recorder import Recorder
from aurora_core.records import RequestRecord, Sample


def make_run(path, *, n=600, rate=100.0, preprocess_ms=2.0, compute_ms=5.0, seed=0, meta=None, cpu=None, gpu=None):
    """Independent requests with lognormal stage times (sigma 0.25), Poisson arrivals at ``rate``.
    cpu / gpu: constant telemetry ({metric: value}) sampled every 0.1 s on a 2-core host, source "cpu" / "gpu0"."""
    rng = np.random.default_rng(seed)
    t = 1_000_000_000 + np.cumsum(rng.exponential(1 / rate, n) * 1e9).astype(np.int64)
    with Recorder(path, meta={"label": "x", "cpu": {"model": "test", "logical_cores": 2}, **(meta or {})}) as rec:
        for ts in range(int(t[0]) if n else 0, int(t[-1]) if n else 0, 100_000_000):
            for source, values in (("cpu", cpu), ("gpu0", gpu)):
                if values:
                    rec.add_sample(Sample(ts, source, dict(values)))
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
    assert "REGRESSION" in text_compare(res)
    page = compare_page(res).render()
    assert "<table>" in page and "REGRESSION" in page and "data-question='Deployment gate'" in page
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
    assert "preprocess" not in compare(before, after, threshold=0.10, n_boot=200, min_delta_ms=0)["regressions"]
    assert "preprocess" in compare(before, after, threshold=0.02, n_boot=200, min_delta_ms=0)["regressions"]
    # +0.1 ms is beyond 2% but below the absolute floor (timer and scheduler granularity): no regression
    res = compare(before, after, threshold=0.02, n_boot=200)
    assert "preprocess" not in res["regressions"] and res["min_delta_ms"] == 0.5


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


# A 2-core host: this process at 60% of one core (30% of the CPU) while the CPU is 50% busy (others 20%, 0.4
# core), against the CPU 100% busy with two busy loops beside it (others 80%, 1.6 cores: aurora bench's
# "CPU-contended" and diagnose's +0.5 core both hold).
QUIET = {"cpu_util_pct": 50.0, "proc_cpu_pct": 60.0, "steal_pct": 0.0, "runq": 1.0}
BUSY = {"cpu_util_pct": 100.0, "proc_cpu_pct": 40.0, "steal_pct": 0.0, "runq": 6.0}


def test_runs_without_enough_requests_are_bad_input(tmp_path, capsys):
    """No requests (or a handful) on a side: exit 2 naming that run, never nan figures and a pass."""
    full = make_run(tmp_path / "full", seed=20, meta={"offered_rate_per_s": 100})
    empty = make_run(tmp_path / "empty", n=0, meta={"offered_rate_per_s": 100})
    few = make_run(tmp_path / "few", n=6, seed=21, meta={"offered_rate_per_s": 100})
    with pytest.raises(ValueError, match="AFTER .*empty.* has no requests; at least 10"):
        compare(full, empty, n_boot=100)
    with pytest.raises(ValueError, match="AFTER .*few.* has 6 ok requests"):
        compare(full, few, n_boot=100)
    capsys.readouterr()
    for pair in ((empty, full), (full, empty), (empty, empty), (few, full)):
        assert main(["compare", str(pair[0]), str(pair[1]), "--boot", "100"]) == 2
        out = capsys.readouterr()
        assert "nan" not in out.out + out.err and out.out == ""
        assert out.err.startswith("aurora compare: error: BEFORE" if pair[0] != full else "aurora compare: error: AFTER")


@pytest.mark.parametrize("after_env", [
    {"cpu": BUSY},                                                       # noisy neighbour
    {"cpu": {**QUIET, "steal_pct": 12.0}},                               # the hypervisor ran someone else
    {"cpu": {**QUIET, "cgroup_throttled_frac": 0.3}},                    # cgroup CPU quota
    {"cpu": QUIET, "gpu": {"throttle_frac_power": 0.4, "sm_clock_mhz": 900.0, "power_limit_w": 500.0}},  # cap lowered
])
def test_unmatched_environment_is_not_a_regression(tmp_path, capsys, after_env):
    """Same code, AFTER on a contended or throttled machine and slower everywhere: the gate says the
    environment was not matched, with the evidence, and blames no stage."""
    meta = {"offered_rate_per_s": 100}
    gpu = {"throttle_frac_power": 0.0, "sm_clock_mhz": 1400.0, "power_limit_w": 700.0} if "gpu" in after_env else None
    before = make_run(tmp_path / "b", seed=22, meta=meta, cpu=QUIET, gpu=gpu)
    after = make_run(tmp_path / "a", seed=23, meta=meta, preprocess_ms=3.0, compute_ms=7.0, **after_env)
    res = compare(before, after, n_boot=200)
    assert res["load"]["matched"] and not res["environment"]["matched"]
    assert res["verdict"] == "environment not matched" and res["regressions"] == []
    assert all(not r.get("regression") for r in res["stages"])
    assert _row(res, "preprocess")["p50_rel"] > 0.3  # the table stays, as information
    finding = res["environment"]["findings"][0]
    assert finding.startswith("AFTER") and len(res["environment"]["findings"]) == 1
    if after_env["cpu"] is BUSY:
        assert "CPU-contended: other processes used 80% of the CPU against this one's 20% (BEFORE: 20%)" in finding
    json.dumps(res)
    # Either direction: a contended BEFORE could hide a regression just as well.
    assert compare(after, before, n_boot=100)["verdict"] == "environment not matched"
    capsys.readouterr()
    assert main(["compare", str(before), str(after), "--boot", "100"]) == 0
    out = capsys.readouterr().out
    assert "environment not matched: AFTER" in out and "REGRESSION" not in out.replace("NOT MATCHED", "")
    assert main(["compare", str(before), str(after), "--boot", "100", "--fail-on-unmatched-load"]) == 3
    assert main(["compare", str(before), str(after), "--boot", "100", "--fail-on-unmatched"]) == 3


def test_environment_margins_are_settings(tmp_path, capsys):
    """The environment check's margins are diagnose's settings: AFTER's 12% steal is a finding at the default
    5 points, and with steal_more=20 the machines count as matched and the slower preprocess is judged."""
    from aurora_core.diagnose.settings import Settings

    meta = {"offered_rate_per_s": 100}
    before = make_run(tmp_path / "b", seed=40, meta=meta, cpu=QUIET)
    after = make_run(tmp_path / "a", seed=41, meta=meta, preprocess_ms=3.0, cpu={**QUIET, "steal_pct": 12.0})
    assert compare(before, after, n_boot=100)["verdict"] == "environment not matched"
    res = compare(before, after, n_boot=100, settings=Settings(steal_more=20.0))
    assert res["environment"]["matched"] and res["verdict"] == "regression", res["environment"]
    assert res["environment"]["margins"]["steal_more"] == 20.0
    args = ["compare", str(before), str(after), "--boot", "100", "--json"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["environment"]["margins"]["steal_more"] == 5.0
    assert main([*args, "--set", "steal_more=20"]) == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "regression"
    for bad in ("stage_shift=2", "steal_more=x", "steal_more=-1"):
        assert main([*args, "--set", bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("aurora compare: error: ") and err.count("\n") == 1, err
    assert "compare: --set expects NAME=VALUE with NAME one of cgroup_throttled_more, others_cores_more, " \
           "steal_more, throttled_more" in (main([*args, "--set", "claim=1"]), capsys.readouterr().err)[1]


def test_matched_environment_still_gates(tmp_path):
    """The check looks at other processes, not this one: a deploy that burns more CPU itself (190% of a
    core, the CPU saturated) is still a regression, and so it is with both sides equally contended."""
    meta = {"offered_rate_per_s": 100}
    before = make_run(tmp_path / "b", seed=24, meta=meta, cpu=QUIET)
    hungry = make_run(tmp_path / "a", seed=25, meta=meta, preprocess_ms=3.0,
                      cpu={"cpu_util_pct": 100.0, "proc_cpu_pct": 190.0, "steal_pct": 0.0})
    res = compare(before, hungry, n_boot=200)
    assert res["environment"]["matched"] and res["verdict"] == "regression" and "preprocess" in res["regressions"]
    both = [make_run(tmp_path / f"c{i}", seed=26 + i, meta=meta, cpu=BUSY, preprocess_ms=2.0 + i) for i in (0, 1)]
    res = compare(*both, n_boot=200)
    assert res["environment"]["matched"] and res["verdict"] == "regression"
    # A GPU clock reason that does not limit work (low_util) is no environment change.
    lazy = [make_run(tmp_path / f"g{i}", seed=28 + i, meta=meta, gpu={"throttle_frac_low_util": 0.6 * i})
            for i in (0, 1)]
    assert compare(*lazy, n_boot=100)["environment"]["matched"]


def test_limits_the_deploy_trips_itself_still_gate(tmp_path):
    """A deploy that burns more CPU runs into its cgroup quota, and one that draws more power into the GPU's
    cap: at matched load that is the regression, not the machine. Only a lowered power limit, or quota
    throttling at flat own CPU, moves the blame to the environment."""
    meta = {"offered_rate_per_s": 100}
    before = make_run(tmp_path / "b", seed=40, meta=meta, cpu={**QUIET, "cgroup_throttled_frac": 0.0},
                      gpu={"throttle_frac_power": 0.0, "power_limit_w": 700.0})
    hungry = make_run(tmp_path / "a", seed=41, meta=meta, preprocess_ms=3.0,
                      cpu={**QUIET, "cpu_util_pct": 70.0, "proc_cpu_pct": 120.0, "cgroup_throttled_frac": 0.3},
                      gpu={"throttle_frac_power": 0.4, "power_limit_w": 700.0})
    res = compare(before, hungry, n_boot=200)
    assert res["environment"]["matched"], res["environment"]
    assert res["verdict"] == "regression" and "preprocess" in res["regressions"]


def test_cpu_of_a_server_on_this_host_is_not_a_neighbour(tmp_path):
    """aurora bench --url: the server is another process, so its CPU is not another tenant's (as in bench)."""
    meta = {"offered_rate_per_s": 100, "config": {"url": "http://127.0.0.1:8000/v1/classify"}}
    before = make_run(tmp_path / "b", seed=42, meta=meta, cpu=QUIET)
    after = make_run(tmp_path / "a", seed=43, meta=meta, preprocess_ms=3.0, cpu=BUSY)
    res = compare(before, after, n_boot=200)
    assert res["environment"]["matched"] and res["verdict"] == "regression"


def test_interrupted_run_warns(tmp_path, capsys):
    b = make_run(tmp_path / "b", seed=30, meta={"offered_rate_per_s": 100})
    a = make_run(tmp_path / "a", seed=31, meta={"offered_rate_per_s": 100, "interrupted": True})
    res = compare(b, a, n_boot=100)
    assert len(res["warnings"]) == 1 and "AFTER run" in res["warnings"][0] and "interrupted" in res["warnings"][0]
    assert res["verdict"] == "no regression"
    capsys.readouterr()
    assert main(["compare", str(b), str(a), "--boot", "100"]) == 0
    assert "WARNING: AFTER run" in capsys.readouterr().out


@pytest.mark.parametrize("opts, msg", [
    (["--boot", "0"], "--boot"), (["--boot", "-5"], "--boot"), (["--threshold", "-1"], "--threshold"),
    (["--alpha", "2"], "--alpha"), (["--alpha", "0"], "--alpha"), (["--load-tolerance", "-1"], "--load-tolerance"),
    (["--threshold", "nan"], "--threshold"), (["--html", "/nonexistent-dir/x.html"], "--html"),
])
def test_cli_rejects_bad_options_in_one_line(tmp_path, capsys, opts, msg):
    b = make_run(tmp_path / "b", n=50, seed=32)
    assert main(["compare", str(b), str(b), *opts]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("aurora compare: error: ") and msg in out.err and out.err.count("\n") == 1


def test_cli_html_write_failure_is_exit_2(tmp_path, capsys):
    b = make_run(tmp_path / "b", n=50, seed=33)
    target = tmp_path / "page.html"
    target.mkdir()  # the directory exists, but the file cannot be opened for writing
    assert main(["compare", str(b), str(b), "--boot", "100", "--html", str(target)]) == 2
    assert capsys.readouterr().err.startswith("aurora compare: error: cannot write --html")
    assert main(["compare", str(b), str(b), "--boot", "100", "--html", str(tmp_path / "ok.html")]) == 0
    assert "Before / after comparison" in (tmp_path / "ok.html").read_text()


def test_cli_run_without_label(tmp_path, capsys):
    b = make_run(tmp_path / "b", n=50, seed=34, meta={"label": None})
    assert main(["compare", str(b), str(b), "--boot", "100"]) == 0
    out = capsys.readouterr().out
    assert "(label -)" in out and "None" not in out
