"""Replay: recorded NVML traces through the live backend code; synthetic throttle episodes -> fractions."""

from __future__ import annotations

import json
from pathlib import Path

import pynvml
import pytest

from aurora_core.telemetry import cli as tcli
from aurora_core.telemetry.nvml import THROTTLE_CAUSES, NvmlBackend
from aurora_core.telemetry.replay import (
    TEST_TRACES,
    RecordingNvml,
    ReplayExhausted,
    ReplayNvml,
    SimulatedNvml,
    make_synthetic_trace,
    read_trace,
    replay_samples,
    replay_trace,
    write_test_traces,
)

DATA = Path(__file__).parent / "data" / "nvml"
CAUSES = ("power", "thermal", "sync_boost", "board_limit", "low_util", "reliability", "hw_slowdown",
          "hw_thermal", "power_brake")


def expected_fraction(k: int, period: float, start: float, end: float, severity: float) -> float:
    """Throttled share of the interval that ends at tick k: the episode's overlap with it."""
    a, b = (k - 1) * period, k * period
    return severity * max(0.0, min(b, end) - max(a, start)) / period


def test_committed_traces_are_what_the_script_writes(tmp_path):
    written = write_test_traces(str(tmp_path))
    assert {Path(p).name for p in written} == {p.name for p in DATA.glob("synthetic_*.jsonl")}
    for p in written:
        assert Path(p).read_bytes() == (DATA / Path(p).name).read_bytes(), Path(p).name


# trace stem -> (cause whose counter runs, how the fraction is measured)
COUNTER_CASES = {
    "thermal": "thermal",
    "power_cap": "power",
    "idle_clocks": "low_util",
    "thermal_violation_api": "thermal",
}


@pytest.mark.parametrize("stem", list(COUNTER_CASES))
def test_counter_episodes_come_out_as_exact_fractions(stem):
    cfg = TEST_TRACES[stem]
    samples, _, caps = replay_trace(DATA / f"synthetic_{stem}.jsonl", base_ns=0)
    cause = COUNTER_CASES[stem]
    assert "counter" in caps["gpu0"]["supported"][f"throttle_frac_{cause}"]
    period = 0.1
    seen_throttle = 0
    for k, s in enumerate(samples):
        assert s.ts_ns == round(k * period * 1e9)
        if k == 0:
            assert f"throttle_frac_{cause}" not in s.values  # no interval yet: absent, not 0
            continue
        want = expected_fraction(k, period, cfg["start_s"], cfg["end_s"], cfg.get("severity", 1.0))
        assert s.values[f"throttle_frac_{cause}"] == pytest.approx(want, abs=1e-6), (k, s.values)
        for other in CAUSES:
            if other != cause and f"throttle_frac_{other}" in s.values and other != "hw_slowdown":
                assert s.values[f"throttle_frac_{other}"] == 0.0, (k, other)
        seen_throttle += want > 0
    assert seen_throttle >= 9


def test_thermal_episode_partial_interval_and_margin():
    samples = replay_samples(DATA / "synthetic_thermal.jsonl", base_ns=0)
    by_t = {round(s.ts_ns / 1e8): s.values for s in samples}  # key: tick index
    assert by_t[11]["throttle_frac_thermal"] == pytest.approx(0.5)  # episode starts at 1.05 s
    assert by_t[15]["throttle_frac_thermal"] == pytest.approx(1.0)
    assert by_t[15]["temp_margin_c"] == 1.0 and by_t[5]["temp_margin_c"] == 25.0
    assert by_t[15]["sm_clock_mhz"] < by_t[5]["sm_clock_mhz"]
    assert int(by_t[15]["clocks_event_reasons"]) & pynvml.nvmlClocksEventReasonSwThermalSlowdown
    assert by_t[21]["throttle_frac_thermal"] == 0.0


def test_hw_slowdown_has_no_counter_and_uses_the_bitmask():
    samples, _, caps = replay_trace(DATA / "synthetic_hw_slowdown.jsonl", base_ns=0)
    assert "bit" in caps["gpu0"]["supported"]["throttle_frac_hw_slowdown"]
    for k, s in enumerate(samples):
        inside = 1.0 <= k * 0.1 < 2.0 - 1e-9
        assert s.values["throttle_frac_hw_slowdown"] == (1.0 if inside else 0.0), k
        if k:
            assert s.values["throttle_frac_thermal"] == 0.0 and s.values["throttle_frac_power"] == 0.0


