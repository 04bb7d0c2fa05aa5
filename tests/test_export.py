"""Exporters: Prometheus text parsed back with prometheus_client.parser; Chrome-trace JSON structure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aurora_core.export.perfetto import export_run, to_chrome_trace
from aurora_core.export.prometheus import MAX_MISSED, PrometheusExporter
from aurora_core.records import Event, RequestRecord, Sample, Span, now_ns
from aurora_core.telemetry.nvml import SLOW_EVERY, NvmlBackend
from aurora_core.telemetry.replay import TickReplayNvml, make_synthetic_trace, replay_samples

MS = 1_000_000
NVML_DATA = Path(__file__).parent / "data" / "nvml"


def rec(i, t0, batch, status="ok", depth=0):
    t = t0 + i * MS
    return RequestRecord(request_id=i, arrival_ns=t, enqueue_ns=t + 10_000, batch_closed_ns=t + 510_000,
                         decode_start_ns=t + 20_000, decode_end_ns=t + 120_000, preprocess_start_ns=t + 120_000,
                         preprocess_end_ns=t + 320_000, compute_start_ns=t + 600_000, compute_end_ns=t + 1_600_000,
                         d2h_end_ns=t + 1_700_000, completion_ns=t + 1_800_000, batch_id=batch, batch_size=2,
                         bucket=2, queue_depth=depth, status=status)


def scrape(exp: PrometheusExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(exp.generate().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(m, name, **labels):
    hits = [v for lab, v in m[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, m.get(name))
    return hits[0]


def test_prometheus_triton_names_and_values():
    exp = PrometheusExporter(model="resnet50", version="2", gpu_uuids={"gpu0": "GPU-abc"})
    t0 = now_ns()
    for i in range(4):
        exp(rec(i, t0, batch=i // 2, depth=i))
    exp(RequestRecord(request_id=9, status="overloaded", queue_depth=7))
    exp(Sample(now_ns(), "gpu0", {"util_gpu_busy_pct": 40.0, "mem_used_bytes": 5e9, "power_w": 250.0,
                                  "power_limit_w": 300.0, "energy_mj": 12_000.0, "sm_clock_mhz": 990.0,
                                  "sm_clock_max_mhz": 1980.0, "temp_margin_c": 12.0, "throttle_frac_power": 0.25,
                                  "throttle_frac_thermal": 0.0, "stale_age_s": 0.0, "sampler_cpu_s": 0.75}))
    exp(Sample(now_ns(), "cpu", {"cpu_util_pct": 30.0, "cpu_core1_util_pct": 55.0, "steal_pct": 2.0,
                                 "sampler_cpu_s": 0.5}))
    exp(Event(now_ns(), "gpu0", "xid", 79.0))
    m = scrape(exp)
    ml = dict(model="resnet50", version="2")
    assert one(m, "nv_inference_request_success", **ml) == 4
    assert one(m, "nv_inference_request_failure", reason="overloaded", **ml) == 1
    assert one(m, "nv_inference_count", **ml) == 4
    assert one(m, "nv_inference_exec_count", **ml) == 2  # two distinct batches
    assert one(m, "nv_inference_request_duration_us", **ml) == pytest.approx(4 * 1800)
    assert one(m, "nv_inference_queue_duration_us", **ml) == pytest.approx(4 * 500)
    assert one(m, "nv_inference_compute_input_duration_us", **ml) == pytest.approx(4 * (100 + 200))
    assert one(m, "nv_inference_compute_infer_duration_us", **ml) == pytest.approx(4 * 1000)
    assert one(m, "nv_inference_compute_output_duration_us", **ml) == pytest.approx(4 * 100)
    assert one(m, "nv_inference_pending_request_count", **ml) == 7
    assert one(m, "nv_gpu_utilization", gpu_uuid="GPU-abc") == pytest.approx(0.4)
    assert one(m, "nv_gpu_memory_used_bytes", gpu_uuid="GPU-abc") == 5e9
    assert one(m, "nv_gpu_power_usage", gpu_uuid="GPU-abc") == 250.0
    assert one(m, "nv_gpu_power_limit", gpu_uuid="GPU-abc") == 300.0
    assert one(m, "nv_energy_consumption", gpu_uuid="GPU-abc") == pytest.approx(12.0)
    assert one(m, "nv_cpu_utilization") == pytest.approx(0.3)
    assert one(m, "aurora_throttled_fraction", gpu="gpu0", reason="power") == 0.25
    assert one(m, "aurora_throttled_fraction", gpu="gpu0", reason="thermal") == 0.0
    assert one(m, "aurora_sm_clock_ratio", gpu="gpu0") == pytest.approx(0.5)
    assert one(m, "aurora_temperature_margin_c", gpu="gpu0") == 12.0
    assert 0.0 <= one(m, "aurora_telemetry_staleness_seconds", source="gpu0") < 60
    assert one(m, "aurora_sampler_cpu_seconds_total") == 0.75
    assert one(m, "aurora_events_total", source="gpu0", kind="xid") == 1
    assert one(m, "aurora_cpu_core_util_pct", core="1") == 55.0
    assert one(m, "aurora_steal_pct", source="cpu") == 2.0
    assert one(m, "aurora_stage_duration_seconds_count", stage="compute") == 4
    assert one(m, "aurora_stage_duration_seconds_sum", stage="compute") == pytest.approx(4e-3)


def test_prometheus_stale_sample_drops_readings_and_reports_age():
    exp = PrometheusExporter()
    exp(Sample(now_ns(), "gpu0", {"util_gpu_busy_pct": 90.0, "stale_age_s": 0.0}))
    assert "nv_gpu_utilization" in scrape(exp)
    exp(Sample(now_ns(), "gpu0", {"stale_age_s": 12.5}))
    m = scrape(exp)
    assert "nv_gpu_utilization" not in m  # an old reading is not presented as current
    assert one(m, "aurora_telemetry_staleness_seconds", source="gpu0") >= 12.5


def test_prometheus_rejects_other_objects_and_has_own_registry():
    a, b = PrometheusExporter(), PrometheusExporter()
    a(RequestRecord(request_id=1, status="ok"))
    assert one(scrape(b), "nv_inference_request_success", model="aurora") == 0
    with pytest.raises(TypeError, match="RequestRecord, Sample or Event"):
        a("nope")


def test_prometheus_from_replayed_throttle_trace():
    exp = PrometheusExporter()
    for s in replay_samples(make_synthetic_trace("power", 0.0, 5.0, duration_s=0.5, severity=0.5), base_ns=now_ns()):
        exp(s)
    assert one(scrape(exp), "aurora_throttled_fraction", gpu="gpu0", reason="power") == pytest.approx(0.5)


def test_prometheus_keeps_a_1hz_reading_between_its_reads():
    """A reading taken every 10th tick stays on /metrics at every scrape in between, with the value of
    its own read (a throttled fraction of its 1 s interval, not mixed with the per-tick ones)."""
    exp = PrometheusExporter()
    t0 = now_ns()
    for k in range(3 * SLOW_EVERY + 1):
        gpu = {"power_w": 100.0 + k, "throttle_frac_power": 0.01 * k, "stale_age_s": 0.0}
        cpu = {"cpu_util_pct": float(k)}
        if k % SLOW_EVERY == 0:
            gpu["throttle_frac_hw_thermal"] = 0.5 + k / 100
            cpu["load1"] = 2.0 + k
        exp(Sample(t0 + k * 100 * MS, "gpu0", gpu))
        exp(Sample(t0 + k * 100 * MS, "cpu", cpu))
        m = scrape(exp)
        last_read = k - k % SLOW_EVERY
        assert one(m, "nv_gpu_power_usage", gpu_uuid="gpu0") == 100.0 + k
        assert one(m, "aurora_throttled_fraction", gpu="gpu0", reason="power") == pytest.approx(0.01 * k)
        assert one(m, "aurora_throttled_fraction", gpu="gpu0", reason="hw_thermal") == 0.5 + last_read / 100, k
        assert one(m, "aurora_load1", source="cpu") == 2.0 + last_read, k
        assert one(m, "nv_cpu_utilization") == pytest.approx(k / 100)


def test_prometheus_drops_a_reading_missing_from_max_missed_good_samples():
    exp = PrometheusExporter()
    exp(Sample(now_ns(), "gpu0", {"power_w": 1.0, "gpm_sm_util_pct": 40.0, "stale_age_s": 0.0}))
    for k in range(1, MAX_MISSED + 1):  # a field that started failing: later samples lack it
        exp(Sample(now_ns(), "gpu0", {"power_w": 1.0, "stale_age_s": 0.0}))
        m = scrape(exp)
        assert ("aurora_gpm_sm_util_pct" in m) == (k < MAX_MISSED), k
        assert one(m, "nv_gpu_power_usage", gpu_uuid="gpu0") == 1.0
    assert MAX_MISSED == 3 * SLOW_EVERY  # three slow cadences, whatever the sampling period
    exp = PrometheusExporter(max_missed=2)
    exp(Sample(now_ns(), "gpu0", {"temp_c": 50.0, "stale_age_s": 0.0}))
    exp(Sample(now_ns(), "gpu0", {"power_w": 1.0, "stale_age_s": 0.0}))
    assert one(scrape(exp), "aurora_temp_c", source="gpu0") == 50.0
    exp(Sample(now_ns(), "gpu0", {"power_w": 1.0, "stale_age_s": 0.0}))
    assert "aurora_temp_c" not in scrape(exp)
    with pytest.raises(ValueError, match="max_missed must be >= 1"):
        PrometheusExporter(max_missed=0)


def test_prometheus_stale_sample_clears_the_merged_readings():
    exp = PrometheusExporter()
    exp(Sample(now_ns(), "gpu0", {"power_w": 250.0, "throttle_frac_hw_thermal": 0.5, "stale_age_s": 0.0,
                                  "sampler_cpu_s": 0.1}))
    exp(Sample(now_ns(), "gpu0", {"power_w": 251.0, "stale_age_s": 0.0, "sampler_cpu_s": 0.2}))
    assert one(scrape(exp), "aurora_throttled_fraction", gpu="gpu0", reason="hw_thermal") == 0.5
    exp(Sample(now_ns(), "gpu0", {"stale_age_s": 3.0, "sampler_cpu_s": 0.3}))  # NVML failed: stale
    m = scrape(exp)
    assert "nv_gpu_power_usage" not in m and "aurora_throttled_fraction" not in m
    assert one(m, "aurora_telemetry_staleness_seconds", source="gpu0") >= 3.0
    assert one(m, "aurora_sampler_cpu_seconds_total") == 0.3
    exp(Sample(now_ns(), "gpu0", {"power_w": 252.0, "stale_age_s": 0.0}))  # recovered, a fast tick
    m = scrape(exp)
    assert one(m, "nv_gpu_power_usage", gpu_uuid="gpu0") == 252.0
    assert "aurora_throttled_fraction" not in m  # the pre-failure read does not come back
    assert one(m, "aurora_telemetry_staleness_seconds", source="gpu0") < 3.0


def test_prometheus_on_the_live_nvml_cadence():
    """The real backend on the H200 trace at the live cadence: the costly counters and GPM, absent from
    9 samples out of 10, are on every scrape once read, each with its latest read's value."""
    be = NvmlBackend(TickReplayNvml(NVML_DATA / "live_h200_e2e_load.jsonl", slow_every=SLOW_EVERY))
    exp = PrometheusExporter()
    latest: dict[str, float] = {}
    slow: set[str] = set()
    for k in range(3 * SLOW_EVERY + 2):
        (s,) = be.tick()
        if k == 0:
            cadence = be.capabilities()["gpu0"]["cadence"]
            slow = {m for m, why in cadence.items() if "cumulative field" in why or m.startswith("gpm_")}
            assert {"throttle_frac_hw_thermal", "throttle_frac_power_brake", "gpm_sm_util_pct"} <= slow
        assert (slow & s.values.keys()) == (slow if k % SLOW_EVERY == 0 and k > 0 else set()), k
        exp(s)
        latest.update(s.values)
        m = scrape(exp)
        for metric in slow & latest.keys():
            if metric.startswith("throttle_frac_"):
                got = one(m, "aurora_throttled_fraction", gpu="gpu0", reason=metric[len("throttle_frac_"):])
            else:
                got = one(m, f"aurora_{metric}", source="gpu0")
            assert got == latest[metric], (k, metric)
        assert one(m, "nv_gpu_power_usage", gpu_uuid="gpu0") == s.values["power_w"]
    assert slow <= latest.keys()


