"""NVML backend against autospec mocks of the real pynvml module (no GPU here), plus the error matrix.

The mock is ``create_autospec(pynvml)``: a function renamed or re-signatured in nvidia-ml-py makes these
tests fail. Its behaviour comes from ``SimulatedNvml`` (a small GPU model); every pynvml function the
model does not implement raises NVMLError_FunctionNotFound, as a driver without it would.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
import time
from unittest import mock

import pynvml
import pytest

from aurora_core.records import RequestRecord
from aurora_core.telemetry.nvml import GPU_METRICS, SLOW_EVERY, NvmlBackend, NvmlEventWatcher
from aurora_core.telemetry.replay import SimulatedNvml
from aurora_core.telemetry.sampler import TelemetrySampler

# docs/CONTRACTS.md, "GPU metric names".
CONTRACT_GPU = {
    "util_gpu_busy_pct", "util_mem_busy_pct", "mem_used_bytes", "mem_total_bytes", "sm_clock_mhz",
    "sm_clock_max_mhz", "sm_clock_app_mhz", "mem_clock_mhz", "mem_clock_max_mhz", "temp_c", "temp_slowdown_c",
    "temp_margin_c", "power_w", "power_limit_w", "energy_mj", "clocks_event_reasons", "throttle_frac_power",
    "throttle_frac_thermal", "throttle_frac_sync_boost", "throttle_frac_board_limit", "throttle_frac_low_util",
    "throttle_frac_reliability", "throttle_frac_hw_slowdown", "throttle_frac_hw_thermal",
    "throttle_frac_power_brake", "idle_clocks", "pcie_tx_bytes_s", "pcie_rx_bytes_s", "pcie_gen", "pcie_gen_max",
    "pcie_width", "pcie_width_max", "pcie_replay_count", "ecc_sbe", "ecc_dbe", "remapped_rows_pending",
    "gpm_sm_util_pct", "gpm_sm_occupancy_pct", "gpm_tensor_active_pct", "gpm_dram_bw_util_pct", "stale_age_s",
    "sampler_cpu_s",
}
GPM = {"gpm_sm_util_pct", "gpm_sm_occupancy_pct", "gpm_tensor_active_pct", "gpm_dram_bw_util_pct"}


_SHARED: list = []


def autospec_api(sim: SimulatedNvml, fresh: bool = False):
    """An autospec of pynvml driven by ``sim``. Speccing the module is slow, so tests share one mock
    (reset here) unless a test leaves threads behind that may still call it (``fresh``)."""
    if fresh or not _SHARED:
        api = mock.create_autospec(pynvml, instance=False)
        if not fresh:
            _SHARED.append(api)
    else:
        api = _SHARED[0]
        api.reset_mock(return_value=True, side_effect=True)
    for name in dir(pynvml):
        fn = getattr(pynvml, name)
        if name.startswith("nvml") and inspect.isfunction(fn):
            impl = getattr(sim, name, None)
            getattr(api, name).side_effect = impl or pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    return api


class FakeClock:
    def __init__(self, t_s: float = 100.0):
        self.t_ns = int(t_s * 1e9)

    def __call__(self) -> int:
        return self.t_ns

    def advance(self, s: float) -> None:
        self.t_ns += int(s * 1e9)


def run_ticks(backend, sim, clock, n, period=0.1):
    out = []
    for _ in range(n):
        sim.t_s += period
        clock.advance(period)
        out.append(backend.tick())
    return out


def test_simulator_surface_is_real_pynvml():
    # Every function the model offers exists in pynvml with the same parameters: the model cannot
    # drift from the real API without this failing.
    for name in dir(SimulatedNvml):
        if name.startswith("nvml"):
            real = getattr(pynvml, name)
            ours = inspect.signature(getattr(SimulatedNvml(), name))
            assert len(ours.parameters) == len(inspect.signature(real).parameters), name


def test_contract_metrics_and_one_field_call_per_tick():
    sim, clock = SimulatedNvml(), FakeClock()
    api = autospec_api(sim)
    be = NvmlBackend(api, clock=clock)
    ticks = run_ticks(be, sim, clock, 3)
    values = ticks[-1][0].values
    assert ticks[-1][0].source == "gpu0"
    assert set(values) <= CONTRACT_GPU
    assert set(GPU_METRICS) - GPM <= set(values), sorted(set(GPU_METRICS) - GPM - set(values))
    assert set(be.missing()) == {f"gpu0.{m}" for m in GPM}
    assert all("nvmlGpmQueryDeviceSupport" in r for r in be.missing().values())
    # probe: 1 field call; each tick after it: exactly 1 (all fields batched)
    assert api.nvmlDeviceGetFieldValues.call_count == 1 + 3
    # units: NVML mW -> W, bytes stay bytes, margin derived from the threshold
    assert values["power_w"] == pytest.approx(280.0)
    assert values["power_limit_w"] == pytest.approx(350.0)
    assert values["mem_total_bytes"] == 80 << 30
    assert values["temp_margin_c"] == values["temp_slowdown_c"] - values["temp_c"] == 25.0
    assert values["pcie_tx_bytes_s"] == pytest.approx(2e9, rel=1e-6)
    assert values["sm_clock_mhz"] / values["sm_clock_max_mhz"] == 1.0
    assert values["stale_age_s"] == 0.0
    caps = be.capabilities()["gpu0"]
    assert caps["info"]["name"] == "Aurora Synthetic GPU"
    assert caps["supported"]["throttle_frac_thermal"].startswith(f"field {pynvml.NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN}")


def test_old_driver_falls_back_to_throttle_reasons_call():
    sim, clock = SimulatedNvml("hw_slowdown", 0.0, 10.0), FakeClock()
    api = autospec_api(sim)
    api.nvmlDeviceGetCurrentClocksEventReasons.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    api.nvmlDeviceGetCurrentClocksThrottleReasons.side_effect = sim.nvmlDeviceGetCurrentClocksEventReasons
    be = NvmlBackend(api, clock=clock)
    v = run_ticks(be, sim, clock, 2)[-1][0].values
    assert int(v["clocks_event_reasons"]) & pynvml.nvmlClocksThrottleReasonHwSlowdown
    assert v["throttle_frac_hw_slowdown"] == 1.0
    assert be.capabilities()["gpu0"]["supported"]["clocks_event_reasons"] == "nvmlDeviceGetCurrentClocksThrottleReasons"


# What an nvidia-ml-py older than the installed one lacks: the clocks-event renames (the H200 suite's
# release had neither spelling of BoardLimit/Reliability), the clocks-event field ids, GPM, newer
# event types, nvmlEventSetWait_v2 and the newer value types.
OLD_PYNVML_LACKS = (
    [n for n in dir(pynvml) if n.startswith(("nvmlClocksEventReason", "NVML_FI_DEV_CLOCKS_EVENT_REASON_",
                                             "NVML_GPM_", "nvmlGpm", "c_nvmlGpm"))]
    + ["nvmlClocksThrottleReasonBoardLimit", "nvmlClocksThrottleReasonReliability",
       "NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT", "NVML_FI_DEV_PERF_POLICY_RELIABILITY",
       "nvmlDeviceGetCurrentClocksEventReasons", "nvmlEventTypeGpuUnavailableError",
       "nvmlEventTypeGpuRecoveryAction", "nvmlEventTypePowerSourceChange", "nvmlEventSetWait_v2",
       "NVML_VALUE_TYPE_SIGNED_INT", "NVML_VALUE_TYPE_UNSIGNED_SHORT"]
)


def _import_copy(mp, module):
    """A fresh copy of ``module`` executed now, standing in for it in sys.modules until ``mp`` undoes.
    A copy rather than importlib.reload: reloading would rebind the classes (ReplayExhausted, ...)
    that other test modules imported, and their ``pytest.raises`` would stop matching."""
    spec = importlib.util.spec_from_file_location(module.__name__, module.__file__)
    copy = importlib.util.module_from_spec(spec)
    mp.setitem(sys.modules, module.__name__, copy)
    spec.loader.exec_module(copy)
    return copy


def test_older_nvidia_ml_py_imports_samples_what_exists_and_lists_the_rest_as_missing():
    import aurora_core.telemetry.nvml as nvml_mod
    import aurora_core.telemetry.replay as replay_mod

    assert all(hasattr(pynvml, n) for n in OLD_PYNVML_LACKS)  # else this test simulates nothing
    with pytest.MonkeyPatch.context() as mp:
        for name in OLD_PYNVML_LACKS:
            mp.delattr(pynvml, name)
        # Module-level tables are built at import: import both afresh against the older pynvml.
        old_nvml = _import_copy(mp, nvml_mod)
        old_replay = _import_copy(mp, replay_mod)
        sim, clock = old_replay.SimulatedNvml("thermal", 0.0, 10.0, xid_at=(0.25,)), FakeClock()
        api = autospec_api(sim, fresh=True)  # an autospec of the reduced module: old functions only
        assert not hasattr(api, "nvmlDeviceGetCurrentClocksEventReasons")
        api.nvmlDeviceGetCurrentClocksThrottleReasons.side_effect = sim.nvmlDeviceGetCurrentClocksEventReasons
        api.nvmlEventSetWait.side_effect = sim.nvmlEventSetWait_v2
        be = old_nvml.NvmlBackend(api, clock=clock)
        v = run_ticks(be, sim, clock, 3)[-1][0].values
        caps = be.capabilities()["gpu0"]
        missing = be.missing()

        # What this release still names is sampled: the thermal counter through its older field id,
        # power through the pre-rename bit, idle through the pre-rename GpuIdle bit.
        assert v["throttle_frac_thermal"] == pytest.approx(1.0)
        assert caps["supported"]["throttle_frac_thermal"] == f"field {pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL} (counter)"
        assert int(v["clocks_event_reasons"]) == pynvml.nvmlClocksThrottleReasonSwThermalSlowdown
        assert v["throttle_frac_power"] == 0.0 and "bit" in caps["supported"]["throttle_frac_power"]
        assert v["idle_clocks"] == 0.0
        assert v["power_w"] == pytest.approx(280.0)
        # The rest is missing, saying which name this nvidia-ml-py lacks; never a value.
        for metric, name in (("throttle_frac_board_limit", "nvmlClocksThrottleReasonBoardLimit"),
                             ("throttle_frac_reliability", "nvmlClocksThrottleReasonReliability"),
                             ("gpm_sm_util_pct", "NVML_GPM_METRIC_SM_UTIL")):
            assert metric not in v
            assert name in missing[f"gpu0.{metric}"] and "not in this nvidia-ml-py" in missing[f"gpu0.{metric}"]
        assert set(missing) == {f"gpu0.{m}" for m in GPM | {"throttle_frac_board_limit", "throttle_frac_reliability"}}

        # Events: the older wait call is used; event types this release lacks are listed.
        watcher = old_nvml.NvmlEventWatcher(api, clock=clock)
        events = watcher.poll(0)
        watcher.close()
        assert [(e.kind, e.value) for e in events] == [("xid", 79.0)]
        assert watcher.missing["events.gpu_unavailable"] == "nvmlEventTypeGpuUnavailableError: not in this nvidia-ml-py"
    assert sys.modules["aurora_core.telemetry.nvml"] is nvml_mod and hasattr(pynvml, "nvmlGpmMetricsGet")
    assert not nvml_mod.ABSENT and not nvml_mod.EVENTS_ABSENT  # the installed release names them all


@pytest.mark.parametrize("counters,via", [("violation", "nvmlDeviceGetViolationStatus"), ("bitmask", "bit")])
def test_throttle_counter_fallbacks(counters, via):
    sim, clock = SimulatedNvml("thermal", 0.0, 10.0, counters=counters), FakeClock()
    be = NvmlBackend(autospec_api(sim), clock=clock)
    v = run_ticks(be, sim, clock, 3)[-1][0].values
    assert v["throttle_frac_thermal"] == pytest.approx(1.0)
    assert v["throttle_frac_power"] == 0.0
    assert via in be.capabilities()["gpu0"]["supported"]["throttle_frac_thermal"]


def test_gpm_metrics_on_hopper_like_device():
    sim, clock = SimulatedNvml(gpm=True), FakeClock()
    be = NvmlBackend(autospec_api(sim), clock=clock)
    first, second = run_ticks(be, sim, clock, 2)
    assert not GPM & set(first[0].values)  # GPM needs two samples
    assert second[0].values["gpm_sm_util_pct"] == pytest.approx(95.0 * 0.9)
    assert second[0].values["gpm_dram_bw_util_pct"] == pytest.approx(37.0)


def test_unsupported_at_probe_is_missing_with_reason_not_stale():
    sim, clock = SimulatedNvml(), FakeClock()
    api = autospec_api(sim)
    api.nvmlDeviceGetTemperature.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    be = NvmlBackend(api, clock=clock)
    v = run_ticks(be, sim, clock, 2)[-1][0].values
    assert "temp_c" not in v and "temp_margin_c" not in v  # absent, never a fake 0
    assert v["stale_age_s"] == 0.0
    assert be.missing()["gpu0.temp_c"] == "nvmlDeviceGetTemperature: Not Supported"
    calls = api.nvmlDeviceGetTemperature.call_count
    run_ticks(be, sim, clock, 2)
    assert api.nvmlDeviceGetTemperature.call_count == calls  # probed once, never called again


ERRORS = {
    "NotSupported": pynvml.NVML_ERROR_NOT_SUPPORTED,
    "FunctionNotFound": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    "GpuIsLost": pynvml.NVML_ERROR_GPU_IS_LOST,
    "Unknown": pynvml.NVML_ERROR_UNKNOWN,
}


@pytest.mark.parametrize("err", list(ERRORS))
def test_error_during_sampling_goes_stale_then_recovers(err):
    sim, clock = SimulatedNvml(), FakeClock()
    api = autospec_api(sim)
    be = NvmlBackend(api, clock=clock)
    run_ticks(be, sim, clock, 2)
    exc_cls = getattr(pynvml, f"NVMLError_{err}")
    api.nvmlDeviceGetUtilizationRates.side_effect = exc_cls()
    assert exc_cls().value == ERRORS[err]
    stale = run_ticks(be, sim, clock, 3)  # never raises: this is what keeps requests untouched
    ages = [t[0].values["stale_age_s"] for t in stale]
    assert all(set(t[0].values) == {"stale_age_s"} for t in stale)
    assert ages == sorted(ages) and ages[0] > 0
    events = be.drain_events()
    assert events[0].kind == ("gpu_lost" if err == "GpuIsLost" else "sampler_error")
    assert "retry in" in events[0].detail
    api.nvmlDeviceGetUtilizationRates.side_effect = sim.nvmlDeviceGetUtilizationRates
    good = run_ticks(be, sim, clock, 40)  # long enough for the backoff (0.5 s, then 1 s, ...)
    assert good[-1][0].values["stale_age_s"] == 0.0
    assert "util_gpu_busy_pct" in good[-1][0].values
    assert any(e.kind == "sampler_recovered" for e in be.drain_events())
    assert api.nvmlInit.call_count >= 2  # recovery is a re-init


def test_gpu_lost_during_init_retries_with_backoff():
    sim, clock = SimulatedNvml(), FakeClock()
    api = autospec_api(sim)
    api.nvmlDeviceGetCount.side_effect = pynvml.NVMLError_GpuIsLost()
    be = NvmlBackend(api, clock=clock)
    run_ticks(be, sim, clock, 30)  # 3 s: retries at 0.5 s, then +1 s, then +2 s
    assert api.nvmlInit.call_count == 3
    assert not be.healthy and "GPU is lost" in be.error
    api.nvmlDeviceGetCount.side_effect = sim.nvmlDeviceGetCount
    run_ticks(be, sim, clock, 60)
    assert be.healthy


def test_event_watcher_reports_xid():
    sim = SimulatedNvml(xid_at=[0.5])
    api = autospec_api(sim)
    w = NvmlEventWatcher(api, clock=lambda: 7)
    sim.t_s = 0.2
    assert w.poll(0) == []
    sim.t_s = 0.6
    (ev,) = w.poll(0)
    assert (ev.source, ev.kind, ev.value, ev.ts_ns) == ("gpu0", "xid", 79.0, 7)
    w.close()
    api.nvmlEventSetFree.assert_called_once()


def test_live_pynvml_without_a_driver_is_missing_not_fatal():
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works here; this checks the no-driver path")
    except pynvml.NVMLError:
        pass
    be = NvmlBackend()
    assert be.tick() == []  # no known GPU yet: nothing to mark stale
    assert "gpu" in be.missing() and be.missing()["gpu"].startswith("init:")
    s = TelemetrySampler(gpu="auto", cpu=False)
    assert s._resolve_gpu() is None and s.missing()["gpu"].startswith("NVML unavailable")


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_hung_call_does_not_block_requests_or_stop():
    """A call that would hang 10 s: stale marking, poller restart (recovery), bounded stop()."""
    sim = SimulatedNvml()
    api = autospec_api(sim, fresh=True)
    release, in_hang = threading.Event(), threading.Event()
    n = {"calls": 0}

    def util(h):
        n["calls"] += 1
        if n["calls"] == 4:  # the 3rd tick after the probe hangs
            in_hang.set()
            release.wait(10.0)
        return sim.nvmlDeviceGetUtilizationRates(h)

    api.nvmlDeviceGetUtilizationRates.side_effect = util
    got, events = [], []
    from aurora_core.export.prometheus import PrometheusExporter

    exporter = PrometheusExporter()
    s = TelemetrySampler(callbacks=[got.append, exporter], event_callbacks=[events.append], period_s=0.02,
                         gpu=True, cpu=False, nvml_api=api, hang_timeout_s=0.5, stale_after_s=0.1)
    try:
        s.start()
        assert in_hang.wait(10.0)
        # the request path while NVML hangs: a record through the sink, a /metrics render, latest()
        exporter(RequestRecord(request_id=1, arrival_ns=1, completion_ns=2))
        assert b"nv_inference_request_success" in exporter.generate()
        assert not release.is_set()
        assert wait_for(lambda: any(x.values.get("stale_age_s", 0) > 0 for x in got))
        assert wait_for(lambda: any(e.kind == "sampler_error" and "blocked" in e.detail for e in events))
        # recovery: a new poller re-initialises and good samples flow while the old call is still stuck
        n_before = len(got)
        assert wait_for(lambda: any(x.values.get("stale_age_s") == 0.0 and "util_gpu_busy_pct" in x.values
                                    for x in got[n_before:]))
        assert in_hang.is_set() and not release.is_set()
    finally:
        s.stop()
        stopped_while_hung = not release.is_set()
        release.set()
    assert stopped_while_hung  # stop() returned although the NVML call had not


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except pynvml.NVMLError:
        return False


requires_nvml = pytest.mark.skipif(not _nvml_works(), reason="needs an NVIDIA driver (NVML)")


@requires_nvml
def test_live_nvml_backend_reads_a_real_gpu():
    be = NvmlBackend()
    try:
        be.tick()
        time.sleep(0.2)
        (s, *_) = be.tick()
    finally:
        be.shutdown()
    v = s.values
    assert v["stale_age_s"] == 0.0, be.error
    for m in ("util_gpu_busy_pct", "mem_used_bytes", "sm_clock_mhz", "temp_c", "power_w"):
        assert m in v or f"gpu0.{m}" in be.missing(), m
    assert set(v) <= CONTRACT_GPU
    assert 0 < v["sm_clock_mhz"] <= v.get("sm_clock_max_mhz", float("inf"))
    for k, x in v.items():
        if k.startswith("throttle_frac_"):
            assert 0.0 <= x <= 1.0, (k, x)


@requires_nvml
def test_live_sampler_with_gpu():
    got = []
    with TelemetrySampler(callbacks=[got.append], period_s=0.05, gpu=True, cpu=False) as s:
        assert wait_for(lambda: sum(x.source == "gpu0" and x.values.get("stale_age_s") == 0.0 for x in got) >= 3)
    assert s.capabilities()["gpu"]["gpu0"]["info"]["name"]
    assert s.sampler_cpu_s > 0


def test_implausible_throttle_counter_is_dropped_not_clamped():
    # a counter running 3x faster than time (wrong unit, or a field id the driver numbers differently)
    sim, clock = SimulatedNvml("thermal", 0.0, 10.0, severity=3.0), FakeClock()
    be = NvmlBackend(autospec_api(sim), clock=clock)
    v = run_ticks(be, sim, clock, 3)[-1][0].values
    assert "throttle_frac_thermal" not in v
    assert "implausible" in be.missing()["gpu0.throttle_frac_thermal"]
    assert v["throttle_frac_power"] == 0.0


def test_wedged_nvml_does_not_pile_up_threads():
    from aurora_core.telemetry.sampler import MAX_ABANDONED

    sim = SimulatedNvml()
    api = autospec_api(sim, fresh=True)
    release = threading.Event()
    n = {"calls": 0}

    def util(h):
        n["calls"] += 1
        if n["calls"] > 1:  # every call after the probe hangs: the driver is wedged
            release.wait(10.0)
        return sim.nvmlDeviceGetUtilizationRates(h)

    api.nvmlDeviceGetUtilizationRates.side_effect = util
    events = []
    s = TelemetrySampler(event_callbacks=[events.append], period_s=0.02, gpu=True, cpu=False, nvml_api=api,
                         hang_timeout_s=0.2, stale_after_s=0.05)
    restarts = lambda: [e for e in events if "blocked" in e.detail]  # noqa: E731
    try:
        s.start()
        assert wait_for(lambda: len(restarts()) >= MAX_ABANDONED)
        time.sleep(1.0)  # several more hang timeouts: no further restarts
        assert len(restarts()) == MAX_ABANDONED
        assert n["calls"] == 1 + 1 + MAX_ABANDONED  # first probe, then one stuck call per poller
    finally:
        s.stop()
        release.set()


SLOW_FIELD_IDS = {pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT,
                  pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
                  pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, pynvml.NVML_FI_DEV_REMAPPED_PENDING}


def test_slow_every_default_live_and_from_trace_header():
    assert NvmlBackend().slow_every == SLOW_EVERY == 10  # the live driver: 1 Hz at 10 Hz
    # other APIs: the cadence their trace was made at; traces before the split read all every tick
    assert NvmlBackend(autospec_api(SimulatedNvml())).slow_every == 1
    replay = mock.Mock(spec=["header"], header={"format": "aurora-nvml-trace", "slow_every": 5})
    assert NvmlBackend(replay).slow_every == 5
    with pytest.raises(ValueError):
        NvmlBackend(slow_every=0)


def test_slow_group_once_per_slow_every_ticks_fast_group_every_tick():
    sim, clock = SimulatedNvml("thermal", 0.85, 1.75, severity=0.6), FakeClock()
    api = autospec_api(sim)
    be = NvmlBackend(api, clock=clock, slow_every=10)
    ticks = run_ticks(be, sim, clock, 25)
    calls = [c.args[1] for c in api.nvmlDeviceGetFieldValues.call_args_list[1:]]  # [0] is the probe
    fast = [ids for ids in calls if not SLOW_FIELD_IDS & set(ids)]
    slow = [ids for ids in calls if SLOW_FIELD_IDS & set(ids)]
    assert len(fast) == 25 and len(slow) == 3  # ticks 0, 10, 20
    assert all(set(ids) == SLOW_FIELD_IDS for ids in slow)  # the second call holds the slow fields only
    for fid in (pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES,
                pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, pynvml.NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN):
        assert all(fid in ids for ids in fast), fid
    # slow calls: probe + 3; fast calls: probe + 25
    for fn in ("nvmlDeviceGetApplicationsClock", "nvmlDeviceGetCurrPcieLinkGeneration",
               "nvmlDeviceGetCurrPcieLinkWidth"):
        assert getattr(api, fn).call_count == 1 + 3, fn
    for fn in ("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetTemperature", "nvmlDeviceGetCurrentClocksEventReasons"):
        assert getattr(api, fn).call_count == 1 + 25, fn

    # Slow values are carried: every sample has them, as read at the last slow tick (<= 10 x 0.1 s old).
    energy = [t[0].values["energy_mj"] for t in ticks]
    assert energy[:10] == [energy[0]] * 10 and energy[10:20] == [energy[10]] * 10 and energy[10] > energy[0]
    assert all(t[0].values["sm_clock_app_mhz"] == sim.APP_SM and t[0].values["stale_age_s"] == 0.0 for t in ticks)
    assert "every 10 ticks" in be.capabilities()["gpu0"]["supported"]["energy_mj"]
    assert "every" not in be.capabilities()["gpu0"]["supported"]["throttle_frac_thermal"]

    # Throttled fractions and PCIe rates (per-tick counters) are the same as reading everything each tick.
    sim1, clock1 = SimulatedNvml("thermal", 0.85, 1.75, severity=0.6), FakeClock()
    every_tick = run_ticks(NvmlBackend(autospec_api(sim1), clock=clock1, slow_every=1), sim1, clock1, 25)
    per_tick = [m for m in ticks[-1][0].values if m.startswith(("throttle_frac_", "pcie_tx", "pcie_rx", "power_w"))]
    assert "throttle_frac_thermal" in per_tick and "pcie_tx_bytes_s" in per_tick
    for a, b in zip(ticks, every_tick, strict=True):
        assert {m: a[0].values.get(m) for m in per_tick} == {m: b[0].values.get(m) for m in per_tick}
    assert "throttle_frac_thermal" not in ticks[0][0].values  # the first tick has no interval yet
    assert max(t[0].values["throttle_frac_thermal"] for t in ticks[1:]) == pytest.approx(0.6)


def test_slow_field_failing_at_a_slow_read_is_absent_until_the_next_not_carried():
    sim, clock = SimulatedNvml(), FakeClock()
    api = autospec_api(sim)
    fail = {"on": False}

    def fields(h, ids):
        arr = sim.nvmlDeviceGetFieldValues(h, ids)
        for fv in arr:
            if fail["on"] and fv.fieldId == pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
                fv.nvmlReturn = pynvml.NVML_ERROR_UNKNOWN
        return arr

    api.nvmlDeviceGetFieldValues.side_effect = fields
    be = NvmlBackend(api, clock=clock, slow_every=4)
    first = run_ticks(be, sim, clock, 4)
    assert all("energy_mj" in t[0].values for t in first)
    fail["on"] = True
    failed = run_ticks(be, sim, clock, 4)  # tick 4 is a slow tick whose energy read fails
    assert all("energy_mj" not in t[0].values and "power_limit_w" in t[0].values for t in failed)
    fail["on"] = False
    assert "energy_mj" in run_ticks(be, sim, clock, 1)[0][0].values


HW_THERM = pynvml.NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN
HW_BRAKE = pynvml.NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN
SW_THERM = pynvml.NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN
PCIE_TX, PCIE_RX = pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES
# NVML latencyUsec per field as on the live H200 (tests/data/nvml/live_h200_e2e_load.jsonl): the probe's
# cold call, then the warm reads. Unlisted fields: 0.
PROBE_US = {HW_THERM: 223, HW_BRAKE: 223, SW_THERM: 109, PCIE_TX: 83, PCIE_RX: 80}
WARM_US = {HW_THERM: 292, HW_BRAKE: 292, SW_THERM: 0, PCIE_TX: 145, PCIE_RX: 84}


def priced_api(sim):
    """The autospec API on ``sim`` whose field values carry H200-like latencies, and whose PCIe byte
    counters are 32-bit and wrap, as the real driver's do (NVML_VALUE_TYPE_UNSIGNED_INT)."""
    api = autospec_api(sim)
    n = {"calls": 0}

    def fields(h, ids):
        arr = sim.nvmlDeviceGetFieldValues(h, ids)
        lat = PROBE_US if n["calls"] == 0 else WARM_US
        n["calls"] += 1
        for fv in arr:
            fv.latencyUsec = lat.get(fv.fieldId, 0)
            if fv.fieldId in (PCIE_TX, PCIE_RX):
                fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                fv.value.uiVal = fv.value.ullVal % (1 << 32)
        return arr

    api.nvmlDeviceGetFieldValues.side_effect = fields
    return api