def test_idle_clocks_flag():
    samples = replay_samples(DATA / "synthetic_idle_clocks.jsonl", base_ns=0)
    flags = [s.values["idle_clocks"] for s in samples]
    assert flags[:10] == [0.0] * 10 and flags[10:20] == [1.0] * 10 and flags[20:] == [0.0] * len(flags[20:])
    assert samples[15].values["util_gpu_busy_pct"] == 0.0
    assert samples[15].values["sm_clock_mhz"] < 0.2 * samples[15].values["sm_clock_max_mhz"]


def test_healthy_trace_never_throttles():
    for s in replay_samples(DATA / "synthetic_healthy.jsonl", base_ns=0):
        assert all(v == 0.0 for k, v in s.values.items() if k.startswith("throttle_frac_"))
        assert s.values["idle_clocks"] == 0.0


def test_gpu_lost_trace_goes_stale_and_recovers():
    samples, events, _ = replay_trace(DATA / "synthetic_gpu_lost.jsonl", base_ns=0)
    kinds = [e.kind for e in events]
    assert "xid" in kinds and "gpu_lost" in kinds and kinds[-1] == "sampler_recovered"
    xid = next(e for e in events if e.kind == "xid")
    assert xid.value == 79.0 and xid.source == "gpu0"
    stale = [s for s in samples if s.values.get("stale_age_s", 0) > 0]
    assert stale and all(set(s.values) == {"stale_age_s"} for s in stale)
    ages = [s.values["stale_age_s"] for s in stale]
    assert ages == sorted(ages)
    last = samples[-1].values
    assert last["stale_age_s"] == 0.0 and "power_w" in last


def test_replay_is_the_live_code_path(tmp_path):
    """Backend on the model directly == backend on recording -> JSON file -> replay."""
    def run(api, sim, n=25):
        be = NvmlBackend(api, clock=lambda: int(round(sim.t_s * 1e9)))
        out = []
        for k in range(n):
            sim.t_s = k * 0.1
            out.extend(be.tick())
        return out

    kw = dict(kind="power", start_s=0.55, end_s=1.5, severity=0.7, gpm=True)
    model = SimulatedNvml(**kw)
    direct = run(model, model)
    sim = SimulatedNvml(**kw)
    path = tmp_path / "t.jsonl"
    rec = RecordingNvml(sim, out=path, clock=lambda: int(round(sim.t_s * 1e9)))
    be = NvmlBackend(rec)
    for k in range(25):
        sim.t_s = k * 0.1
        be.tick()
    rec.close()
    replayed = replay_samples(path, base_ns=0)
    assert [(s.ts_ns, s.values) for s in replayed] == [(s.ts_ns, s.values) for s in direct]
    assert any(s.values.get("gpm_sm_util_pct") for s in replayed)


def test_replay_on_another_time_base_for_merging():
    base = 123_456_789_000
    samples = replay_samples(make_synthetic_trace("thermal", 0.5, 1.0, duration_s=1.5), base_ns=base)
    assert [s.ts_ns - base for s in samples] == [round(k * 0.1 * 1e9) for k in range(16)]


def test_recorded_errors_replay_as_the_same_nvml_errors(tmp_path):
    sim = SimulatedNvml(lost=(0.0, 1.0))
    rec = RecordingNvml(sim, clock=lambda: 0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        rec.nvmlDeviceGetUtilizationRates(None)
    line = rec.lines[-1]
    assert line["fn"] == "nvmlDeviceGetUtilizationRates" and line["err"] == pynvml.NVML_ERROR_GPU_IS_LOST
    api = ReplayNvml(rec.lines)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        api.nvmlDeviceGetUtilizationRates(None)
    with pytest.raises(ReplayExhausted):
        api.nvmlDeviceGetUtilizationRates(None)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):  # never recorded: as a driver without it
        api.nvmlDeviceGetTemperature(None, 0)


def test_bad_trace_files_are_rejected(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"format": "something-else"}) + "\n")
    with pytest.raises(ValueError, match="aurora-nvml-trace"):
        read_trace(p)
    p.write_text(json.dumps({"format": "aurora-nvml-trace", "version": 99}) + "\n")
    with pytest.raises(ValueError, match="version 99"):
        read_trace(p)