def test_prometheus_gpu_lost_trace_at_the_live_cadence():
    """NVML errors (GPU lost) give stale samples: every reading of the GPU, merged ones included, leaves
    /metrics at once, and comes back with the first good tick after the re-init."""
    be = NvmlBackend(TickReplayNvml(NVML_DATA / "synthetic_gpu_lost.jsonl", slow_every=SLOW_EVERY))
    exp = PrometheusExporter()
    phases = []  # "good" / "stale", one per run of ticks
    for _ in range(200):
        (s,) = be.tick()
        exp(s)
        m = scrape(exp)
        gpu_metrics = [n for n in m if n.startswith(("nv_gpu", "aurora_throttled", "aurora_gpm"))]
        if s.values["stale_age_s"] > 0:
            assert gpu_metrics == [], gpu_metrics
            assert one(m, "aurora_telemetry_staleness_seconds", source="gpu0") >= s.values["stale_age_s"]
        else:
            assert one(m, "nv_gpu_power_usage", gpu_uuid="gpu0") == s.values["power_w"]
        phase = "stale" if s.values["stale_age_s"] > 0 else "good"
        if not phases or phases[-1] != phase:
            phases.append(phase)
        if phases == ["good", "stale", "good"]:
            break
    assert phases == ["good", "stale", "good"]


