"""NVML backend: per-GPU hardware readings as ``Sample``s with the metric names of docs/CONTRACTS.md.

The backend talks to an "nvml API" object, never to ``pynvml`` directly. The live API is the ``pynvml``
module itself; ``aurora_core.telemetry.replay`` provides a recording wrapper and a replay object with the
same functions, so a replayed trace runs through exactly this code.

Per device, ``probe()`` runs once (and again after a recovery): every candidate field and call is tried
once; what fails with NotSupported / FunctionNotFound / NoPermission is recorded in ``missing`` with the
reason and never called again. A constant, field id or function that the installed nvidia-ml-py does
not define (older releases lack the clocks-event names, GPM, newer event types) is missing the same way,
with the reason "not in this nvidia-ml-py": the module imports with any release. Each ``tick()`` then reads the
fast set with ONE ``nvmlDeviceGetFieldValues`` call (instant power, PCIe byte counters, the cheap
throttle-time counters), plus the calls the fields API lacks (utilization, memory, clocks, temperature,
clocks-event reasons).

Two cadences (``slow_every``, default ``SLOW_EVERY`` = every 10th tick, 1 Hz at the default 100 ms
period). Read on slow ticks only, with a SECOND batched ``nvmlDeviceGetFieldValues`` call for their fields:

* slow-changing readings (``SLOW_METRICS``: energy, power limit, PCIe replay count, ECC, pending row
  remaps, application clock, PCIe link generation/width, and their fallback calls), CARRIED forward
  between slow ticks: up to ``slow_every`` x period old (1 s by default). One that failed at its last
  slow read is absent until the next one that succeeds, never carried from an older read;
* cumulative counters NVML prices high: a throttle-time or byte counter field whose ``latencyUsec`` is
  at least ``EXPENSIVE_FIELD_US`` (50 µs) at the first read after the probe (the probe's own call is
  cold: see ``_read``). A counter loses nothing when read less often, so each value is the delta over
  the REAL interval since the previous read of that counter (1 s), and it is absent in between, not
  carried: a value at time t always covers the interval that ends at t. Counters NVML returns in 32
  bits (the PCIe TX/RX bytes) stay per tick whatever they cost, since read once a second they would
  wrap more than once unseen above 4.29 GB/s (``_WRAP``); a single wrap between two reads is counted.
  Counters read through nvmlDeviceGetViolationStatus (older drivers) have no NVML latency and stay
  per tick;
* GPM metrics (Hopper+): each is an average over the interval between two GPM samples, and samples
  are taken on slow ticks, so they are 1 s averages, present on slow ticks only.

Instantaneous readings (clocks, power, temperature, utilization, the clocks-event reasons bitmask and the
bitmask-only causes) and the cheap counters stay per tick. ``capabilities()["gpuN"]["cadence"]`` says, per
metric, which ones are not per tick and why (with the field's latency), and ``field_latency_us`` gives
every field's. ``stale_age_s`` is 0 on a good tick (the fast set was read now), the age of the last good
tick otherwise.

Costs. On a live H200 (driver 580.159.04, trace tests/data/nvml/live_h200_e2e_load.jsonl) one all-fields
call took 4.2 ms median, 2.9 ms of it NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION (max 15 ms) and 0.24 ms the
PCIe replay counter; nvmlDeviceGetApplicationsClock took 0.63 ms and nvmlDeviceGetCurrPcieLinkWidth
0.09 ms per call, against tens of µs for the fast calls; the whole sampler (cpu + gpu0) then cost 8.4%
of one core at 10 Hz, against a 1% target. The SLOW_METRICS split measured 3.9% on the same H200
(benchmarks/RESULTS.md, run 4). Priced from that trace's per-call ``dur_ns`` and per-field latencies
(``benchmarks/bench_telemetry.py --replay ... --baseline``, one run): with the SLOW_METRICS split alone,
a fast tick took 1340 µs of driver time (the field call 935 µs, 292 of it each for the HW thermal and
HW power-brake counters, 145 + 84 the PCIe bytes; GPM 315 µs), 1.74% of one core with the slow set
amortised; with the costly counters and GPM on slow ticks, a fast tick takes 447 µs (field call 357)
and a slow one 5.4 ms, 0.94% of one core. Wall time of the calls, an upper bound on their CPU time.
The Python side of a tick is small against that: ~71 µs (122 µs with the sampler loop around it,
0.12% of one core) on the 2-core dev VM, replaying that trace with no driver time (benchmarks/RESULTS.md,
third session, Telemetry).

Any other NVML error during a tick (GPU lost, unknown error, driver gone, ...) marks the backend
unhealthy: the tick returns stale samples (only ``stale_age_s``, the age of the newest good reading) and
the backend re-initialises NVML with exponential backoff on later ticks. Nothing here is ever called on
a request path; the sampler runs it on its own thread (``aurora_core.telemetry.sampler``).

Units: clocks MHz, temperature °C, power W (NVML gives mW), energy mJ, memory and PCIe bytes,
throttle fractions 0..1 of the interval between two reads of their counter (one tick, or ``slow_every``).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pynvml

from aurora_core.records import Event, Sample, now_ns

# Optional pynvml names. nvidia-ml-py adds names over releases (the clocks-event renames, new field ids,
# GPM, new event types) and older ones lack them; a name this release lacks is an unsupported
# capability, reported in ``missing`` with NOT_IN_PYNVML, never a crash at import and never a copied
# numeric value (ids were renumbered between releases, see IMPLAUSIBLE_FRAC).
NOT_IN_PYNVML = "not in this nvidia-ml-py"


def pynvml_attr(*names: str):
    """The first of ``names`` this pynvml defines (new name first, then older spellings), else None."""
    for name in names:
        value = getattr(pynvml, name, None)
        if value is not None:
            return value
    return None


def _reason_bit(suffix: str) -> int | None:
    # nvmlClocksEventReason* replaced nvmlClocksThrottleReason*; some bits only exist under one name.
    return pynvml_attr(f"nvmlClocksEventReason{suffix}", f"nvmlClocksThrottleReason{suffix}")


def _reason_bit_names(suffix: str) -> str:
    return f"nvmlClocksEventReason{suffix}/nvmlClocksThrottleReason{suffix}"


#: metric -> "NAME: not in this nvidia-ml-py" for each pynvml name it would use that is absent here.
ABSENT: dict[str, list[str]] = {}


def _note_absent(metric: str, name: str) -> None:
    ABSENT.setdefault(metric, []).append(f"{name}: {NOT_IN_PYNVML}")


# Errors that mean "this device or driver cannot give this reading", as opposed to a failure.
_UNSUPPORTED = tuple(
    v for v in (pynvml_attr(n) for n in (
        "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_NO_PERMISSION",
        "NVML_ERROR_INVALID_ARGUMENT", "NVML_ERROR_NOT_FOUND")) if v is not None
)

# fieldValue.valueType -> attribute of the c_nvmlValue_t union that holds it (unknown types: ullVal).
_VALUE_ATTR = {
    code: attr
    for code, attr in (
        (pynvml_attr("NVML_VALUE_TYPE_DOUBLE"), "dVal"),
        (pynvml_attr("NVML_VALUE_TYPE_UNSIGNED_INT"), "uiVal"),
        (pynvml_attr("NVML_VALUE_TYPE_UNSIGNED_LONG"), "ulVal"),
        (pynvml_attr("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG"), "ullVal"),
        (pynvml_attr("NVML_VALUE_TYPE_SIGNED_LONG_LONG"), "sllVal"),
        (pynvml_attr("NVML_VALUE_TYPE_SIGNED_INT"), "siVal"),
        (pynvml_attr("NVML_VALUE_TYPE_UNSIGNED_SHORT"), "usVal"),
    )
    if code is not None
}

# (cause, cumulative-time field id names in order of preference, ViolationStatus policy name or None,
#  clocks-event reason bit suffix).
_THROTTLE_SPEC: tuple[tuple[str, tuple[str, ...], str | None, str], ...] = (
    ("power", ("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP",), "NVML_PERF_POLICY_POWER", "SwPowerCap"),
    ("thermal", ("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN", "NVML_FI_DEV_PERF_POLICY_THERMAL"),
     "NVML_PERF_POLICY_THERMAL", "SwThermalSlowdown"),
    ("sync_boost", ("NVML_FI_DEV_CLOCKS_EVENT_REASON_SYNC_BOOST",), "NVML_PERF_POLICY_SYNC_BOOST", "SyncBoost"),
    ("board_limit", ("NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT",), "NVML_PERF_POLICY_BOARD_LIMIT", "BoardLimit"),
    ("low_util", ("NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION",), "NVML_PERF_POLICY_LOW_UTILIZATION", "GpuIdle"),
    ("reliability", ("NVML_FI_DEV_PERF_POLICY_RELIABILITY",), "NVML_PERF_POLICY_RELIABILITY", "Reliability"),
    ("hw_slowdown", (), None, "HwSlowdown"),
    ("hw_thermal", ("NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN",), None, "HwThermalSlowdown"),
    ("power_brake", ("NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN",), None, "HwPowerBrakeSlowdown"),
)


def _throttle_causes() -> tuple[tuple[str, tuple[int, ...], int | None, int | None], ...]:
    out = []
    for cause, id_names, policy_name, suffix in _THROTTLE_SPEC:
        metric = f"throttle_frac_{cause}"
        ids = []
        for name in id_names:
            fid = pynvml_attr(name)
            if fid is None:
                _note_absent(metric, name)
            else:
                ids.append(fid)
        policy = pynvml_attr(policy_name) if policy_name else None
        if policy_name and policy is None:
            _note_absent(metric, policy_name)
        bit = _reason_bit(suffix)
        if bit is None:
            _note_absent(metric, _reason_bit_names(suffix))
        out.append((cause, tuple(ids), policy, bit))
    return tuple(out)


#: Throttle causes: (metric suffix, cumulative-time field ids in order of preference,
#: nvmlDeviceGetViolationStatus policy for the fallback or None, clocks-event reason bit or None).
#: Counters are nanoseconds of throttled time; they cannot miss a short episode the way the bitmask
#: snapshot can, so the bitmask is only the last resort (and the only source for hw_slowdown).
#: Ids, policies and bits this nvidia-ml-py lacks are left out (None) and listed in ABSENT.
THROTTLE_CAUSES = _throttle_causes()

_IDLE_BIT = _reason_bit("GpuIdle")
if _IDLE_BIT is None:
    _note_absent("idle_clocks", _reason_bit_names("GpuIdle"))


def _resolve(spec, what: Callable[[str], str]) -> dict:
    """{pynvml value: payload} for the names this pynvml has; the others go to ABSENT."""
    out = {}
    for name, payload in spec:
        value = pynvml_attr(name)
        if value is None:
            _note_absent(what(payload), name)
        else:
            out[value] = payload
    return out


#: Gauge fields: field id -> (metric, scale). Read in the one batched call when supported.
GAUGE_FIELDS: dict[int, tuple[str, float]] = _resolve((
    ("NVML_FI_DEV_POWER_INSTANT", ("power_w", 1e-3)),
    ("NVML_FI_DEV_POWER_CURRENT_LIMIT", ("power_limit_w", 1e-3)),
    ("NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", ("energy_mj", 1.0)),
    ("NVML_FI_DEV_PCIE_REPLAY_COUNTER", ("pcie_replay_count", 1.0)),
    ("NVML_FI_DEV_ECC_SBE_VOL_TOTAL", ("ecc_sbe", 1.0)),
    ("NVML_FI_DEV_ECC_DBE_VOL_TOTAL", ("ecc_dbe", 1.0)),
    ("NVML_FI_DEV_REMAPPED_PENDING", ("remapped_rows_pending", 1.0)),
), lambda p: p[0])

#: Cumulative byte counters -> rate metric (bytes/s over the interval).
RATE_FIELDS: dict[int, str] = _resolve((
    ("NVML_FI_DEV_PCIE_COUNT_TX_BYTES", "pcie_tx_bytes_s"),
    ("NVML_FI_DEV_PCIE_COUNT_RX_BYTES", "pcie_rx_bytes_s"),
), lambda p: p)

_GPM_SPEC = (
    ("NVML_GPM_METRIC_SM_UTIL", "gpm_sm_util_pct"),
    ("NVML_GPM_METRIC_SM_OCCUPANCY", "gpm_sm_occupancy_pct"),
    ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "gpm_tensor_active_pct"),
    ("NVML_GPM_METRIC_DRAM_BW_UTIL", "gpm_dram_bw_util_pct"),
)
#: GPM metric id -> metric name (Hopper and newer). Each is an average over the interval between two GPM
#: samples; samples are taken on slow ticks only, so at the defaults these are 1 s averages (GPM cost
#: 315 µs of driver time per sample + metrics on the live H200).
GPM_METRICS: dict[int, str] = _resolve(_GPM_SPEC, lambda p: p)
#: What GPM needs from pynvml as a whole; without any of these no GPM metric is read.
_GPM_NEEDS = ("nvmlGpmQueryDeviceSupport", "nvmlGpmSampleAlloc", "nvmlGpmSampleGet", "nvmlGpmMetricsGet",
              "nvmlGpmSampleFree", "c_nvmlGpmMetricsGet_t", "NVML_GPM_METRICS_GET_VERSION")

_EVENT_SPEC = (
    ("nvmlEventTypeXidCriticalError", "xid"),
    ("nvmlEventTypeDoubleBitEccError", "ecc_dbe"),
    ("nvmlEventTypeSingleBitEccErrorStorm", "ecc_sbe_storm"),
    ("nvmlEventTypeDramRetirementEvent", "dram_retirement"),
    ("nvmlEventTypeDramRetirementFailure", "dram_retirement_failure"),
    ("nvmlEventTypeFatalPoisonError", "fatal_poison"),
    ("nvmlEventTypeGpuUnavailableError", "gpu_unavailable"),
    ("nvmlEventTypeGpuRecoveryAction", "gpu_recovery_action"),
    ("nvmlEventTypePowerSourceChange", "power_source_change"),
)
#: Event-set types worth an Event (critical or clock-affecting), name used as Event.kind.
EVENT_KINDS: dict[int, str] = {pynvml_attr(n): k for n, k in _EVENT_SPEC if pynvml_attr(n) is not None}
#: "events.<kind>" -> reason, for event types this nvidia-ml-py lacks (reported by NvmlEventWatcher).
EVENTS_ABSENT: dict[str, str] = {f"events.{k}": f"{n}: {NOT_IN_PYNVML}" for n, k in _EVENT_SPEC
                                 if pynvml_attr(n) is None}

GPU_METRICS: tuple[str, ...] = (
    "util_gpu_busy_pct", "util_mem_busy_pct", "mem_used_bytes", "mem_total_bytes",
    "sm_clock_mhz", "sm_clock_max_mhz", "sm_clock_app_mhz", "mem_clock_mhz", "mem_clock_max_mhz",
    "temp_c", "temp_slowdown_c", "temp_margin_c", "power_w", "power_limit_w", "energy_mj",
    "clocks_event_reasons", *(f"throttle_frac_{c[0]}" for c in _THROTTLE_SPEC), "idle_clocks",
    "pcie_tx_bytes_s", "pcie_rx_bytes_s", "pcie_gen", "pcie_gen_max", "pcie_width", "pcie_width_max",
    "pcie_replay_count", "ecc_sbe", "ecc_dbe", "remapped_rows_pending", *(m for _, m in _GPM_SPEC),
)

#: Metrics read only every ``slow_every`` ticks (fields and calls alike), carried forward in between.
SLOW_METRICS: frozenset[str] = frozenset({
    "energy_mj", "power_limit_w", "pcie_replay_count", "ecc_sbe", "ecc_dbe", "remapped_rows_pending",
    "sm_clock_app_mhz", "pcie_gen", "pcie_width",
})
#: Default slow cadence in ticks: 1 Hz at the sampler's default 100 ms period. Link state, limits, ECC
#: and remaps change on a scale of seconds or never; energy is cumulative, so a 1 s old reading of it
#: loses no energy, it only moves the end of the interval it covers.
SLOW_EVERY = 10
#: A cumulative counter field (throttle time of any cause, PCIe TX/RX bytes) whose NVML ``latencyUsec``
#: is at least this is read on slow ticks only. Its delta then covers the real interval between two
#: reads, so no throttled ns or byte is lost; only the time resolution drops to ``slow_every`` ticks.
#: Why 50: on the live H200 (tests/data/nvml/live_h200_e2e_load.jsonl, warm reads) the counters split
#: into cheap ones at 0-2 µs (the SW power/thermal, sync boost, board limit, low utilization and
#: reliability counters) and costly ones at >= 82 µs (PCIe RX 84, TX 145, HW thermal and HW power
#: brake 292 µs median), an order of magnitude either side of 50; and 50 µs at 10 Hz is 0.05% of one
#: core, too little to give up 100 ms resolution for. Instantaneous fields never move: a snapshot
#: read less often is a different reading, not the same one later. A counter NVML returns in fewer
#: than 64 bits (``_WRAP``) stays per tick whatever it costs: see ``_WRAP``.
EXPENSIVE_FIELD_US = 50
#: valueType -> modulus of a counter returned in that many bits. The PCIe TX/RX byte counters come as
#: NVML_VALUE_TYPE_UNSIGNED_INT and wrap every 4.29 GB (the H200 trace's RX counter wraps at 2^32
#: during the run): a delta across one wrap is recovered modulo 2^32, but a second wrap in the same
#: interval is lost without trace. Read every 100 ms that holds up to 42.9 GB/s; read every 1 s, only
#: to 4.29 GB/s, less than an inference host moves over PCIe Gen4/Gen5 x16 under load.
_WRAP: dict[int, int] = {code: mod for code, mod in ((pynvml_attr("NVML_VALUE_TYPE_UNSIGNED_INT"), 1 << 32),
                                                      (pynvml_attr("NVML_VALUE_TYPE_UNSIGNED_SHORT"), 1 << 16))
                         if code is not None}


class _FieldValue(ctypes.Structure):
    """``c_nvmlFieldValue_t`` (same fields, same layout) without pynvml's Python-level
    ``__getattribute__`` (a bytes-to-str shim run on every attribute read): a tick views the returned
    array as these and reads its 4 numbers per field at C speed."""

    _fields_ = pynvml.c_nvmlFieldValue_t._fields_


_SUCCESS = pynvml.NVML_SUCCESS
_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
_NO_PLAN = (None, 0.0, False, ())  # a field id the probe did not ask for: read nothing from it
IMPLAUSIBLE_FRAC = 1.5  # a throttle counter advancing faster than this (s per s) is not believed
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # re-init delays after a failure, then stays at the last


def nvml_error_text(exc: BaseException) -> str:
    """Short, stable text for an error: the NVML name (``Not Supported``) or the exception type."""
    if isinstance(exc, pynvml.NVMLError):
        try:
            return str(exc)
        except Exception:  # str() may call into a library that is not there
            return f"NVML error {getattr(exc, 'value', '?')}"
    return f"{type(exc).__name__}: {exc}"


def _unsupported(exc: BaseException) -> bool:
    return isinstance(exc, pynvml.NVMLError) and getattr(exc, "value", None) in _UNSUPPORTED


# A reader returns a dict of metric -> value. Each entry: (name for reasons, metrics it can give, fn).
_Reader = tuple[str, tuple[str, ...], Callable[[object, object], dict[str, float]]]


#: pynvml constants each reader passes (its function is the name before "("): a reader whose function
#: or constant this nvidia-ml-py lacks is never called, and its metrics say why.
_READER_CONSTS: dict[str, tuple[str, ...]] = {
    "nvmlDeviceGetClockInfo(SM)": ("NVML_CLOCK_SM",),
    "nvmlDeviceGetClockInfo(MEM)": ("NVML_CLOCK_MEM",),
    "nvmlDeviceGetApplicationsClock(SM)": ("NVML_CLOCK_SM",),
    "nvmlDeviceGetTemperature": ("NVML_TEMPERATURE_GPU",),
    "nvmlDeviceGetTotalEccErrors": ("NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED",
                                    "NVML_VOLATILE_ECC"),
    "nvmlDeviceGetPcieThroughput": ("NVML_PCIE_UTIL_TX_BYTES", "NVML_PCIE_UTIL_RX_BYTES"),
    "nvmlDeviceGetMaxClockInfo(SM)": ("NVML_CLOCK_SM",),
    "nvmlDeviceGetMaxClockInfo(MEM)": ("NVML_CLOCK_MEM",),
    "nvmlDeviceGetTemperatureThreshold(SLOWDOWN)": ("NVML_TEMPERATURE_THRESHOLD_SLOWDOWN",),
}


def lacking(names) -> list[str]:
    """The pynvml names (functions, constants, structs) among ``names`` this nvidia-ml-py lacks."""
    return [n for n in names if not hasattr(pynvml, n)]


def _call_readers() -> list[_Reader]:
    """Per-tick calls, in order of preference; a later reader only runs for metrics not yet covered."""
    P = pynvml

    def util(api, h):
        u = api.nvmlDeviceGetUtilizationRates(h)
        return {"util_gpu_busy_pct": float(u.gpu), "util_mem_busy_pct": float(u.memory)}

    def mem(api, h):
        m = api.nvmlDeviceGetMemoryInfo(h)
        return {"mem_used_bytes": float(m.used), "mem_total_bytes": float(m.total)}

    def reasons(api, h):
        return {"clocks_event_reasons": float(api.nvmlDeviceGetCurrentClocksEventReasons(h))}

    def reasons_old(api, h):  # drivers before the clocks-event rename
        return {"clocks_event_reasons": float(api.nvmlDeviceGetCurrentClocksThrottleReasons(h))}

    def ecc(api, h):
        return {
            "ecc_sbe": float(api.nvmlDeviceGetTotalEccErrors(h, P.NVML_MEMORY_ERROR_TYPE_CORRECTED, P.NVML_VOLATILE_ECC)),
            "ecc_dbe": float(api.nvmlDeviceGetTotalEccErrors(h, P.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, P.NVML_VOLATILE_ECC)),
        }

    def pcie_tp(api, h):  # KB/s over NVML's own 20 ms window (each call waits for it): fallback only
        return {
            "pcie_tx_bytes_s": 1024.0 * api.nvmlDeviceGetPcieThroughput(h, P.NVML_PCIE_UTIL_TX_BYTES),
            "pcie_rx_bytes_s": 1024.0 * api.nvmlDeviceGetPcieThroughput(h, P.NVML_PCIE_UTIL_RX_BYTES),
        }

    return [
        ("nvmlDeviceGetUtilizationRates", ("util_gpu_busy_pct", "util_mem_busy_pct"), util),
        ("nvmlDeviceGetMemoryInfo", ("mem_used_bytes", "mem_total_bytes"), mem),
        ("nvmlDeviceGetClockInfo(SM)", ("sm_clock_mhz",),
         lambda api, h: {"sm_clock_mhz": float(api.nvmlDeviceGetClockInfo(h, P.NVML_CLOCK_SM))}),
        ("nvmlDeviceGetClockInfo(MEM)", ("mem_clock_mhz",),
         lambda api, h: {"mem_clock_mhz": float(api.nvmlDeviceGetClockInfo(h, P.NVML_CLOCK_MEM))}),
        ("nvmlDeviceGetApplicationsClock(SM)", ("sm_clock_app_mhz",),
         lambda api, h: {"sm_clock_app_mhz": float(api.nvmlDeviceGetApplicationsClock(h, P.NVML_CLOCK_SM))}),
        ("nvmlDeviceGetTemperature", ("temp_c",),
         lambda api, h: {"temp_c": float(api.nvmlDeviceGetTemperature(h, P.NVML_TEMPERATURE_GPU))}),
        ("nvmlDeviceGetCurrentClocksEventReasons", ("clocks_event_reasons",), reasons),
        ("nvmlDeviceGetCurrentClocksThrottleReasons", ("clocks_event_reasons",), reasons_old),
        ("nvmlDeviceGetCurrPcieLinkGeneration", ("pcie_gen",),
         lambda api, h: {"pcie_gen": float(api.nvmlDeviceGetCurrPcieLinkGeneration(h))}),
        ("nvmlDeviceGetCurrPcieLinkWidth", ("pcie_width",),
         lambda api, h: {"pcie_width": float(api.nvmlDeviceGetCurrPcieLinkWidth(h))}),
        # Fallbacks for metrics the fields batch normally gives.
        ("nvmlDeviceGetPowerUsage", ("power_w",),
         lambda api, h: {"power_w": api.nvmlDeviceGetPowerUsage(h) / 1000.0}),
        ("nvmlDeviceGetEnforcedPowerLimit", ("power_limit_w",),
         lambda api, h: {"power_limit_w": api.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0}),
        ("nvmlDeviceGetTotalEnergyConsumption", ("energy_mj",),
         lambda api, h: {"energy_mj": float(api.nvmlDeviceGetTotalEnergyConsumption(h))}),
        ("nvmlDeviceGetPcieReplayCounter", ("pcie_replay_count",),
         lambda api, h: {"pcie_replay_count": float(api.nvmlDeviceGetPcieReplayCounter(h))}),
        ("nvmlDeviceGetTotalEccErrors", ("ecc_sbe", "ecc_dbe"), ecc),
        ("nvmlDeviceGetRemappedRows", ("remapped_rows_pending",),
         lambda api, h: {"remapped_rows_pending": float(api.nvmlDeviceGetRemappedRows(h)[2])}),
        ("nvmlDeviceGetPcieThroughput", ("pcie_tx_bytes_s", "pcie_rx_bytes_s"), pcie_tp),
    ]


def _static_readers() -> list[_Reader]:
    """Values that do not change while the driver is loaded: read at probe time only."""
    P = pynvml
    return [
        ("nvmlDeviceGetMaxClockInfo(SM)", ("sm_clock_max_mhz",),
         lambda api, h: {"sm_clock_max_mhz": float(api.nvmlDeviceGetMaxClockInfo(h, P.NVML_CLOCK_SM))}),
        ("nvmlDeviceGetMaxClockInfo(MEM)", ("mem_clock_max_mhz",),
         lambda api, h: {"mem_clock_max_mhz": float(api.nvmlDeviceGetMaxClockInfo(h, P.NVML_CLOCK_MEM))}),
        ("nvmlDeviceGetTemperatureThreshold(SLOWDOWN)", ("temp_slowdown_c",),
         lambda api, h: {"temp_slowdown_c": float(
             api.nvmlDeviceGetTemperatureThreshold(h, P.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))}),
        ("nvmlDeviceGetMaxPcieLinkGeneration", ("pcie_gen_max",),
         lambda api, h: {"pcie_gen_max": float(api.nvmlDeviceGetMaxPcieLinkGeneration(h))}),
        ("nvmlDeviceGetMaxPcieLinkWidth", ("pcie_width_max",),
         lambda api, h: {"pcie_width_max": float(api.nvmlDeviceGetMaxPcieLinkWidth(h))}),
    ]


@dataclass
class _Device:
    """What the probe found for one GPU, plus the previous counter readings for the deltas."""

    index: int
    handle: object
    info: dict[str, str] = field(default_factory=dict)
    fields: list[int] = field(default_factory=list)          # ids read by the batched call(s), probe order
    fast_ids: list[int] = field(default_factory=list)        # fields read every tick (set by init)
    slow_ids: list[int] = field(default_factory=list)        # fields read on slow ticks only
    counter_field: dict[str, int] = field(default_factory=dict)  # cause -> chosen counter field id
    violation: dict[str, int] = field(default_factory=dict)   # cause -> policy read by ViolationStatus
    readers: list[_Reader] = field(default_factory=list)
    # Per-tick plans, built by init from the above so that a tick only looks things up (see _plan).
    field_plan: dict[int, tuple[str | None, float, bool, tuple[str, ...]]] = field(default_factory=dict)
    reader_plan: list[tuple[Callable, bool]] = field(default_factory=list)  # (fn, slow) in reader order
    violation_plan: list[tuple[str, int]] = field(default_factory=list)      # (metric, policy)
    bit_plan: list[tuple[str, int]] = field(default_factory=list)            # (metric, bit) from the bitmask
    slow: dict[str, float] = field(default_factory=dict)      # last slow-tick values, carried forward
    static: dict[str, float] = field(default_factory=dict)
    gpm_samples: list = field(default_factory=list)           # [previous, current] when GPM works
    gpm_have_prev: bool = False
    latency_us: dict[int, int] = field(default_factory=dict)  # field id -> NVML latencyUsec (see _plan)
    wrap: dict[int, int] = field(default_factory=dict)        # field id -> modulus of a narrow counter (_WRAP)
    counter_wrap: dict[str, int] = field(default_factory=dict)  # counter metric -> modulus, for its deltas
    priced: bool = False                                      # latency_us is set (by the first read)
    field_latency_us: dict[str, int] = field(default_factory=dict)  # metric -> latency_us of its field
    cadence: dict[str, str] = field(default_factory=dict)     # metric -> why it is not read every tick
    prev_counter: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (value, time s)
    supported: dict[str, str] = field(default_factory=dict)   # metric -> where it comes from
    missing: dict[str, str] = field(default_factory=dict)     # metric -> why not


def _trace_header(api) -> dict:
    """The trace header of a replay (``header``) or recording (``lines[0]``) API, else {}."""
    header = getattr(api, "header", None)
    if not isinstance(header, dict):
        lines = getattr(api, "lines", None)
        header = lines[0] if isinstance(lines, list) and lines and isinstance(lines[0], dict) else {}
    return header


class NvmlBackend:
    """Samples every GPU NVML sees. Not thread-safe: one thread calls ``tick()``.

    api: the nvml API object (the ``pynvml`` module, or a recording/replay object with its functions).
    clock: monotonic ns; defaults to ``api.clock`` when the API has one (replay), else ``now_ns``.
    slow_every: read ``SLOW_METRICS``, the costly cumulative counters and GPM every this many ticks (1:
    every tick, all fields in one call; see the module docstring).
    Default: ``SLOW_EVERY`` on the live ``pynvml``; on any other API the ``slow_every`` its trace header
    names (``ReplayNvml.header``, ``RecordingNvml.lines[0]``), else 1. A replay must make the calls the
    trace recorded (it matches each call by function and arguments), and every trace made before the
    two cadences, and every check comparing a simulator run with its recording, read all fields in one
    call every tick.
    """

    def __init__(self, api=pynvml, clock: Callable[[], int] | None = None, slow_every: int | None = None):
        self.api = api
        if slow_every is None:
            slow_every = SLOW_EVERY if api is pynvml else int(_trace_header(api).get("slow_every", 1))
        if slow_every < 1:
            raise ValueError(f"NvmlBackend: slow_every must be >= 1 tick, got {slow_every}")
        self.slow_every = slow_every
        self._n_read = 0             # good reads since the last (re-)init: slow when n % slow_every == 0
        self.clock = clock or getattr(api, "clock", None) or now_ns
        # recording/replay hook returning the tick's time; absent on pynvml
        self._mark_tick = getattr(api, "mark_tick", None)
        self.devices: list[_Device] = []
        self.healthy = False
        self.failures = 0            # consecutive failed ticks or inits
        self.next_retry_ns = 0
        self.last_good_ns: int | None = None
        self.started_ns = self.clock()
        self.error: str | None = None
        self.events: list[Event] = []  # produced by tick(): errors, recoveries; drained by the caller
        self.n_sources = 0           # sources seen at the last good probe, for stale samples

    # -- lifecycle -------------------------------------------------------------------------------
    def init(self) -> None:
        """nvmlInit and probe every device. Raises the NVML error when the driver is not usable."""
        self.api.nvmlInit()
        n = self.api.nvmlDeviceGetCount()
        devices = [self._probe(i) for i in range(n)]
        for d in devices:
            self._plan(d)
        self.devices = devices
        self._n_read = 0  # the first tick after a (re-)init reads the slow set: no carried value predates it
        self.n_sources = n
        self.healthy = True

    def _plan(self, d: _Device) -> None:
        """What each tick reads and where each value goes, decided once per probe (and once more after
        the first read, whose field latencies price the cadence: see ``_read``) so that a tick only
        looks things up."""
        split = self.slow_every > 1
        counters = {fid: tuple(([RATE_FIELDS[fid]] if fid in RATE_FIELDS else []) + [
            f"throttle_frac_{cause}" for cause, cfid in d.counter_field.items() if cfid == fid]) for fid in d.fields}
        costly = {f for f in d.fields if counters[f] and d.latency_us.get(f, 0) >= EXPENSIVE_FIELD_US}
        narrow = {f for f in costly if d.wrap.get(f)}
        costly -= narrow
        d.counter_wrap = {m: d.wrap[f] for f in d.fields if d.wrap.get(f) for m in counters[f]}
        slow = {f for f in d.fields if split and (GAUGE_FIELDS.get(f, ("",))[0] in SLOW_METRICS or f in costly)}
        d.fast_ids = [f for f in d.fields if f not in slow]
        d.slow_ids = [f for f in d.fields if f in slow]
        for fid in d.fields:
            gauge, scale = GAUGE_FIELDS.get(fid, (None, 0.0))
            d.field_plan[fid] = (gauge, scale, fid in slow, counters[fid])
        d.field_latency_us = {m: d.latency_us[fid] for fid in d.fields if fid in d.latency_us
                              for m in ((GAUGE_FIELDS[fid][0],) if fid in GAUGE_FIELDS else ()) + counters[fid]}
        d.reader_plan = [(fn, split and all(m in SLOW_METRICS for m in metrics)) for _, metrics, fn in d.readers]
        d.cadence = {}
        if split:
            every = f"every {self.slow_every} ticks"
            for m in SLOW_METRICS & d.supported.keys():
                d.cadence[m] = f"{every}: slow-changing or cumulative, carried forward in between"
            for fid in sorted(costly):
                for m in counters[fid]:
                    d.cadence[m] = (f"{every}: cumulative field {fid} took {d.latency_us[fid]} us in NVML at the first read "
                                    f"(>= {EXPENSIVE_FIELD_US}); each value covers the real interval since the "
                                    "previous read, absent in between")
            for fid in sorted(narrow):
                for m in counters[fid]:
                    d.cadence[m] = (f"every tick although field {fid} took {d.latency_us[fid]} us at the first read: "
                                    f"a {d.wrap[fid].bit_length() - 1}-bit counter, read each tick so that a "
                                    "wrap is seen")
            if d.gpm_samples:
                for m in GPM_METRICS.values():
                    d.cadence[m] = (f"{every}: GPM averages over the interval between two GPM samples, taken on "
                                    "slow ticks; absent in between")
        d.violation_plan = [(f"throttle_frac_{cause}", policy) for cause, policy in d.violation.items()]
        d.bit_plan = [(m, bit) for m, bit in ((f"throttle_frac_{cause}", bit) for cause, *_, bit in THROTTLE_CAUSES)
                      if bit is not None and "bit" in d.supported.get(m, "")]

    def shutdown(self) -> None:
        self._free_gpm()
        try:
            self.api.nvmlShutdown()
        except Exception:  # already gone, or never initialised: nothing left to release
            pass
        self.healthy = False

    def capabilities(self) -> dict:
        """{source: {"info": {...}, "supported": {metric: via}, "missing": {metric: reason},
        "cadence": {metric: why}, "field_latency_us": {metric: us}}}.

        ``cadence`` names each metric NOT read every tick (every other supported metric is) and why,
        and each costly counter kept per tick all the same (a narrow one that wraps, see ``_WRAP``);
        ``field_latency_us`` is NVML's ``latencyUsec`` for each metric read through the fields call, from
        the first read after the probe (the one that priced the cadence).
        """
        return {f"gpu{d.index}": {"info": d.info, "supported": dict(d.supported), "missing": dict(d.missing),
                                  "cadence": dict(d.cadence), "field_latency_us": dict(d.field_latency_us)}
                for d in self.devices}

    def missing(self) -> dict[str, str]:
        """Flat ``{"gpu0.metric": reason}``; a backend that never initialised reports why."""
        if not self.devices and self.error:
            return {"gpu": self.error}
        return {f"gpu{d.index}.{m}": r for d in self.devices for m, r in d.missing.items()}

    # -- probing ---------------------------------------------------------------------------------
    def _probe(self, index: int) -> _Device:
        api = self.api
        h = api.nvmlDeviceGetHandleByIndex(index)
        dev = _Device(index=index, handle=h)
        for key, fn in (("name", api.nvmlDeviceGetName), ("uuid", api.nvmlDeviceGetUUID)):
            try:
                v = fn(h)
                dev.info[key] = v.decode() if isinstance(v, bytes) else str(v)
            except pynvml.NVMLError as exc:
                if not _unsupported(exc):
                    raise
        try:
            v = api.nvmlSystemGetDriverVersion()
            dev.info["driver"] = v.decode() if isinstance(v, bytes) else str(v)
        except pynvml.NVMLError as exc:
            if not _unsupported(exc):
                raise

        covered: dict[str, str] = {}
        # Names this nvidia-ml-py lacks come first in a metric's reason; what is tried later is appended.
        reasons: dict[str, str] = {m: "; ".join(why) for m, why in ABSENT.items()}

        # 1. One batched call over every candidate field; keep the ids that answered.
        candidates = list(GAUGE_FIELDS) + list(RATE_FIELDS)
        for _, ids, _, _ in THROTTLE_CAUSES:
            candidates += [i for i in ids if i not in candidates]
        ok_ids: set[int] = set()
        try:
            if lacking(("nvmlDeviceGetFieldValues",)):
                for fid in candidates:
                    reasons[f"field{fid}"] = f"nvmlDeviceGetFieldValues: {NOT_IN_PYNVML}"
                candidates = []
            for fv in (api.nvmlDeviceGetFieldValues(h, candidates) if candidates else ()):
                if fv.nvmlReturn == pynvml.NVML_SUCCESS:
                    ok_ids.add(int(fv.fieldId))
                    dev.wrap[int(fv.fieldId)] = _WRAP.get(int(fv.valueType), 0)
                elif fv.nvmlReturn == pynvml.NVML_ERROR_GPU_IS_LOST:
                    raise pynvml.NVMLError(fv.nvmlReturn)
                else:
                    reasons[f"field{int(fv.fieldId)}"] = nvml_error_text(pynvml.NVMLError(fv.nvmlReturn))
        except pynvml.NVMLError as exc:
            if not _unsupported(exc):
                raise
            for fid in candidates:
                reasons[f"field{fid}"] = "nvmlDeviceGetFieldValues: " + nvml_error_text(exc)
        for fid, (metric, _) in GAUGE_FIELDS.items():
            if fid in ok_ids:
                dev.fields.append(fid)
                covered[metric] = f"field {fid}"
            else:
                reasons[metric] = f"field {fid}: {reasons.get(f'field{fid}', '?')}"
        for fid, metric in RATE_FIELDS.items():
            if fid in ok_ids:
                dev.fields.append(fid)
                covered[metric] = f"field {fid} (counter)"
            else:
                reasons[metric] = f"field {fid}: {reasons.get(f'field{fid}', '?')}"

        # 2. Throttle-time counters: field, else nvmlDeviceGetViolationStatus, else (later) the bitmask.
        for cause, ids, policy, _ in THROTTLE_CAUSES:
            metric = f"throttle_frac_{cause}"
            chosen = next((i for i in ids if i in ok_ids), None)
            if chosen is not None:
                dev.counter_field[cause] = chosen
                if chosen not in dev.fields:
                    dev.fields.append(chosen)
                covered[metric] = f"field {chosen} (counter)"
                continue
            why = "; ".join([*ABSENT.get(metric, ()), *(f"field {i}: {reasons.get(f'field{i}', '?')}" for i in ids)])
            why = why or "no counter in NVML"
            if policy is not None and lacking(("nvmlDeviceGetViolationStatus",)):
                why += f"; nvmlDeviceGetViolationStatus: {NOT_IN_PYNVML}"
            elif policy is not None:
                try:
                    api.nvmlDeviceGetViolationStatus(h, policy)
                    dev.violation[cause] = policy
                    covered[metric] = "nvmlDeviceGetViolationStatus (counter)"
                    continue
                except pynvml.NVMLError as exc:
                    if not _unsupported(exc):
                        raise
                    why += f"; nvmlDeviceGetViolationStatus: {nvml_error_text(exc)}"
            reasons[metric] = why

        # 3. Per-tick calls (with fallbacks) and static values.
        readers = [(r, False) for r in _call_readers()] + [(r, True) for r in _static_readers()]
        for (name, metrics, fn), static in readers:
            if all(m in covered for m in metrics):
                continue
            absent = lacking((name.split("(")[0], *_READER_CONSTS.get(name, ())))
            if absent:
                for m in metrics:
                    reasons.setdefault(m, "")
                    reasons[m] = (reasons[m] + "; " if reasons[m] else "") + f"{name}: {', '.join(absent)} {NOT_IN_PYNVML}"
                continue
            try:
                values = fn(api, h)
            except pynvml.NVMLError as exc:
                if not _unsupported(exc):
                    raise
                for m in metrics:
                    reasons.setdefault(m, "")
                    reasons[m] = (reasons[m] + "; " if reasons[m] else "") + f"{name}: {nvml_error_text(exc)}"
                continue
            for m in metrics:
                covered[m] = name
            if static:
                dev.static.update(values)
            else:
                dev.readers.append((name, metrics, fn))

        # 4. Throttle causes without any counter fall back to the clocks-event bitmask snapshot.
        for cause, _, _, bit in THROTTLE_CAUSES:
            metric = f"throttle_frac_{cause}"
            if metric not in covered and "clocks_event_reasons" in covered and bit is not None:
                covered[metric] = "clocks_event_reasons bit (snapshot; can miss short episodes)"
        if "clocks_event_reasons" in covered and _IDLE_BIT is not None:
            covered["idle_clocks"] = "clocks_event_reasons GpuIdle bit"
        elif "clocks_event_reasons" not in covered:
            reasons["idle_clocks"] = "; ".join(
                [*ABSENT.get("idle_clocks", ()), "needs clocks_event_reasons: " + reasons.get("clocks_event_reasons", "?")])
        if "temp_c" in covered and "temp_slowdown_c" in covered:
            covered["temp_margin_c"] = "temp_slowdown_c - temp_c"
        else:
            reasons["temp_margin_c"] = "needs temp_c and temp_slowdown_c"

        # 5. GPM (Hopper+): device support, then two sample buffers that alternate.
        gpm_absent = lacking(_GPM_NEEDS)
        try:
            if gpm_absent:
                for m in GPM_METRICS.values():
                    reasons[m] = f"GPM: {', '.join(gpm_absent)} {NOT_IN_PYNVML}"
            elif not GPM_METRICS:
                pass  # every metric id is absent: ABSENT already says so for each
            elif api.nvmlGpmQueryDeviceSupport(h).isSupportedDevice:
                dev.gpm_samples = [api.nvmlGpmSampleAlloc(), api.nvmlGpmSampleAlloc()]
                for m in GPM_METRICS.values():
                    covered[m] = "nvmlGpmMetricsGet"
            else:
                for m in GPM_METRICS.values():
                    reasons[m] = "nvmlGpmQueryDeviceSupport: device not supported (needs Hopper or newer)"
        except pynvml.NVMLError as exc:
            if not _unsupported(exc):
                raise
            for m in GPM_METRICS.values():
                reasons[m] = f"nvmlGpmQueryDeviceSupport: {nvml_error_text(exc)}"

        if self.slow_every > 1:
            for m in SLOW_METRICS & covered.keys():
                covered[m] += f"; every {self.slow_every} ticks, carried forward in between"
        dev.supported = {m: covered[m] for m in GPU_METRICS if m in covered}
        dev.missing = {m: reasons.get(m, "not probed") for m in GPU_METRICS if m not in covered}
        return dev

    def _free_gpm(self) -> None:
        for d in self.devices:
            for s in d.gpm_samples:
                try:
                    self.api.nvmlGpmSampleFree(s)
                except Exception:  # the driver may be gone; the buffer goes with it
                    pass
            d.gpm_samples = []

    # -- sampling --------------------------------------------------------------------------------
    def tick(self) -> list[Sample]:
        """One reading per GPU (or stale markers). Never raises an NVML error.

        All values of a tick carry its start time; counter deltas use it too, so a replay, whose clock
        is the recorded tick time, reproduces the live rates exactly.
        """
        now = self._mark_tick() if self._mark_tick is not None else self.clock()
        if not self.healthy:
            if now < self.next_retry_ns:
                return self._stale(now)
            try:
                if self.devices or self.error:  # a re-init after a failure: release what is left first
                    self.shutdown()
                self.init()
            except Exception as exc:
                self._fail(now, exc, during="init")
                return self._stale(now)
            if self.failures:
                self.events.append(Event(now, "gpu", "sampler_recovered", float(self.failures), "nvml re-initialised"))
            self.failures = 0
            self.error = None
        try:
            slow = self._n_read % self.slow_every == 0
            raw = [self._read(d, now, slow) for d in self.devices]
            self._n_read += 1
        except Exception as exc:  # lost GPU, unknown error, a replay that ended: never past this point
            self._fail(now, exc, during="tick")
            return self._stale(now)
        self.last_good_ns = now
        out = []
        for d, values in zip(self.devices, raw, strict=True):
            values["stale_age_s"] = 0.0
            out.append(Sample(now, f"gpu{d.index}", values))
        return out

    def _fail(self, now: int, exc: BaseException, during: str) -> None:
        self.healthy = False
        self.error = f"{during}: {nvml_error_text(exc)}"
        delay = BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
        self.failures += 1
        self.next_retry_ns = now + int(delay * 1e9)
        lost = isinstance(exc, pynvml.NVMLError) and getattr(exc, "value", None) == pynvml.NVML_ERROR_GPU_IS_LOST
        self.events.append(Event(now, "gpu", "gpu_lost" if lost else "sampler_error", float(self.failures),
                                 f"{self.error}; retry in {delay:g} s"))

    def _stale(self, now: int) -> list[Sample]:
        since = self.last_good_ns if self.last_good_ns is not None else self.started_ns
        age = max(0.0, (now - since) / 1e9)
        return [Sample(now, f"gpu{i}", {"stale_age_s": age}) for i in range(self.n_sources)]

    def _read(self, d: _Device, now_ns: int, slow: bool) -> dict[str, float]:
        api, h = self.api, d.handle
        v: dict[str, float] = dict(d.static)
        t_s = now_ns / 1e9
        counters: dict[str, float] = {}
        fresh_slow: dict[str, float] = {}
        plan = d.field_plan
        pricing = [] if not d.priced else None
        for ids in (d.fast_ids, d.slow_ids if slow else []):
            if not ids:
                continue
            values = api.nvmlDeviceGetFieldValues(h, ids)
            fvs = (_FieldValue * len(values)).from_buffer(values)
            if pricing is not None:
                pricing.append(fvs)
            for fv in fvs:
                rc = fv.nvmlReturn
                if rc != _SUCCESS:
                    if rc == _GPU_IS_LOST:
                        raise pynvml.NVMLError(rc)
                    continue  # missing this tick, never a fake value
                gauge, scale, gauge_slow, counter_metrics = plan.get(int(fv.fieldId), _NO_PLAN)
                x = float(getattr(fv.value, _VALUE_ATTR.get(fv.valueType, "ullVal")))
                if gauge is not None:
                    (fresh_slow if gauge_slow else v)[gauge] = x * scale
                for m in counter_metrics:
                    counters[m] = x
        for m, policy in d.violation_plan:
            counters[m] = float(api.nvmlDeviceGetViolationStatus(h, policy).violationTime)
        for fn, is_slow in d.reader_plan:
            if not is_slow:
                for m, x in fn(api, h).items():
                    v.setdefault(m, x)
            elif slow:
                for m, x in fn(api, h).items():
                    fresh_slow.setdefault(m, x)
        if slow:
            d.slow = fresh_slow  # replaced, not merged: a reading that failed now is not carried from before
        for m, x in d.slow.items():
            v.setdefault(m, x)

        # Counter deltas: throttle counters are ns of throttled time, byte counters are bytes.
        for metric, x in counters.items():
            prev = d.prev_counter.get(metric)
            d.prev_counter[metric] = (x, t_s)
            if prev is None or t_s <= prev[1]:
                continue  # first reading: no interval to report
            if x < prev[0]:
                if not d.counter_wrap.get(metric):
                    continue  # a counter reset: no interval to report
                x += d.counter_wrap[metric]  # a narrow counter wrapped (once: see _WRAP)
            dt = t_s - prev[1]
            if metric.startswith("throttle_frac_"):
                frac = (x - prev[0]) / 1e9 / dt
                if frac > IMPLAUSIBLE_FRAC:
                    # More throttled time than wall time: wrong unit or a field id this driver numbers
                    # differently (the ids moved between nvidia-ml-py releases). Drop it, say why.
                    d.missing[metric] = f"implausible counter ({frac:.3g} s throttled per s): such readings dropped"
                    continue
                v[metric] = min(1.0, frac)  # small overshoot: NVML updates the counter on its own cadence
            else:
                v[metric] = (x - prev[0]) / dt

        bits = v.get("clocks_event_reasons")
        if bits is not None:
            b = int(bits)
            if _IDLE_BIT is not None:
                v["idle_clocks"] = 1.0 if b & _IDLE_BIT else 0.0
            for m, bit in d.bit_plan:
                v[m] = 1.0 if b & bit else 0.0
        if "temp_c" in v and "temp_slowdown_c" in v:
            v["temp_margin_c"] = v["temp_slowdown_c"] - v["temp_c"]
        if d.gpm_samples and slow:
            v.update(self._read_gpm(d))
        if pricing is not None:
            # The probe's call is cold: on the live H200 it gave 109 us for counters that then take 0-2 us,
            # 5.5 ms for instant power (then 5 us). This first read after it reads every field (a slow
            # tick), warm: its latencies set the cadence from the next tick on.
            ok = [fv for fvs in pricing for fv in fvs if fv.nvmlReturn == _SUCCESS]
            d.latency_us = {int(fv.fieldId): int(fv.latencyUsec) for fv in ok}
            d.priced = True
            self._plan(d)
        return v

    def _read_gpm(self, d: _Device) -> dict[str, float]:
        prev, cur = d.gpm_samples
        self.api.nvmlGpmSampleGet(d.handle, cur)
        out: dict[str, float] = {}
        if d.gpm_have_prev:
            mg = pynvml.c_nvmlGpmMetricsGet_t()
            mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = len(GPM_METRICS)
            mg.sample1, mg.sample2 = prev, cur
            metrics = mg.metrics  # each attribute read of a pynvml struct is a Python call
            for i, mid in enumerate(GPM_METRICS):
                metrics[i].metricId = mid
            metrics = self.api.nvmlGpmMetricsGet(mg).metrics
            for i in range(len(GPM_METRICS)):
                m = metrics[i]
                name = GPM_METRICS.get(int(m.metricId))
                if name is not None and m.nvmlReturn == _SUCCESS:
                    out[name] = float(m.value)
        d.gpm_samples = [cur, prev]
        d.gpm_have_prev = True
        return out

    def drain_events(self) -> list[Event]:
        ev, self.events = self.events, []
        return ev


class NvmlEventWatcher:
    """Xid and other critical NVML events through event sets, one per GPU, waited on with a timeout.

    ``poll(timeout_ms)`` waits on each device's set in turn and returns the events seen; the sampler
    calls it in a loop on its own daemon thread. Errors other than the timeout are returned as a
    ``sampler_error`` Event and make the next poll re-create the sets.
    """

    def __init__(self, api=pynvml, clock: Callable[[], int] | None = None):
        self.api = api
        self.clock = clock or getattr(api, "clock", None) or now_ns
        self.sets: list[tuple[int, object]] = []
        self.missing: dict[str, str] = dict(EVENTS_ABSENT)
        self.ready = False
        # nvmlEventSetWait_v2 came later; the older call has the same arguments and result.
        self._wait_fn = next((n for n in ("nvmlEventSetWait_v2", "nvmlEventSetWait") if not lacking((n,))), None)

    def setup(self) -> None:
        api = self.api
        api.nvmlInit()  # reference-counted by NVML: pairs with the nvmlShutdown in close()
        self.ready = True
        absent = lacking(("nvmlDeviceGetSupportedEventTypes", "nvmlEventSetCreate", "nvmlDeviceRegisterEvents"))
        if self._wait_fn is None:
            absent.append("nvmlEventSetWait_v2/nvmlEventSetWait")
        if absent or not EVENT_KINDS:
            self.missing["events"] = f"{', '.join(absent) or 'every event type'}: {NOT_IN_PYNVML}"
            return
        for i in range(api.nvmlDeviceGetCount()):
            h = api.nvmlDeviceGetHandleByIndex(i)
            try:
                mask = api.nvmlDeviceGetSupportedEventTypes(h)
                wanted = 0
                for bit in EVENT_KINDS:
                    wanted |= bit
                mask &= wanted
                if not mask:
                    self.missing[f"gpu{i}.events"] = "no critical event type supported"
                    continue
                es = api.nvmlEventSetCreate()
                api.nvmlDeviceRegisterEvents(h, mask, es)
                self.sets.append((i, es))
            except pynvml.NVMLError as exc:
                if not _unsupported(exc):
                    raise
                self.missing[f"gpu{i}.events"] = nvml_error_text(exc)

    def close(self) -> None:
        for _, es in self.sets:
            try:
                self.api.nvmlEventSetFree(es)
            except Exception:  # the driver may be gone already
                pass
        self.sets = []
        if self.ready:
            try:
                self.api.nvmlShutdown()
            except Exception:
                pass
        self.ready = False

    def poll(self, timeout_ms: int = 500) -> list[Event]:
        if not self.ready:
            self.setup()
        if not self.sets:
            return []
        out = []
        per_set = max(1, timeout_ms // len(self.sets))
        for i, es in self.sets:
            try:
                data = getattr(self.api, self._wait_fn)(es, per_set)
            except pynvml.NVMLError as exc:
                if getattr(exc, "value", None) == pynvml.NVML_ERROR_TIMEOUT:
                    continue
                raise
            etype = int(data.eventType)
            kind = next((k for bit, k in EVENT_KINDS.items() if etype & bit), f"event_0x{etype:x}")
            out.append(Event(self.clock(), f"gpu{i}", kind, float(data.eventData), f"eventType=0x{etype:x}"))
        return out


def thread_cpu_s() -> float:
    """CPU seconds used by the calling thread (user + system)."""
    return time.thread_time()


def handle_key(handle) -> int | None:
    """Address behind a ctypes device handle, used to name handles in traces; None for non-ctypes."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None