def throttled_s(ticks, metric):
    """Throttled seconds the samples report: each fraction times the real interval since the previous
    read of its counter (the first tick reads every counter)."""
    reads = [ticks[0][0]] + [t[0] for t in ticks[1:] if metric in t[0].values]
    return sum(b.values[metric] * (b.ts_ns - a.ts_ns) / 1e9 for a, b in zip(reads, reads[1:], strict=False))


def test_costly_counter_goes_slow_and_keeps_every_throttled_ns_cheap_and_narrow_ones_stay_per_tick():
    # HW thermal episode over [0.85, 2.05) s at 0.6: 0.72 s throttled in all.
    runs = {}
    for every in (1, 10):
        sim, clock = SimulatedNvml("hw_thermal", 0.85, 2.05, severity=0.6), FakeClock()
        api = priced_api(sim)
        be = NvmlBackend(api, clock=clock, slow_every=every)
        runs[every] = (be, api, run_ticks(be, sim, clock, 35))
    be, api, ticks = runs[10]
    calls = [c.args[1] for c in api.nvmlDeviceGetFieldValues.call_args_list[3:]]  # after the probe and tick 0
    fast = [ids for ids in calls if pynvml.NVML_FI_DEV_POWER_INSTANT in ids]
    slow = [ids for ids in calls if pynvml.NVML_FI_DEV_POWER_INSTANT not in ids]
    assert len(fast) == 35 - 1 and len(slow) == 3  # ticks 10, 20, 30
    assert all(HW_THERM in ids and HW_BRAKE in ids for ids in slow)
    assert not any(HW_THERM in ids or HW_BRAKE in ids for ids in fast)
    # cheap (0 us once warm, 109 us at the cold probe) and 32-bit (they wrap) counters: every tick
    assert all(SW_THERM in ids and PCIE_TX in ids and PCIE_RX in ids for ids in fast)

    for k, t in enumerate(ticks):
        assert ("throttle_frac_hw_thermal" in t[0].values) == (k > 0 and k % 10 == 0), k
        assert ("throttle_frac_thermal" in t[0].values) == (k > 0), k
        assert ("pcie_rx_bytes_s" in t[0].values) == (k > 0), k
    every_tick = runs[1][2]
    for metric in ("throttle_frac_hw_thermal", "throttle_frac_thermal"):
        assert throttled_s(ticks, metric) == pytest.approx(throttled_s(every_tick, metric), abs=1e-9), metric
    assert throttled_s(ticks, "throttle_frac_hw_thermal") == pytest.approx(0.6 * 1.2, abs=1e-9)
    # the 1 s reads: 0.25 s of the episode at 0.6 in the first, 0.95 s in the second
    assert [t[0].values["throttle_frac_hw_thermal"] for t in ticks[10::10]] == pytest.approx([0.15, 0.57, 0.0])

    caps = be.capabilities()["gpu0"]
    for m in ("throttle_frac_hw_thermal", "throttle_frac_power_brake"):
        assert "every 10 ticks" in caps["cadence"][m] and "took 292 us" in caps["cadence"][m], m
    assert "throttle_frac_thermal" not in caps["cadence"] and caps["field_latency_us"]["throttle_frac_thermal"] == 0
    assert "every tick although" in caps["cadence"]["pcie_tx_bytes_s"]
    assert caps["field_latency_us"]["pcie_tx_bytes_s"] == 145
    assert runs[1][0].capabilities()["gpu0"]["cadence"] == {}  # one cadence: nothing to say


