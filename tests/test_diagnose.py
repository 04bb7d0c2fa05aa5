"""diagnose on simulated runs (deterministic): detection, each cause's evidence, inconclusive, output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_incidents import simulate_run

from aurora_core.cli import main
from aurora_core.diagnose import diagnose
from aurora_core.diagnose.html import diagnose_page
from aurora_core.diagnose.report import text_diagnose
from aurora_core.loadgen import poisson_schedule
from aurora_core.recorder import load_run
from aurora_core.records import Event, Sample, Span

DUR, RATE, STEP = 10.0, 40.0, 5.0


def _arrivals(seed=1):
    return poisson_schedule(RATE, DUR, seed=seed) / 1e9


def _step(lo, hi, at=STEP):
    return lambda t: lo if t < at else hi


def _periodic(t0, source, values_fn, period=0.1, dur=DUR + 1):
    return [Sample(t0 + int(k * period * 1e9), source, values_fn(k * period)) for k in range(int(dur / period))]


def _window_at(res, t, series=0):
    hits = [w for w in res.data["series"][series]["windows"] if w["start_s"] <= t < w["end_s"]]
    assert hits, res.data["summary"]
    return hits[0]


def test_flat_run_has_no_window(tmp_path):
    run = simulate_run(tmp_path / "flat", _arrivals(), meta={"label": "v1"}, item_ms=lambda t: 6.0, seed=3)
    res = diagnose([run])
    assert res.data["series"][0]["windows"] == [], res.data["summary"]


@pytest.mark.parametrize("one_run", [False, True], ids=["two runs", "one run with a pause"])
def test_idle_minutes_do_not_widen_the_interval(tmp_path, one_run):
    """Before and after a deployment, diagnosed together with no --interval: the 6 minutes between the
    runs (or a 6-minute pause inside one run) are idle, not traffic, so the automatic interval stays that
    of 10 s of traffic and the spike is found (counting the idle time made ~16 s intervals, one or two
    per stretch of traffic, below PELT's 3-interval segment)."""
    spike = lambda t: 15.0 if 4.0 <= t < 7.0 else 6.0  # noqa: E731
    if one_run:
        arrivals = np.concatenate([_arrivals(1), 370.0 + _arrivals(2)])
        run = simulate_run(tmp_path / "r", arrivals, meta={"label": "v1"}, item_ms=lambda t: spike(t - 370.0), seed=1)
        res = diagnose([run])
        b0 = 370.0 - arrivals[0]  # series time starts at the first arrival
    else:
        a = simulate_run(tmp_path / "a", _arrivals(1), meta={"label": "v1", "host": "h"}, item_ms=lambda t: 6.0,
                         seed=1)
        b = simulate_run(tmp_path / "b", _arrivals(2), meta={"label": "v1", "host": "h"}, item_ms=spike, seed=2)
        ra, rb = load_run(a), load_run(b)
        end_a = ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].max())
        rb.meta["wall_minus_mono_ns"] = end_a + 360_000_000_000 - int(rb.requests["arrival_ns"].min())
        res = diagnose([ra, rb])
        b0 = res.series[0].run_bounds[1][0]
    w = _window_at(res, b0 + 5.5)
    assert len(res.data["series"]) == 1 and res.data["series"][0]["interval_s"] < 2.0
    assert b0 + 2.0 < w["start_s"] < b0 + 5.0, w  # PELT cuts on whole intervals, 3 at least
    assert w["ratio_p50"] > 1.5
    assert all(x["end_s"] > b0 for x in res.data["series"][0]["windows"]), res.data["summary"]  # A is calm