def test_cli_synth_and_replay(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    tcli.add_arguments(parser)
    out = tmp_path / "p.jsonl"
    assert tcli.run(parser.parse_args(["synth", "--kind", "power", "--start", "0.3", "--end", "0.6",
                                       "--duration", "1", "--out", str(out)])) == 0
    capsys.readouterr()
    assert tcli.run(parser.parse_args(["replay", str(out), "--json"])) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 11
    assert rows[5]["values"]["throttle_frac_power"] == pytest.approx(1.0)
    assert rows[9]["values"]["throttle_frac_power"] == 0.0


def test_cli_record_without_nvml_fails_cleanly(tmp_path, capsys):
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works here")
    except pynvml.NVMLError:
        pass
    import argparse

    parser = argparse.ArgumentParser()
    tcli.add_arguments(parser)
    rc = tcli.run(parser.parse_args(["record", "--out", str(tmp_path / "r.jsonl"), "--duration", "0.1"]))
    assert rc == 2 and "NVML is not usable" in capsys.readouterr().err


LIVE_TRACES = [p for p in sorted(DATA.glob("*.jsonl")) if read_trace(p)[0].get("source") == "live"]


@pytest.mark.skipif(not LIVE_TRACES, reason="no trace captured on a real GPU committed yet")
@pytest.mark.parametrize("path", LIVE_TRACES, ids=lambda p: p.name)
def test_real_gpu_trace_replays_sanely(path):
    """A trace from ``aurora telemetry record`` on real hardware replays through the backend."""
    samples, _, caps = replay_trace(path, base_ns=0)
    assert caps and samples
    good = [s for s in samples if s.values.get("stale_age_s") == 0.0]
    assert len(good) >= 0.9 * len(samples)
    for s in good:
        v = s.values
        assert 0 < v["sm_clock_mhz"] <= v["sm_clock_max_mhz"]
        assert 0 <= v["util_gpu_busy_pct"] <= 100
        for k, x in v.items():
            if k.startswith("throttle_frac_"):
                assert 0.0 <= x <= 1.0, (k, x)
        if "power_w" in v and "power_limit_w" in v:
            assert v["power_w"] <= 1.5 * v["power_limit_w"]


def test_record_through_the_threaded_sampler_then_replay(tmp_path):
    """What ``aurora telemetry record`` does, with the GPU model in place of the driver."""
    import time

    from aurora_core.telemetry.sampler import TelemetrySampler

    sim = SimulatedNvml("power", 0.0, 1e9, severity=0.25)
    path = tmp_path / "rec.jsonl"
    rec = RecordingNvml(sim, out=path, header={"period_s": 0.02})
    got = []
    with TelemetrySampler(callbacks=[got.append], period_s=0.02, gpu=True, cpu=False, nvml_api=rec):
        deadline = time.monotonic() + 10
        while len(got) < 6 and time.monotonic() < deadline:
            sim.t_s = time.monotonic()  # the model's episode covers all of it
            time.sleep(0.01)
    rec.close()
    lines = read_trace(path)
    assert any(x.get("fn") == "nvmlEventSetWait_v2" for x in lines)  # the event thread was recorded too
    replayed = replay_samples(path, base_ns=0)
    live = [s for s in got if s.source == "gpu0"]
    assert len(replayed) >= len(live) >= 6
    for a, b in zip(live, replayed, strict=False):
        want = {k: v for k, v in a.values.items() if k != "sampler_cpu_s"}
        assert b.values == pytest.approx(want, rel=1e-9)  # float rounding of a shifted time base only
        assert b.ts_ns - replayed[0].ts_ns == a.ts_ns - live[0].ts_ns


@pytest.mark.skipif(not LIVE_TRACES, reason="no trace captured on a real GPU committed yet")
def test_tick_replay_answers_as_recorded_and_serves_the_live_cadence():
    """``TickReplayNvml`` (bench_telemetry --replay) gives the exact replay's samples on the cadence the
    trace was recorded at; at the live cadence the per-tick values are the same, the slow gauges are
    carried, and the costly counters and GPM come on slow ticks only, covering the whole slow interval."""
    from aurora_core.telemetry.nvml import SLOW_EVERY, SLOW_METRICS
    from aurora_core.telemetry.replay import TickReplayNvml

    path = LIVE_TRACES[0]
    exact, _, caps = replay_trace(path, base_ns=0)
    be = NvmlBackend(TickReplayNvml(path, slow_every=1))
    assert [(s.ts_ns, s.values) for s in exact] == [(s.ts_ns, s.values) for _ in exact for s in be.tick()]
    assert be.capabilities() == caps
    assert caps["gpu0"]["cadence"] == {}  # one cadence: everything every tick

    be = NvmlBackend(TickReplayNvml(path, slow_every=SLOW_EVERY))
    live = [s for _ in range(2 * len(exact) + 5) for s in be.tick()]
    assert be.healthy and be.slow_every == SLOW_EVERY
    assert [s.ts_ns for s in live[: len(exact)]] == [s.ts_ns for s in exact]
    assert all(b.ts_ns > a.ts_ns for a, b in zip(live, live[1:], strict=False))  # it loops, time moving on
    cadence, latency = be.capabilities()["gpu0"]["cadence"], be.capabilities()["gpu0"]["field_latency_us"]
    # On the H200: HW thermal / power brake (~292 us) go slow, with their latency and why; the PCIe byte
    # counters (84-145 us, but 32-bit: they wrap) and the SW throttle counters (0-2 us) stay per tick;
    # GPM is on slow ticks.
    costly = {m for m, why in cadence.items() if "cumulative field" in why}
    gpm = {m for m in cadence if m.startswith("gpm_")}
    assert costly == {"throttle_frac_hw_thermal", "throttle_frac_power_brake"}
    assert all(f"took {latency[m]} us" in cadence[m] and latency[m] >= 50 for m in costly)
    for m in ("pcie_tx_bytes_s", "pcie_rx_bytes_s"):
        assert latency[m] >= 50 and "every tick although" in cadence[m] and "32-bit" in cadence[m], m
    for m in ("throttle_frac_thermal", "throttle_frac_power", "throttle_frac_low_util", "power_w"):
        assert m not in cadence and latency[m] < 50, m
    assert len(gpm) == 4
    slow_seen = 0
    for k, (a, b) in enumerate(zip(exact, live, strict=False)):
        on_slow = k % SLOW_EVERY == 0
        assert b.values.keys() == (a.values.keys() if on_slow else a.values.keys() - costly - gpm), k
        for m, x in b.values.items():
            if m in costly:
                # The counter's delta over its real interval: the time-weighted mean of the per-tick values.
                js = range(k - SLOW_EVERY + 1, k + 1)
                dts = [exact[j].ts_ns - exact[j - 1].ts_ns for j in js]
                want = sum(exact[j].values[m] * dt for j, dt in zip(js, dts, strict=True)) / sum(dts)
                assert x == pytest.approx(want, rel=1e-9, abs=1e-12), (k, m)
                slow_seen += 1
            elif m not in SLOW_METRICS:
                assert x == a.values[m], (k, m)  # GPM too: the slow tick's answer is this tick's
            elif on_slow:
                assert x == a.values[m], (k, m)
            else:
                assert x == live[k - k % SLOW_EVERY].values[m], (k, m)  # carried from the slow tick
    assert slow_seen == 2 * (len(exact) // SLOW_EVERY)
    # The trace's 32-bit PCIe RX counter wraps at 2^32 during the run: still a rate on every tick.
    assert all(s.values["pcie_rx_bytes_s"] > 0 for s in exact[1:])


@pytest.mark.parametrize("stem", ["thermal", "power_cap"])
def test_costly_counter_read_once_a_second_keeps_the_episode_throttled_time(stem):
    """A synthetic episode whose counter NVML prices at 292 us (as the H200's HW counters) is read on slow
    ticks only, and the samples still account for every throttled ns: each fraction times the real
    interval since the previous read adds up to the exact replay's total."""
    from aurora_core.telemetry.replay import TickReplayNvml

    cause = COUNTER_CASES[stem]
    lines = read_trace(DATA / f"synthetic_{stem}.jsonl")
    counter_ids = {f for _, ids, _, _ in THROTTLE_CAUSES for f in ids}
    for e in lines[1:]:
        if e.get("fn") == "nvmlDeviceGetFieldValues" and "ret" in e:
            for fv in e["ret"]["a"]:
                fv["f"]["latencyUsec"] = 292 if fv["f"]["fieldId"] in counter_ids else 0

    def total(samples):
        metric, prev, out = f"throttle_frac_{cause}", samples[0].ts_ns, 0.0
        for s in samples[1:]:
            if metric in s.values:
                out += s.values[metric] * (s.ts_ns - prev) / 1e9
                prev = s.ts_ns
        return out

    exact, _, _ = replay_trace(lines, base_ns=0)
    be = NvmlBackend(TickReplayNvml(lines, slow_every=10))
    slow = [s for _ in exact for s in be.tick()]
    cfg = TEST_TRACES[stem]
    want = cfg.get("severity", 1.0) * (cfg["end_s"] - cfg["start_s"])
    assert total(exact) == pytest.approx(want, abs=1e-9)
    assert total(slow) == pytest.approx(want, abs=1e-9)
    have = [k for k, s in enumerate(slow) if f"throttle_frac_{cause}" in s.values]
    assert have == list(range(10, len(slow), 10))
    assert "took 292 us" in be.capabilities()["gpu0"]["cadence"][f"throttle_frac_{cause}"]