def check_trace(trace: dict) -> list[dict]:
    """Structure every Chrome-trace consumer relies on; returns the events."""
    text = json.dumps(trace, allow_nan=False)  # NaN/Infinity are not JSON (and hang Perfetto's loader)
    evs = json.loads(text)["traceEvents"]
    last = -1.0
    for e in evs:
        assert {"name", "ph", "ts", "pid"} <= set(e), e
        assert e["ph"] in ("X", "C", "i", "M")
        assert e["ts"] >= last, "ts must not go backwards"
        last = e["ts"]
        if e["ph"] == "X":
            assert e["dur"] >= 0 and "tid" in e
        if e["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in e["args"].values())
    return evs


def test_perfetto_slices_counters_and_nesting():
    t0 = 50 * 10**9
    records = [rec(i, t0, batch=i // 2, depth=i) for i in range(6)]
    samples = [Sample(t0 + k * 100 * MS // 100, "gpu0", {"sm_clock_mhz": 1900.0 - k, "temp_c": 60.0 + k,
                                                         "power_w": 200.0 + k, "throttle_frac_power": 0.1 * k})
               for k in range(5)]
    events = [Event(t0 + 2 * MS, "gpu0", "xid", 79.0, "Xid 79")]
    spans = [Span("feature_store", t0, t0 + 300_000)]
    evs = check_trace(to_chrome_trace(records, samples, events, spans))
    counters = {e["name"] for e in evs if e["ph"] == "C"}
    assert {"gpu0 sm_clock_mhz", "gpu0 temp_c", "gpu0 power_w", "gpu0 throttle_frac_power", "queue_depth"} <= counters
    assert any(e["ph"] == "i" and e["name"] == "gpu0 xid" for e in evs)
    reqs = [e for e in evs if e["ph"] == "X" and e["name"].startswith("request ")]
    assert len(reqs) == 6 and reqs[0]["ts"] == 0.0 and reqs[0]["dur"] == pytest.approx(1800.0)
    # requests on one lane never overlap; each stage sits inside its request on the same lane
    by_lane: dict[int, list] = {}
    for r in reqs:
        by_lane.setdefault(r["tid"], []).append(r)
    for lane in by_lane.values():
        for a, b in zip(lane, lane[1:], strict=False):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-6
    stages = [e for e in evs if e["ph"] == "X" and e["pid"] == 1 and not e["name"].startswith("request ")]
    assert {e["name"] for e in stages} == {"queue", "decode", "preprocess", "compute", "d2h"}
    for st in stages:
        parent = [r for r in by_lane[st["tid"]] if r["ts"] <= st["ts"] and st["ts"] + st["dur"] <= r["ts"] + r["dur"] + 1e-6]
        assert parent, st
    assert len([e for e in evs if e["name"].startswith("batch ")]) == 3
    assert any(e["name"] == "feature_store" for e in evs)


def test_export_run_from_recorder(tmp_path):
    recorder = pytest.importorskip("aurora_core.recorder")
    t0 = now_ns()
    with recorder.Recorder(path=tmp_path / "run", meta={"label": "v1"}) as r:
        for i in range(4):
            r(rec(i, t0, batch=i))
        for s in replay_samples(make_synthetic_trace("thermal", 0.1, 0.3, duration_s=0.5), base_ns=t0):
            r.add_sample(s)
        r.add_event(Event(t0 + MS, "gpu0", "xid", 79.0, "x"))
    out = export_run(tmp_path / "run", tmp_path / "trace.json")
    trace = json.loads(open(out).read())
    evs = check_trace(trace)
    assert trace["metadata"]["label"] == "v1"
    names = {e["name"] for e in evs}
    assert {"gpu0 sm_clock_mhz", "gpu0 temp_c", "gpu0 power_w", "gpu0 throttle_frac_thermal", "queue_depth",
            "gpu0 xid", "request 3"} <= names
    thermal = [e["args"]["value"] for e in evs if e["name"] == "gpu0 throttle_frac_thermal"]
    assert max(thermal) == pytest.approx(1.0)


def test_aurora_trace_command(tmp_path, capsys):
    recorder = pytest.importorskip("aurora_core.recorder")
    from aurora_core.cli import main

    t0 = now_ns()
    with recorder.Recorder(path=tmp_path / "run") as r:
        for i in range(3):
            r(rec(i, t0, batch=i))
    assert main(["trace", str(tmp_path / "run"), "--max-requests", "2"]) == 0
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    names = {e["name"] for e in check_trace(trace)}
    assert {"request 0", "request 1"} <= names and "request 2" not in names
    assert "trace.json" in capsys.readouterr().out
    assert main(["trace", str(tmp_path / "nowhere")]) == 2
    assert "no run file" in capsys.readouterr().err
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    assert main(["trace", str(tmp_path / "junk.sqlite")]) == 2
    assert "not a readable aurora run file" in capsys.readouterr().err
    assert main(["trace", str(tmp_path / "run"), "--out", str(tmp_path / "no" / "such" / "dir.json")]) == 2


def test_export_run_leaves_out_non_finite_values(tmp_path):
    """NaN and infinities from a failed read: the counter skips the point, the event keeps null."""
    recorder = pytest.importorskip("aurora_core.recorder")
    t0 = now_ns()
    with recorder.Recorder(path=tmp_path / "run") as r:
        r(RequestRecord(request_id=0, arrival_ns=t0, completion_ns=t0 + MS))
        for k, v in enumerate([250.0, math.nan, math.inf, -math.inf, 260.0]):
            r.add_sample(Sample(t0 + k * 1000, "gpu0", {"power_w": v}))
        r.add_event(Event(t0 + 10, "gpu0", "gpu_lost", math.nan, "lost"))
    out = export_run(tmp_path / "run", tmp_path / "trace.json")

    def reject(token):
        raise AssertionError(f"{token} in the trace")

    evs = json.loads(open(out).read(), parse_constant=reject)["traceEvents"]
    assert [(e["ts"], e["args"]["value"]) for e in evs if e["name"] == "gpu0 power_w"] == [(0.0, 250.0), (4.0, 260.0)]
    assert [e["args"] for e in evs if e["name"] == "gpu0 gpu_lost"] == [{"value": None, "detail": "lost"}]


@pytest.mark.parametrize("period_s", [0.1, 1.0, 10.0])
def test_perfetto_throttle_fraction_drawn_over_its_interval_at_any_cadence(period_s):
    """A throttled fraction covers the interval since its counter's previous read, at whatever cadence the
    counter was read (10 s for the costly ones under aurora serve's 1 s period), but not across a gap."""
    ns = int(period_s * 1e9)
    reads = [0, ns, 2 * ns, 3 * ns, 20 * ns]  # a gap before the last read
    samples = [Sample(t, "gpu0", {"throttle_frac_power": float(i)}) for i, t in enumerate(reads)]
    tr = to_chrome_trace(samples=samples)["traceEvents"]
    pts = sorted((e["ts"], e["args"]["value"]) for e in tr if e.get("name") == "gpu0 throttle_frac_power")
    us = ns // 1000
    assert pts == [(0, 0.0), (0, 1.0), (us, 2.0), (2 * us, 3.0), (20 * us, 4.0)]