def test_unexplained_service_shift_is_inconclusive(tmp_path):
    """Compute doubles mid-run; no telemetry, no label change: nothing may be named."""
    run = simulate_run(tmp_path / "x", _arrivals(), meta={"label": "v1"}, item_ms=_step(6.0, 12.0), seed=3)
    res = diagnose([run])
    w = _window_at(res, 7.5)
    assert abs(w["start_s"] - STEP) < 1.0
    assert w["verdict"] == "inconclusive"
    assert any("no regression is claimed" in c for c in w["checked"])
    assert any("no GPU telemetry" in c for c in w["checked"])
    assert "INCONCLUSIVE" in text_diagnose(res)


def _deployment(tmp_path):
    """Host h runs v1, then v2 with compute x2, 0.1 s after v1's last request: (RunData v1, RunData v2)."""
    a = simulate_run(tmp_path / "a", _arrivals(1)[_arrivals(1) < STEP], meta={"label": "v1", "host": "h"},
                     item_ms=lambda t: 6.0, seed=1)
    b = simulate_run(tmp_path / "b", _arrivals(2)[_arrivals(2) < STEP], meta={"label": "v2", "host": "h"},
                     item_ms=lambda t: 12.0, seed=2)
    ra, rb = load_run(a), load_run(b)
    # Simulated runs are written in milliseconds; place B right after A on the wall clock, as deployed.
    end_a = ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].max())
    rb.meta["wall_minus_mono_ns"] = end_a + 100_000_000 - int(rb.requests["arrival_ns"].min())
    return ra, rb


def test_label_change_makes_it_a_regression(tmp_path):
    ra, rb = _deployment(tmp_path)
    res = diagnose([ra, rb])
    assert len(res.data["series"]) == 1  # one host: the runs are laid end to end
    t_b = float(np.mean(res.series[0].run_bounds[1]))
    w = _window_at(res, t_b)
    assert w["verdict"] == "regression", res.data["summary"]
    ev = {e["name"]: e for e in w["causes"][0]["evidence"]}
    assert ev["compute per-item service time"]["passed"]
    assert not ev["preprocess per-item service time"]["passed"]


def test_gpu_memory_near_full(tmp_path):
    def samples(t0):
        return _periodic(t0, "gpu0", lambda t: {"mem_used_bytes": (79.5 if t >= STEP else 40.0) * 2**30,
                                                 "mem_total_bytes": 80.0 * 2**30})

    run = simulate_run(tmp_path / "m", _arrivals(), meta={"label": "v1"}, item_ms=_step(6.0, 12.0), samples=samples, seed=3)
    w = _window_at(diagnose([run]), 7.5)
    assert w["verdict"] == "memory"
    assert w["causes"][0]["evidence"][0]["window"] > 0.95


def test_xid_event_names_hardware(tmp_path):
    def samples(t0):
        return _periodic(t0, "gpu0", lambda t: {"sm_clock_mhz": 1980.0})

    def events(t0):
        return [Event(t0 + int(5.2e9), "gpu0", "xid", 48.0, "double-bit ECC error")]

    run = simulate_run(tmp_path / "x", _arrivals(), meta={"label": "v1"}, item_ms=_step(6.0, 12.0),
                       samples=samples, events=events, seed=3)
    w = _window_at(diagnose([run]), 7.5)
    assert w["verdict"] == "hardware"
    ev = {e["name"]: e for e in w["causes"][0]["evidence"]}
    assert ev["gpu0 Xid events"]["passed"] and not ev["gpu0 SM clock"]["passed"]


def test_other_processes_taking_cpu(tmp_path):
    """Every CPU stage slows alike while other processes take 1.2 more cores."""
    def samples(t0):
        return _periodic(t0, "cpu", lambda t: {"cpu_util_pct": 95.0 if t >= STEP else 35.0, "proc_cpu_pct": 50.0})

    run = simulate_run(tmp_path / "c", _arrivals(), meta={"label": "v1", "cpu": {"logical_cores": 2}},
                       item_ms=_step(6.0, 12.0), cpu_ms=_step(2.0, 4.0), samples=samples, seed=3)
    w = _window_at(diagnose([run]), 7.5)
    assert w["verdict"] == "cpu_contention", w["causes"]
    ev = {e["name"]: e for e in w["causes"][0]["evidence"]}
    assert ev["other processes' CPU"]["passed"]