@pytest.mark.parametrize("every", [1, 10])
def test_a_32bit_byte_counter_that_wraps_gives_its_rate(every):
    sim, clock = SimulatedNvml(), FakeClock()
    be = NvmlBackend(priced_api(sim), clock=clock, slow_every=every)
    ticks = run_ticks(be, sim, clock, 12)  # RX at 6 GB/s: the 32-bit counter wraps at ~0.72 s
    rx = [t[0].values.get("pcie_rx_bytes_s") for t in ticks[1:]]
    assert rx == pytest.approx([6e9] * 11, rel=1e-6)


def test_gpm_on_slow_ticks_only_as_averages_between_them():
    sim, clock = SimulatedNvml(gpm=True), FakeClock()
    api = autospec_api(sim)
    be = NvmlBackend(api, clock=clock, slow_every=10)
    ticks = run_ticks(be, sim, clock, 25)
    for k, t in enumerate(ticks):
        assert (GPM <= set(t[0].values)) == (k in (10, 20)), k
        assert not (GPM & set(t[0].values)) or k in (10, 20), k
    assert ticks[10][0].values["gpm_sm_util_pct"] == pytest.approx(95.0 * 0.9)
    assert api.nvmlGpmSampleGet.call_count == 3 and api.nvmlGpmMetricsGet.call_count == 2  # ticks 0, 10, 20
    assert all("GPM averages" in be.capabilities()["gpu0"]["cadence"][m] for m in GPM)