def test_unlinked_span_is_reported_not_apportioned(tmp_path):
    run_dir = simulate_run(tmp_path / "s", _arrivals(), meta={"label": "v1"}, item_ms=_step(6.0, 12.0), seed=3)
    run = load_run(run_dir)
    t0 = int(run.requests["arrival_ns"].min())
    n = 40
    starts = t0 + (np.arange(n) * DUR / n * 1e9).astype(np.int64)
    durs = np.where(np.arange(n) < n // 2, 5_000_000, 50_000_000)
    run.spans = {"name": np.array(["db"] * n), "start_ns": starts, "end_ns": starts + durs,
                 "request_id": np.full(n, -1), "attrs": np.array([""] * n)}
    w = _window_at(diagnose([run]), 7.5)
    assert w["verdict"] == "inconclusive"
    assert any("not linked" in c for c in w["checked"])


def test_linked_span_before_the_pipeline(tmp_path):
    run_dir = simulate_run(tmp_path / "d", _arrivals(), meta={"label": "v1"}, item_ms=lambda t: 6.0, seed=3)
    run = load_run(run_dir)
    t0 = int(run.requests["arrival_ns"].min())
    a = run.requests["arrival_ns"]
    late = (a - t0) / 1e9 >= STEP
    d = np.where(late, 40_000_000, 4_000_000)
    run.spans = {"name": np.array(["feature_store"] * a.size), "start_ns": a - d - 1000, "end_ns": a - 1000,
                 "request_id": run.requests["request_id"].copy(), "attrs": np.array([""] * a.size)}
    res = diagnose([run])
    w = _window_at(res, 7.5)
    assert w["verdict"] == "dependency" and "feature_store" in w["causes"][0]["title"]
    assert w["shares"]["span:feature_store"] > 0.8


def test_outputs_and_cli(tmp_path, capsys):
    run = simulate_run(tmp_path / "o", _arrivals(), meta={"label": "v1"}, item_ms=_step(6.0, 12.0), seed=3)
    res = diagnose([run])
    json.dumps(res.data)
    html = diagnose_page(res).render()
    assert html.count("class='plot'") >= 4 and "id='aurora-data'" in html
    json_only = diagnose_page(res.data).render()  # from JSON alone: cards and tables, no plots
    assert "class='plot'" not in json_only and "data-question='Deployment'" in json_only
    assert "Normal (baseline) " in html and "no deployment in the spike windows" in html
    assert main(["diagnose", str(run), "--json", "--html", str(tmp_path / "r.html")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["series"][0]["windows"]
    assert (tmp_path / "r.html").read_text().count("class='plot'") >= 4
    assert main(["diagnose", str(tmp_path / "nothing")]) == 2


def test_span_helper_links(tmp_path):
    """The Recorder's span helper records what diagnose links on."""
    from aurora_core.recorder import Recorder

    with Recorder(tmp_path / "r") as rec, rec.span("feature_store", request_id=3):
        pass
    run = load_run(tmp_path / "r")
    assert run.spans["request_id"].tolist() == [3] and isinstance(run.spans["name"][0], str)
    assert Span  # the public record type diagnose reads


def test_run_parameters_are_not_a_deployment(tmp_path):
    from aurora_core.diagnose.spikes import build_series

    a = simulate_run(tmp_path / "a", _arrivals()[:50], meta={"label": "v1", "host": "h",
                     "config": {"max_batch_size": 8, "rate": 40, "out": "x"}}, item_ms=lambda t: 6.0)
    b = simulate_run(tmp_path / "b", _arrivals()[:50], meta={"label": "v1", "host": "h",
                     "config": {"max_batch_size": 8, "rate": 60, "out": "y"}}, item_ms=lambda t: 6.0)
    c = simulate_run(tmp_path / "c", _arrivals()[:50], meta={"label": "v1", "host": "h",
                     "config": {"max_batch_size": 16, "rate": 40, "out": "x"}}, item_ms=lambda t: 6.0)
    s = build_series([load_run(a), load_run(b), load_run(c)])[0]
    fps = [s.fingerprint(i) for i in range(3)]
    assert sum(fp == fps[0] for fp in fps) == 2 and any(fp["config"]["max_batch_size"] == 16 for fp in fps)


def _bench_parser():
    import argparse

    from aurora_core import bench

    p = argparse.ArgumentParser(add_help=False)
    bench.add_arguments(p)
    return p


def test_bench_writes_the_deployment_load_split():
    """``aurora bench`` says itself which options are the deployment (its "pipeline" group) and which the
    load or the run; diagnose reads that from the run's meta and imports nothing of bench."""
    from aurora_core import bench

    p = _bench_parser()
    deployment, load = bench.config_split(p.parse_args([]))
    groups = {g.title: {a.dest for a in g._group_actions} for g in p._action_groups if g._group_actions}
    assert set(deployment) == groups["pipeline"]
    assert {"rate", "duration", "seed", "scenario", "slo_ms", "out", "connections"} <= set(load)
    assert not {"model", "weights", "device", "dtype", "max_batch_size", "buckets", "url"} & set(load)
    assert not set(deployment) & set(load)


def test_a_new_load_option_lands_on_the_load_side(monkeypatch):
    from aurora_core import bench

    add = bench.add_arguments

    def with_new_option(p):
        add(p)
        p.add_argument_group("load").add_argument("--burst-size", type=int, default=1)

    monkeypatch.setattr(bench, "add_arguments", with_new_option)
    deployment, load = bench.config_split(_bench_parser().parse_args([]))
    assert "burst_size" in load and "burst_size" not in deployment


def test_the_recorded_split_decides_the_fingerprint(tmp_path):
    """A run that carries meta.deployment is fingerprinted by it alone: a changed load key is no deployment,
    a changed deployment key is one, whatever the keys are called."""
    from aurora_core.diagnose.spikes import build_series

    def run(name, deployment, load):
        return load_run(simulate_run(tmp_path / name, _arrivals()[:50], meta={
            "label": "v1", "host": "h", "deployment": deployment, "load": load,
            "config": {**deployment, **load}}, item_ms=lambda t: 6.0))

    s = build_series([run("a", {"workers": 2}, {"burst": 1}), run("b", {"workers": 2}, {"burst": 9}),
                      run("c", {"workers": 4}, {"burst": 1})])[0]
    fps = [s.fingerprint(i) for i in range(3)]
    assert fps[0] == fps[1] and fps[2]["config"] == {"workers": 4}


def test_diagnose_does_not_import_bench():
    import subprocess
    import sys

    code = "import sys, aurora_core.diagnose, aurora_core.diagnose.compare; print('aurora_core.bench' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_idle_clocks_before_sparse_traffic(tmp_path):
    """Busy traffic, then sparse requests (1/s) while the GPU sits at idle clocks: its own case."""
    from test_incidents import _gpu_samples

    busy = poisson_schedule(RATE, 10, seed=1) / 1e9
    sparse = 10 + np.cumsum(np.random.default_rng(2).exponential(1.0, 40))
    arrivals = np.concatenate([busy, sparse[sparse < 40]])
    build = _gpu_samples([("idle", 10.0, 40.0)], 40.0)
    clock = {}

    def samples(t0):
        s = build(t0)
        clk = [x for x in s if "sm_clock_mhz" in x.values]
        clock["t"] = np.array([(x.ts_ns - t0) / 1e9 for x in clk])
        clock["mhz"] = np.array([x.values["sm_clock_mhz"] for x in clk])
        return s

    def item_ms(t):  # clock-bound: a request that finds the GPU idling runs at the idle clock
        i = max(int(np.searchsorted(clock["t"], t)) - 1, 0)
        return 6.0 * clock["mhz"].max() / clock["mhz"][i]

    run = simulate_run(tmp_path / "idle", arrivals, meta={"label": "v1"}, item_ms=item_ms, samples=samples, seed=3)
    res = diagnose([run])
    w = _window_at(res, 25.0)
    assert w["verdict"] == "hardware_idle_clocks", res.data["summary"]
    assert all(c["cause"] != "hardware" for c in w["causes"])


def test_interval_mean_covers_windows_shorter_than_a_slow_counter_read():
    """Throttle fractions read at 1 Hz (costly NVML counters): each sample covers the second before it. A
    0.5 s window between two reads still sees the read that covers it, weighted by overlap; a plain mean of
    the samples inside the window would see none. A gap in the series weighs nothing."""
    from types import SimpleNamespace

    from aurora_core.diagnose.causes import _interval_mean, _mean_in

    t = np.array([1.0, 2.0, 3.0, 4.0, 20.0])
    v = np.array([0.0, 0.0, 1.0, 0.5, 0.25])
    series = SimpleNamespace(samples={("gpu0", "throttle_frac_hw_thermal"): (t, v)})
    key = ("gpu0", "throttle_frac_hw_thermal")
    assert _mean_in(series, key, 2.2, 2.7) is None
    assert _interval_mean(series, key, 2.2, 2.7) == pytest.approx(1.0)        # covered by the read at 3.0
    assert _interval_mean(series, key, 2.5, 3.5) == pytest.approx(0.75)       # half of each
    assert _interval_mean(series, key, 0.0, 5.0) == pytest.approx(1.5 / 4)   # 4 s covered; t=0..1 by the first
    assert _interval_mean(series, key, 10.0, 15.0) is None                    # in the gap: nothing covers it


def test_hardware_cause_sees_a_1hz_throttle_counter_in_a_short_window():
    """The hardware check averages throttled fractions by the interval each read covers: a 0.5 s window
    inside a throttled second counts it (a plain mean over samples in the window had none there)."""
    from types import SimpleNamespace

    from aurora_core.diagnose.causes import _hardware

    t = np.arange(0.0, 21.0)
    frac = np.where(t == 13.0, 1.0, 0.0)  # the read at 13 s covers 12..13 s
    series = SimpleNamespace(samples={("gpu0", "throttle_frac_hw_thermal"): (t, frac),
                                      ("gpu0", "sm_clock_mhz"): (t, np.full(t.size, 1980.0))}, events=[])
    base, win = (SimpleNamespace(a=a, b=b, median_gap_s=0.01) for a, b in ((0.0, 10.0), (12.2, 12.7)))
    checked: list = []
    causes = _hardware(series, base, win, 1.0, checked)
    assert [c.cause for c in causes] == ["hardware"], checked
    ev = next(e for e in causes[0].evidence if "hw_thermal" in e.name)
    assert ev.window == pytest.approx(1.0) and ev.passed


def test_an_interval_too_fine_for_the_timeline_is_refused(tmp_path, monkeypatch):
    """An --interval that would cut the timeline into millions of intervals is a ValueError (exit 2 in the
    CLI), not gigabytes of arrays; the automatic width stays within the bound, however far apart the runs."""
    from aurora_core.diagnose import spikes

    run = simulate_run(tmp_path / "flat", _arrivals(), meta={"label": "v1"}, item_ms=lambda t: 6.0, seed=3)
    with pytest.raises(ValueError, match="intervals"):
        diagnose([run], interval_s=1e-7)
    monkeypatch.setattr(spikes, "MAX_INTERVALS", 12)  # as if the runs were weeks apart
    res = diagnose([run])
    series = spikes.build_series([load_run(run)])[0]
    assert (series.t[-1] - series.t[0]) / res.data["series"][0]["interval_s"] <= 12 * 1.001


def test_cgroup_quota_set_while_running_is_named_with_its_cores(tmp_path):
    """No quota for 5 s, then 0.5 cores (throttled 60% of periods): the sampler records the fraction only
    from then on, and diagnose names the throttling with the quota in cores (the baseline had no fraction
    at all, which used to drop the indicator)."""
    def samples(t0):
        return _periodic(t0, "cpu", lambda t: {"cpu_util_pct": 30.0, "proc_cpu_pct": 50.0, "cgroup_nr_throttled": 0.0,
                                               **({"cgroup_throttled_frac": 0.6, "cgroup_quota_cores": 0.5}
                                                  if t >= STEP + 0.1 else {})})

    def events(t0):
        return [Event(t0 + int(STEP * 1e9), "cpu", "cgroup_quota_change", 0.5, "cgroup CPU quota unlimited -> 0.5 cores")]

    run = simulate_run(tmp_path / "q", _arrivals(), meta={"label": "v1", "cpu": {"logical_cores": 2}},
                       item_ms=_step(6.0, 12.0), cpu_ms=_step(2.0, 4.0), samples=samples, events=events, seed=3)
    w = _window_at(diagnose([run]), 7.5)
    assert w["verdict"] == "cpu_contention", w["causes"]
    ev = {e["name"].split(" (")[0]: e for e in w["causes"][0]["evidence"]}
    assert ev["cpu.cgroup_throttled_frac"]["passed"] and ev["cpu.cgroup_throttled_frac"]["baseline"] == 0.0
    q = ev["cgroup CPU quota"]
    assert q["passed"] and q["window"] == 0.5 and q["baseline"] is None
    assert "0.5 cores" in w["causes"][0]["summary"]


@pytest.mark.parametrize("at, frac_from", [(STEP - 0.5, STEP - 0.5), (STEP - 0.05, STEP + 0.05)])
def test_cgroup_quota_set_just_before_the_window_still_counts(tmp_path, at, frac_from):
    """A process moved into a 0.1-core cgroup 0.5 s before its latency steps (the detected window starts
    up to an interval after the change): the baseline's few throttled reads are diluted by its quota-less
    cgroup reads (0, not averaged alone), and the quota set during the baseline counts as set. Both failed
    before (the baseline read as throttled 70% of the time, and 0.1 -> 0.1 cores as no change). The second
    case: the baseline ends with the quota's read but before the first throttled fraction (which needs two
    reads), which used to drop the indicator."""

    def samples(t0):
        return _periodic(t0, "cpu", lambda t: {"cpu_util_pct": 30.0, "proc_cpu_pct": 50.0 if t < STEP else 60.0,
                                               "cgroup_nr_throttled": 0.0,
                                               **({"cgroup_quota_cores": 0.1} if t >= at else {}),
                                               **({"cgroup_throttled_frac": 0.7} if t >= frac_from else {})})

    def events(t0):
        return [Event(t0 + int(at * 1e9), "cpu", "cgroup_move", 1.0, "process moved to cgroup /sys/fs/cgroup/cpu/slow"),
                Event(t0 + int(at * 1e9), "cpu", "cgroup_quota_change", 0.1, "cgroup CPU quota unlimited -> 0.1 cores")]

    run = simulate_run(tmp_path / "q", _arrivals(), meta={"label": "v1", "cpu": {"logical_cores": 2}},
                       item_ms=_step(6.0, 12.0), samples=samples, events=events, seed=3)
    w = _window_at(diagnose([run]), 7.5)
    assert w["start_s"] > at and w["verdict"] == "cpu_contention", w["causes"]
    ev = {e["name"].split(" (")[0]: e for e in w["causes"][0]["evidence"]}
    assert ev["cpu.cgroup_throttled_frac"]["passed"] and ev["cpu.cgroup_throttled_frac"]["baseline"] < 0.2
    assert ev["cgroup CPU quota"]["passed"] and "moved to cgroup" in w["causes"][0]["summary"]
    assert w["causes"][0]["share"] > 0.8


def _first_lines(res) -> dict[str, str]:
    lines = text_diagnose(res).splitlines()[:4]
    return dict(line.split(": ", 1) for line in lines)


def test_report_opens_with_the_four_answers(tmp_path):
    """deployment / load / confinement / dependency, each with its number or "no", before any detail."""
    q = _first_lines(diagnose(list(_deployment(tmp_path))))
    assert list(q) == ["deployment lines up", "load rose", "confined to some hosts/regions", "dependency grew"]
    assert q["deployment lines up"].startswith("yes: label v1 -> v2 [h ")
    assert q["load rose"].startswith("no") and q["confined to some hosts/regions"] == "no (one host/region in the data)"
    assert q["dependency grew"] == "no (no span linked to requests)"

    # two hosts at the same wall-clock time, the spike on one: confined; nothing at all: every answer no
    runs = []
    for host, item in (("x", _step(6.0, 15.0)), ("y", lambda t: 6.0)):
        runs.append(load_run(simulate_run(tmp_path / host, _arrivals(), meta={"label": "v1", "host": host},
                                          item_ms=item, seed=3)))
    runs[1].meta["wall_minus_mono_ns"] = (runs[0].wall_minus_mono_ns + int(runs[0].requests["arrival_ns"].min())
                                          - int(runs[1].requests["arrival_ns"].min()))
    q = _first_lines(diagnose(runs))
    assert q["confined to some hosts/regions"].startswith("yes: x (not y) [x "), q
    flat = simulate_run(tmp_path / "flat", _arrivals(), meta={"label": "v1"}, item_ms=lambda t: 6.0, seed=3)
    assert set(_first_lines(diagnose([flat])).values()) == {"no (no spike window)"}


def test_report_answers_load_and_dependency(tmp_path):
    run_dir = simulate_run(tmp_path / "d", _arrivals(), meta={"label": "v1"}, item_ms=lambda t: 6.0, seed=3)
    run = load_run(run_dir)
    a = run.requests["arrival_ns"]
    late = (a - a.min()) / 1e9 >= STEP
    d = np.where(late, 40_000_000, 4_000_000)
    run.spans = {"name": np.array(["feature_store"] * a.size), "start_ns": a - d - 1000, "end_ns": a - 1000,
                 "request_id": run.requests["request_id"].copy(), "attrs": np.array([""] * a.size)}
    q = _first_lines(diagnose([run]))
    assert q["dependency grew"].startswith("feature_store 4.00 -> 40.00 ms (x10.00) ["), q
    assert q["deployment lines up"] == "no" and q["load rose"].startswith("no")
    from aurora_core.loadgen import step_schedule

    step = simulate_run(tmp_path / "s", step_schedule([(0, 100), (10, 120)], 20, seed=0) / 1e9, meta={"label": "v1"},
                        item_ms=lambda t: 6.0, max_batch=1, seed=1)
    q = _first_lines(diagnose([step]))
    assert q["load rose"].startswith("+") and "req/s, z " in q["load rose"], q
    rise = int(q["load rose"][1:q["load rose"].index("%")])
    assert 10 <= rise <= 30, q  # +20% offered from 10 s; the window holds the step and its queue
    # The run says what was offered (aurora bench --scenario step writes the schedule): that figure is given.
    stepped = simulate_run(tmp_path / "o", step_schedule([(0, 100), (10, 120)], 20, seed=0) / 1e9,
                           meta={"label": "v1", "offered_schedule": [[0, 100.0], [10, 120.0]]},
                           item_ms=lambda t: 6.0, max_batch=1, seed=1)
    q = _first_lines(diagnose([stepped]))
    assert q["load rose"].startswith("+") and " offered (100.0 -> 1" in q["load rose"], q  # ~120 from the step on


def test_request_context_links_serving_code_spans(tmp_path):
    """The README's serving path: ``with pipe.request() as ctx:`` then the dependency call timed with
    ``rec.span`` (or ``ctx.span``), then ``ctx.infer``. The span is linked to the request, so diagnose counts
    it in the latency and names the dependency when it slows (an unlinked span could not be apportioned)."""
    import time

    from test_incidents import DATA, _pipeline, tiny_model

    from aurora_core.pipeline import Pipeline
    from aurora_core.recorder import Recorder

    data = DATA.read_bytes()
    rec = Recorder(tmp_path / "svc", meta={"label": "v1"})
    with _pipeline(sink=rec) as pipe:
        for k in range(240):
            with pipe.request() as ctx:
                span = rec.span("feature_store") if k % 2 else ctx.span("feature_store")
                with span:
                    time.sleep(0.002 if k < 120 else 0.03)
                pred = ctx.infer(data)
            assert pred.timings.request_id == ctx.request_id
        with pytest.raises(ValueError, match="submitted already"):
            ctx.submit(data)
        with rec.span("outside"):  # no request open: unlinked, as before
            pass
    rec.close()
    run = load_run(tmp_path / "svc")
    linked = run.spans["request_id"][run.spans["name"] == "feature_store"]
    assert sorted(linked.tolist()) == sorted(run.requests["request_id"].tolist())
    assert run.spans["request_id"][run.spans["name"] == "outside"].tolist() == [-1]
    res = diagnose([run])
    w = max(res.data["series"][0]["windows"], key=lambda w: w["ratio_p50"])
    assert w["verdict"] == "dependency" and "feature_store" in w["causes"][0]["title"], res.data["summary"]
    with Pipeline(tiny_model(), device="cpu") as bare:
        with pytest.raises(ValueError, match="records spans"):
            bare.request().span("x")


def test_thresholds_are_settings_with_documented_defaults(tmp_path, capsys):
    """One place (diagnose.settings): the defaults are the constants the modules document; a changed setting
    changes the judgement; a bad name or value is exit 2 with the names listed."""
    import dataclasses

    from aurora_core.diagnose import Settings, causes, compare, spikes
    from aurora_core.diagnose.settings import DEFAULTS

    assert (DEFAULTS.min_ratio, DEFAULTS.alpha, DEFAULTS.claim) == (spikes.MIN_RATIO, spikes.ALPHA, causes.CLAIM)
    assert (DEFAULTS.min_ratio, DEFAULTS.alpha, DEFAULTS.claim) == (1.3, 1e-3, 0.3)
    assert compare.ENV_SETTINGS == ("others_cores_more", "steal_more", "cgroup_throttled_more", "throttled_more")
    assert causes.STAGE_SHIFT == DEFAULTS.stage_shift
    run = simulate_run(tmp_path / "r", _arrivals(), meta={"label": "v1"}, item_ms=_step(6.0, 12.0), seed=3)
    assert any("compute x" in c for c in _window_at(diagnose([run]), 7.5)["checked"])  # compute x2 is a shift
    strict = diagnose([run], settings=Settings(stage_shift=2.5))
    assert not any("compute x" in c for c in _window_at(strict, 7.5)["checked"])      # not at x2.5
    assert strict.data["method"]["settings"]["stage_shift"] == 2.5
    assert main(["diagnose", str(run), "--json", "--set", "stage_shift=2.5", "--set", "claim=0.5"]) == 0
    method = json.loads(capsys.readouterr().out)["method"]
    assert method["settings"] == dataclasses.asdict(Settings(stage_shift=2.5, claim=0.5))
    for bad, why in (("nope=1", "stage_shift"), ("alpha=2", "alpha must be in"), ("claim=x", "expected a number"),
                     ("claim", "NAME=VALUE")):
        assert main(["diagnose", str(run), "--set", bad]) == 2
        assert why in capsys.readouterr().err, bad
    with pytest.raises(ValueError, match="min_ratio"):
        Settings(min_ratio=0.5)
