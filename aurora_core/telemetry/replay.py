"""Record NVML traces on a real GPU, replay them through the live code path, and synthesise them.

Trace format (JSON Lines, one object per line, UTF-8):

* line 1, the header: ``{"format": "aurora-nvml-trace", "version": 1, "source": "live" | "synthetic:<kind>",
  "host": ..., "created_wall": ISO-8601, "pynvml": version, "period_s": float, ...}``;
* a tick marker, written when the sampler starts a reading: ``{"t_ns": int, "tick": 1}``;
* one line per NVML call, in call order: ``{"t_ns": int, "dur_ns": int, "fn": "nvmlDeviceGetUtilizationRates",
  "args": [...], "ret": <value>}`` or, when the call raised, ``"err": <NVML return code>`` instead of
  ``"ret"``. ``t_ns`` is monotonic ns since the trace started, taken when the call returned.

Values are plain JSON where they can be; ctypes results are tagged objects so replay can rebuild the
very structs ``pynvml`` returns: ``{"s": "c_nvmlMemory_t", "f": {...fields}}`` for a struct,
``{"u": "c_nvmlValue_t", "raw": uint64}`` for the value union (its 8 raw bytes), ``{"a": [...]}`` for an
array (field values), ``{"h": i}`` for the handle of GPU i, ``{"o": "<type>"}`` for an opaque pointer
(event set, GPM sample), ``{"gpm": [[metricId, nvmlReturn, value], ...]}`` for nvmlGpmMetricsGet.

``ReplayNvml`` exposes the same functions as ``pynvml``. Each call pops the next recorded entry with the
same function and arguments and returns the rebuilt value or raises ``pynvml.NVMLError(code)``, so
``NvmlBackend`` runs unchanged. A function the trace never saw raises NVMLError_FunctionNotFound (it is
then recorded as missing); a function whose entries are used up raises ``ReplayExhausted``.
The replay clock is the time of the current tick marker, mapped onto ``base_ns``; the backend stamps
samples and computes counter rates with the tick time in both live and replayed runs.

``TickReplayNvml`` answers each call from the current tick's recorded answers, decoded once, whatever
the order or the set of field ids asked for: ``benchmarks/bench_telemetry.py --replay`` times the
backend's Python on it at the live slow cadence, from a trace recorded with every field each tick.

``make_synthetic_trace`` produces traces with throttle episodes by running the same backend against
``SimulatedNvml``, a small GPU model, through the recorder. The committed files in tests/data/nvml/ are
made by ``python -m aurora_core.telemetry.replay tests/data/nvml`` (see ``write_test_traces``).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import socket
import sys
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable

import pynvml

from aurora_core.records import Event, Sample, now_ns
from aurora_core.telemetry.nvml import NvmlBackend, NvmlEventWatcher, handle_key, pynvml_attr

FORMAT = "aurora-nvml-trace"
VERSION = 1

# Calls whose arguments are opaque buffers or event sets: matched by function name and order only.
_ORDER_ONLY = {"nvmlEventSetWait_v2", "nvmlEventSetWait", "nvmlGpmMetricsGet", "nvmlGpmSampleFree", "nvmlEventSetFree",
               "nvmlDeviceRegisterEvents"}


# Absent from nvidia-ml-py releases without GPM; such a pynvml never returns one.
_GPM_GET_T = pynvml_attr("c_nvmlGpmMetricsGet_t")


class ReplayExhausted(RuntimeError):
    """The trace has no more entries for a call: the replay is over."""


# -- value encoding ------------------------------------------------------------------------------
def encode(x, handles: dict[int, int] | None = None):
    """JSON-ready form of an NVML argument or return value (see the module docstring)."""
    if isinstance(x, ReplayHandle):
        return {"h": int(x)}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, bytes):
        return {"b": x.decode("latin-1")}
    if isinstance(x, (list, tuple)):
        return [encode(v, handles) for v in x]
    if _GPM_GET_T is not None and isinstance(x, _GPM_GET_T):
        return {"gpm": [[int(m.metricId), int(m.nvmlReturn), float(m.value)]
                        for m in list(x.metrics)[: int(x.numMetrics)]]}
    if isinstance(x, ctypes.Union):
        return {"u": type(x).__name__, "raw": ctypes.c_uint64.from_buffer_copy(x).value}
    if isinstance(x, ctypes.Structure):
        return {"s": type(x).__name__,
                "f": {name: encode(getattr(x, name), handles) for name, *_ in x._fields_}}
    if isinstance(x, ctypes.Array):
        return {"a": [encode(v, handles) for v in x]}
    if isinstance(x, ctypes._Pointer):
        key = handle_key(x)
        if handles is not None and key in handles:
            return {"h": handles[key]}
        return {"o": type(x).__name__}
    if isinstance(x, ctypes._SimpleCData):
        return x.value
    return {"o": type(x).__name__}


class ReplayHandle(int):
    """Stands for the device handle of GPU ``int(self)`` during replay."""


def decode(v):
    """Rebuild a value written by ``encode``: real pynvml structs, so the backend cannot tell."""
    if isinstance(v, list):
        return [decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "b" in v:
        return v["b"].encode("latin-1")
    if "h" in v:
        return ReplayHandle(v["h"])
    if "u" in v:
        u = getattr(pynvml, v["u"])()
        ctypes.memmove(ctypes.addressof(u), ctypes.byref(ctypes.c_uint64(v["raw"])), 8)
        return u
    if "s" in v:
        s = getattr(pynvml, v["s"])()
        for name, val in v["f"].items():
            if isinstance(val, dict) and ("h" in val or "o" in val):
                continue  # pointer fields stay NULL: nothing downstream dereferences them
            setattr(s, name, decode(val))
        return s
    if "a" in v:
        items = [decode(x) for x in v["a"]]
        if items and isinstance(items[0], ctypes.Structure):
            arr = (type(items[0]) * len(items))()
            for i, it in enumerate(items):
                arr[i] = it
            return arr
        return items
    if "o" in v:
        return v["o"]
    return v


def _key(fn: str, args) -> str:
    return fn if fn in _ORDER_ONLY else fn + json.dumps(args, sort_keys=True)


# -- recording -----------------------------------------------------------------------------------
class RecordingNvml:
    """Wraps an nvml API (``pynvml``, or ``SimulatedNvml``) and writes every call to a trace.

    out: a path (written line by line, so a crash keeps what was captured) or None (``lines`` only).
    clock: monotonic ns; the live default is ``now_ns``. The backend uses this clock too.
    """

    def __init__(self, api=pynvml, out: str | os.PathLike | None = None, header: dict | None = None,
                 clock: Callable[[], int] = now_ns):
        self._api = api
        self.clock = clock
        self._t0 = clock()
        self._handles: dict[int, int] = {}
        self._lock = threading.Lock()
        self.lines: list[dict] = []
        self._file = open(out, "w", encoding="utf-8") if out is not None else None
        head = {"format": FORMAT, "version": VERSION, "source": "live", "host": socket.gethostname(),
                "created_wall": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "pynvml": getattr(pynvml, "__version__", None) or _pkg_version("nvidia-ml-py")}
        head.update(header or {})
        self._write(head)

    def _write(self, obj: dict) -> None:
        with self._lock:
            self.lines.append(obj)
            if self._file is not None:
                self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def mark_tick(self) -> int:
        """Write a tick marker; returns the tick's time (this clock), which the backend uses."""
        t = self.clock()
        self._write({"t_ns": t - self._t0, "tick": 1})
        return t

    def __getattr__(self, name: str):
        target = getattr(self._api, name)
        if not (name.startswith("nvml") and callable(target)):
            return target

        def call(*args):
            t_start = self.clock()
            entry: dict = {"fn": name, "args": encode(list(args), self._handles)}
            try:
                ret = target(*args)
            except pynvml.NVMLError as exc:
                t_end = self.clock()
                self._write({"t_ns": t_end - self._t0, "dur_ns": t_end - t_start, **entry, "err": int(exc.value)})
                raise
            t_end = self.clock()
            if name == "nvmlDeviceGetHandleByIndex":
                self._handles[handle_key(ret)] = int(args[0])
            self._write({"t_ns": t_end - self._t0, "dur_ns": t_end - t_start, **entry,
                         "ret": encode(ret, self._handles)})
            return ret

        return call


def _pkg_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


# -- replay --------------------------------------------------------------------------------------
def _read_lines(path) -> list[dict]:
    """The JSON objects of a trace file, one a line. ValueError for a file that is not text, not JSON
    Lines, or cut short mid-line (an interrupted recording); OSError when it cannot be read."""
    lines = []
    hint = "a trace is JSON Lines from `aurora telemetry record` or `synth`"
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    cut = not line.endswith("\n")
                    raise ValueError(f"{'ends mid-line (cut short?)' if cut else f'line {n} is not a JSON object'}; "
                                     f"{hint}")
                lines.append(obj)
    except UnicodeDecodeError:
        raise ValueError(f"not a text file; {hint} (a run file goes to `aurora diagnose`)") from None
    return lines


def read_trace(path_or_lines) -> list[dict]:
    """The lines of a trace (a path, or already-parsed dicts). Checks the header."""
    lines = _read_lines(path_or_lines) if isinstance(path_or_lines, (str, os.PathLike)) else list(path_or_lines)
    if not lines or lines[0].get("format") != FORMAT:
        raise ValueError(f"replay: expected an {FORMAT} trace (header line first), got {str(lines[:1])[:120]}")
    if lines[0].get("version") != VERSION:
        raise ValueError(f"replay: trace version {lines[0].get('version')} is not supported (want {VERSION})")
    return lines


class ReplayNvml:
    """An nvml API that answers from a recorded trace (see the module docstring).

    base_ns: the monotonic time that trace time 0 maps to (default: now), so replayed samples can be
    merged into a run on another time base.
    """

    def __init__(self, trace, base_ns: int | None = None):
        lines = read_trace(trace)
        self.header = lines[0]
        self.base_ns = now_ns() if base_ns is None else int(base_ns)
        self._queues: dict[str, deque] = defaultdict(deque)
        self._ticks: deque[int] = deque()
        for e in lines[1:]:
            if "tick" in e:
                self._ticks.append(int(e["t_ns"]))
            else:
                self._queues[_key(e["fn"], e["args"])].append(e)
        self._known_fns = {e["fn"] for e in lines[1:] if "fn" in e}
        self.t_ns = 0
        self._lock = threading.Lock()

    def clock(self) -> int:
        return self.base_ns + self.t_ns

    def mark_tick(self) -> int:
        """Advance to the next recorded tick; returns its time on this replay's time base."""
        with self._lock:
            if self._ticks:
                self.t_ns = self._ticks.popleft()
            return self.base_ns + self.t_ns

    @property
    def ticks_left(self) -> int:
        return len(self._ticks)

    def next_time(self, fn: str) -> int | None:
        """Trace time of the next recorded call of an order-only function, or None."""
        q = self._queues.get(fn)
        return int(q[0]["t_ns"]) if q else None

    def __getattr__(self, name: str):
        target = getattr(pynvml, name)
        if not (name.startswith("nvml") and callable(target)):
            return target

        def call(*args):
            key = _key(name, encode(list(args)) if name not in _ORDER_ONLY else None)
            with self._lock:
                q = self._queues.get(key)
                if not q:
                    if name not in self._known_fns:
                        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
                    raise ReplayExhausted(f"replay: no more recorded calls of {name}")
                e = q.popleft()
            if "err" in e:
                raise pynvml.NVMLError(e["err"])
            ret = e["ret"]
            if name == "nvmlGpmMetricsGet":
                mg = args[0]
                for i, (mid, rc, val) in enumerate(ret["gpm"]):
                    mg.metrics[i].metricId, mg.metrics[i].nvmlReturn, mg.metrics[i].value = mid, rc, val
                return mg
            if name == "nvmlGpmSampleAlloc":
                return pynvml.c_nvmlGpmSample_t()
            return decode(ret)

        return call


class TickReplayNvml:
    """A trace's answers per tick, decoded once, for measuring the backend's own Python cost.

    Unlike ``ReplayNvml`` calls are not matched in order: a call gets the current tick's last recorded
    answer for its function and int arguments (the first tick's when the current tick has none), and
    ``nvmlDeviceGetFieldValues`` any subset of the recorded field ids, so a backend with another slow
    cadence runs on a trace recorded with one call per tick. The ticks repeat forever, time moving on. A
    call costs about a dict lookup, so a CPU clock or profile of the backend shows its own work, not
    the driver's and not the decoding. header: the trace's, with ``slow_every`` (the backend's cadence).
    """

    def __init__(self, trace, slow_every: int, base_ns: int = 0):
        lines = read_trace(trace)
        self.header = {**lines[0], "slow_every": slow_every}
        self.base_ns = base_ns
        self._ticks: list[tuple[int, dict]] = []   # (trace time, {key: ("ret" | "err", value)})
        self._first: dict = {}
        for e in lines[1:]:
            if "tick" in e:
                self._ticks.append((int(e["t_ns"]), {}))
            elif self._ticks and "fn" in e:
                answers = self._ticks[-1][1]
                key = (e["fn"], *(a for a in e["args"] if type(a) is int))
                if "err" in e:
                    answer = ("err", e["err"])
                elif e["fn"] == "nvmlDeviceGetFieldValues":  # per id; a probe's ids and the read's, merged
                    before = answers[key][1] if answers.get(key, ("err",))[0] == "ret" else {}
                    answer = ("ret", {**before, **{int(fv.fieldId): fv for fv in decode(e["ret"])}})
                elif e["fn"] == "nvmlGpmMetricsGet":
                    mg = _GPM_GET_T()
                    mg.numMetrics = len(e["ret"]["gpm"])
                    for i, (mid, rc, val) in enumerate(e["ret"]["gpm"]):
                        mg.metrics[i].metricId, mg.metrics[i].nvmlReturn, mg.metrics[i].value = mid, rc, val
                    answer = ("ret", mg)
                else:
                    answer = ("ret", decode(e["ret"]))
                answers[key] = answer  # the last: a tick's read comes after the probe in the same tick
        if not self._ticks:
            raise ValueError("TickReplayNvml: the trace has no tick")
        for _, answers in self._ticks:
            for key, answer in answers.items():
                self._first.setdefault(key, answer)
        period = int(round(float(self.header.get("period_s", 0.1)) * 1e9))
        self._lap_ns = self._ticks[-1][0] - self._ticks[0][0] + period
        self._i = -1
        self.t_ns = self._ticks[0][0]
        self._arrays: dict = {}  # (tick, field ids) -> the field values array for them

    def clock(self) -> int:
        return self.base_ns + self.t_ns

    def mark_tick(self) -> int:
        self._i += 1
        lap, i = divmod(self._i, len(self._ticks))
        self.t_ns = self._ticks[i][0] + lap * self._lap_ns
        return self.base_ns + self.t_ns

    def _answer(self, key):
        answer = self._ticks[self._i % len(self._ticks)][1].get(key) or self._first.get(key)
        if answer is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if answer[0] == "err":
            raise pynvml.NVMLError(answer[1])
        return answer[1]

    def nvmlDeviceGetFieldValues(self, handle, ids):
        key = (self._i % len(self._ticks), tuple(ids))
        arr = self._arrays.get(key)
        if arr is None:
            fields = self._answer(("nvmlDeviceGetFieldValues",))
            arr = (pynvml.c_nvmlFieldValue_t * len(ids))()
            for i, fid in enumerate(ids):
                arr[i].fieldId = fid
                if fid in fields:
                    arr[i] = fields[fid]
                else:
                    arr[i].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            self._arrays[key] = arr
        return arr

    def nvmlGpmSampleAlloc(self):
        return pynvml.c_nvmlGpmSample_t()

    def __getattr__(self, name: str):
        target = getattr(pynvml, name)
        if not (name.startswith("nvml") and callable(target)):
            return target

        def call(*args):
            return self._answer((name, *(a for a in args if type(a) is int)))

        setattr(self, name, call)  # later look-ups find it without __getattr__
        return call


def replay_trace(trace, base_ns: int = 0, events: bool = True) -> tuple[list[Sample], list[Event], dict]:
    """Replay a whole trace through ``NvmlBackend`` without sleeping.

    Returns (samples, events, capabilities). Sample times are ``base_ns`` + trace time, so a trace can
    be merged into a run recorded on another monotonic time base.
    """
    api = ReplayNvml(trace, base_ns=base_ns)
    backend = NvmlBackend(api)
    watcher = NvmlEventWatcher(api) if events and api.next_time("nvmlEventSetWait_v2") is not None else None
    samples: list[Sample] = []
    out_events: list[Event] = []
    while api.ticks_left:
        samples.extend(backend.tick())
        out_events.extend(backend.drain_events())
        while watcher is not None:
            t = api.next_time("nvmlEventSetWait_v2")
            if t is None or t > api.t_ns:
                break
            try:
                out_events.extend(watcher.poll(0))
            except (pynvml.NVMLError, ReplayExhausted):
                break
    return samples, out_events, backend.capabilities()


# -- synthetic GPU -------------------------------------------------------------------------------
def _ids(*names: str) -> tuple[int, ...]:
    """The pynvml values of ``names`` that this nvidia-ml-py defines (the simulated GPU only answers
    for ids and bits the backend can name; an absent one stays absent, as in the backend)."""
    return tuple(v for v in (pynvml_attr(n) for n in names) if v is not None)


def _bits(*suffixes: str) -> int:
    out = 0
    for suffix in suffixes:
        out |= pynvml_attr(f"nvmlClocksEventReason{suffix}", f"nvmlClocksThrottleReason{suffix}") or 0
    return out


#: episode kind -> (throttle counter field ids that accumulate, reason bits, SM clock factor).
EPISODES: dict[str, tuple[tuple[int, ...], int, float]] = {
    "none": ((), 0, 1.0),
    "thermal": (_ids("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN", "NVML_FI_DEV_PERF_POLICY_THERMAL"),
                _bits("SwThermalSlowdown"), 0.75),
    "power": (_ids("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP"), _bits("SwPowerCap"), 0.8),
    "hw_slowdown": ((), _bits("HwSlowdown"), 0.5),
    "hw_thermal": (_ids("NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN"),
                   _bits("HwThermalSlowdown", "HwSlowdown"), 0.5),
    "power_brake": (_ids("NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN"),
                    _bits("HwPowerBrakeSlowdown", "HwSlowdown"), 0.5),
    "idle": (_ids("NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION"), _bits("GpuIdle"), 210 / 1980),
}

# nvmlDeviceGetViolationStatus policy -> the field id holding the same counter (pairs this pynvml names).
_POLICY_FIELD = {
    pol[0]: fid[0]
    for pol, fid in (
        (_ids("NVML_PERF_POLICY_POWER"), _ids("NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP")),
        (_ids("NVML_PERF_POLICY_THERMAL"), _ids("NVML_FI_DEV_PERF_POLICY_THERMAL")),
        (_ids("NVML_PERF_POLICY_SYNC_BOOST"), _ids("NVML_FI_DEV_CLOCKS_EVENT_REASON_SYNC_BOOST")),
        (_ids("NVML_PERF_POLICY_BOARD_LIMIT"), _ids("NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT")),
        (_ids("NVML_PERF_POLICY_LOW_UTILIZATION"), _ids("NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION")),
        (_ids("NVML_PERF_POLICY_RELIABILITY"), _ids("NVML_FI_DEV_PERF_POLICY_RELIABILITY")),
    )
    if pol and fid
}


class SimulatedNvml:
    """A one-GPU model with the pynvml functions ``NvmlBackend`` calls; time is ``t_s``, set by the caller.

    kind: a key of EPISODES, active on [start_s, end_s) with ``severity`` (0..1) of the time throttled.
    counters: "fields" (throttle counters via nvmlDeviceGetFieldValues, as on recent drivers),
    "violation" (fields unsupported, nvmlDeviceGetViolationStatus works) or "bitmask" (no counters).
    lost: (t0, t1) during which every device call raises GPU_IS_LOST. xid_at: times of Xid 79 events.
    gpm: whether GPM metrics are supported (Hopper-like).
    """

    MAX_SM, APP_SM, MEM, SLOWDOWN, LIMIT_W = 1980.0, 1755.0, 2619.0, 87.0, 350.0

    def __init__(self, kind: str = "none", start_s: float = 0.0, end_s: float = 0.0, severity: float = 1.0,
                 counters: str = "fields", lost: tuple[float, float] | None = None,
                 xid_at: Iterable[float] = (), gpm: bool = False, name: str = "Aurora Synthetic GPU"):
        if kind not in EPISODES:
            raise ValueError(f"SimulatedNvml: kind must be one of {sorted(EPISODES)}, got {kind!r}")
        self.kind, self.start_s, self.end_s, self.severity = kind, start_s, end_s, severity
        self.counters, self.lost, self.gpm, self.name = counters, lost, gpm, name
        self.xids = sorted(xid_at)
        self.t_s = 0.0
        self._dev = pynvml.struct_c_nvmlDevice_t()
        self._last_event_t = -1.0

    # state of the model at t_s
    def _active(self) -> bool:
        return self.start_s <= self.t_s < self.end_s

    def _throttled_s(self) -> float:
        overlap = min(self.t_s, self.end_s) - self.start_s
        return self.severity * max(0.0, overlap)

    def _check(self, h=None) -> None:
        if self.lost and self.lost[0] <= self.t_s < self.lost[1]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    def _util(self) -> float:
        return 0.0 if self.kind == "idle" and self._active() else 95.0

    def _sm(self) -> float:
        return self.MAX_SM * (EPISODES[self.kind][2] if self._active() else 1.0)

    def _power_w(self) -> float:
        if self._active() and self.kind == "power":
            return self.LIMIT_W
        return 60.0 if self._active() and self.kind == "idle" else 280.0

    def _energy_mj(self) -> float:
        # integral of power: 280 W outside the episode, the episode's power inside it
        inside = max(0.0, min(self.t_s, self.end_s) - self.start_s) if self.kind != "none" else 0.0
        p_in = self.LIMIT_W if self.kind == "power" else (60.0 if self.kind == "idle" else 280.0)
        return 1000.0 * (280.0 * (self.t_s - inside) + p_in * inside)

    def _counter_ns(self, fid: int) -> int:
        fields = EPISODES[self.kind][0]
        return int(round(self._throttled_s() * 1e9)) if fid in fields else 0

    # pynvml surface
    def nvmlInit(self):
        return None

    def nvmlShutdown(self):
        return None

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        self._check()
        return ctypes.pointer(self._dev)

    def nvmlDeviceGetName(self, h):
        return self.name

    def nvmlDeviceGetUUID(self, h):
        return "GPU-00000000-aurora-synthetic"

    def nvmlSystemGetDriverVersion(self):
        return "synthetic"

    def nvmlDeviceGetFieldValues(self, h, ids):
        self._check()
        arr = (pynvml.c_nvmlFieldValue_t * len(ids))()
        counter_ids = {f for f, *_ in _POLICY_FIELD.items()} | set(_POLICY_FIELD.values()) | set(_ids(
            "NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN",
            "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN",
            "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN"))
        gauges = {
            fid[0]: value
            for fid, value in (
                (_ids("NVML_FI_DEV_POWER_INSTANT"), self._power_w() * 1000.0),
                (_ids("NVML_FI_DEV_POWER_CURRENT_LIMIT"), self.LIMIT_W * 1000.0),
                (_ids("NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION"), self._energy_mj()),
                (_ids("NVML_FI_DEV_PCIE_REPLAY_COUNTER"), 0),
                (_ids("NVML_FI_DEV_ECC_SBE_VOL_TOTAL"), 0),
                (_ids("NVML_FI_DEV_ECC_DBE_VOL_TOTAL"), 0),
                (_ids("NVML_FI_DEV_REMAPPED_PENDING"), 0),
                (_ids("NVML_FI_DEV_PCIE_COUNT_TX_BYTES"), 2e9 * self.t_s),
                (_ids("NVML_FI_DEV_PCIE_COUNT_RX_BYTES"), 6e9 * self.t_s),
            )
            if fid
        }
        for i, fid in enumerate(ids):
            fv = arr[i]
            fv.fieldId, fv.timestamp = fid, int(self.t_s * 1e6)
            fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            if fid in gauges:
                fv.value.ullVal = int(gauges[fid])
            elif fid in counter_ids and self.counters == "fields":
                fv.value.ullVal = self._counter_ns(fid)
            else:
                fv.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return arr

    def nvmlDeviceGetViolationStatus(self, h, policy):
        self._check()
        if self.counters != "violation":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        v = pynvml.c_nvmlViolationTime_t()
        v.referenceTime, v.violationTime = int(self.t_s * 1e6), self._counter_ns(_POLICY_FIELD[policy])
        return v

    def nvmlDeviceGetUtilizationRates(self, h):
        self._check()
        u = pynvml.c_nvmlUtilization_t()
        u.gpu, u.memory = int(self._util()), int(self._util() * 0.4)
        return u

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        self._check()
        m = pynvml.c_nvmlMemory_t()
        m.total, m.used = 80 << 30, 21 << 30
        m.free = m.total - m.used
        return m

    def nvmlDeviceGetClockInfo(self, h, which):
        self._check()
        return int(self._sm()) if which == pynvml.NVML_CLOCK_SM else int(self.MEM)

    def nvmlDeviceGetMaxClockInfo(self, h, which):
        return int(self.MAX_SM) if which == pynvml.NVML_CLOCK_SM else int(self.MEM)

    def nvmlDeviceGetApplicationsClock(self, h, which):
        self._check()
        return int(self.APP_SM) if which == pynvml.NVML_CLOCK_SM else int(self.MEM)

    def nvmlDeviceGetTemperature(self, h, sensor):
        self._check()
        return int(self.SLOWDOWN - 1) if self._active() and self.kind in ("thermal", "hw_thermal") else 62

    def nvmlDeviceGetTemperatureThreshold(self, h, which):
        if which != pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(self.SLOWDOWN)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        self._check()
        return EPISODES[self.kind][1] if self._active() else 0

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        self._check()
        return 4

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return 4

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        self._check()
        return 16

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return 16

    def nvmlGpmQueryDeviceSupport(self, h):
        s = pynvml.c_nvmlGpmSupport_t()
        s.version, s.isSupportedDevice = pynvml.NVML_GPM_SUPPORT_VERSION, int(self.gpm)
        return s

    def nvmlGpmSampleAlloc(self):
        return pynvml.c_nvmlGpmSample_t()

    def nvmlGpmSampleFree(self, s):
        return None

    def nvmlGpmSampleGet(self, h, s):
        self._check()
        return s

    def nvmlGpmMetricsGet(self, mg):
        values = {mid[0]: v for mid, v in ((_ids("NVML_GPM_METRIC_SM_UTIL"), self._util() * 0.9),
                                           (_ids("NVML_GPM_METRIC_SM_OCCUPANCY"), 41.0),
                                           (_ids("NVML_GPM_METRIC_ANY_TENSOR_UTIL"), self._util() * 0.5),
                                           (_ids("NVML_GPM_METRIC_DRAM_BW_UTIL"), 37.0)) if mid}
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            m.value = values.get(int(m.metricId), 0.0)
            m.nvmlReturn = pynvml.NVML_SUCCESS if int(m.metricId) in values else pynvml.NVML_ERROR_NOT_SUPPORTED
        return mg

    def nvmlDeviceGetSupportedEventTypes(self, h):
        return pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError

    def nvmlEventSetCreate(self):
        return pynvml.c_nvmlEventSet_t()

    def nvmlDeviceRegisterEvents(self, h, mask, es):
        return None

    def nvmlEventSetFree(self, es):
        return None

    def nvmlEventSetWait_v2(self, es, timeout_ms):
        due = [t for t in self.xids if self._last_event_t < t <= self.t_s]
        if not due:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        self._last_event_t = due[0]
        d = pynvml.c_nvmlEventData_t()
        d.eventType, d.eventData = pynvml.nvmlEventTypeXidCriticalError, 79  # 79: GPU fell off the bus
        return d


def make_synthetic_trace(kind: str, start_s: float, end_s: float, duration_s: float | None = None,
                         period_s: float = 0.1, severity: float = 1.0, out=None, **sim_kwargs) -> list[dict]:
    """A trace of ``duration_s`` (default ``end_s + 1``) at ``period_s`` with one throttle episode.

    kind: a key of EPISODES ("thermal", "power", "hw_slowdown", "hw_thermal", "power_brake", "idle",
    "none"); the episode covers trace time [start_s, end_s) with ``severity`` (0..1) of it throttled.
    sim_kwargs go to ``SimulatedNvml`` (counters=, lost=, xid_at=, gpm=). Returns the lines; also
    writes them to ``out`` when given. Ticks fall at k * period_s, k = 0..duration_s / period_s.
    """
    sim = SimulatedNvml(kind, start_s, end_s, severity, **sim_kwargs)
    header = {"source": f"synthetic:{kind}", "host": "synthetic", "period_s": period_s,
              "episode": {"kind": kind, "start_s": start_s, "end_s": end_s, "severity": severity,
                          **{k: v for k, v in sim_kwargs.items() if k != "xid_at"}},
              "xid_at": list(sim.xids)}
    rec = RecordingNvml(sim, out=None, header=header, clock=lambda: int(round(sim.t_s * 1e9)))
    backend = NvmlBackend(rec)
    watcher = NvmlEventWatcher(rec) if sim.xids else None
    n = int(round((end_s + 1.0 if duration_s is None else duration_s) / period_s))
    for k in range(n + 1):
        sim.t_s = k * period_s
        backend.tick()
        if watcher is not None:
            watcher.poll(0)
    if out is not None:
        with open(out, "w", encoding="utf-8") as f:
            for line in rec.lines:
                f.write(json.dumps(line, separators=(",", ":")) + "\n")
    return rec.lines


def replay_samples(trace, base_ns: int) -> list[Sample]:
    """Samples of a trace on a given monotonic time base (trace time 0 -> ``base_ns``)."""
    return replay_trace(trace, base_ns=base_ns)[0]


#: The committed test traces: file stem -> make_synthetic_trace arguments.
TEST_TRACES: dict[str, dict] = {
    "thermal": dict(kind="thermal", start_s=1.05, end_s=2.0, duration_s=3.0),
    "power_cap": dict(kind="power", start_s=1.0, end_s=2.0, duration_s=3.0, severity=0.5),
    "hw_slowdown": dict(kind="hw_slowdown", start_s=1.0, end_s=2.0, duration_s=3.0),
    "idle_clocks": dict(kind="idle", start_s=1.0, end_s=2.0, duration_s=3.0),
    "healthy": dict(kind="none", start_s=0.0, end_s=0.0, duration_s=3.0),
    "thermal_violation_api": dict(kind="thermal", start_s=1.0, end_s=2.0, duration_s=3.0, counters="violation"),
    "gpu_lost": dict(kind="none", start_s=0.0, end_s=0.0, duration_s=4.0, lost=(1.0, 1.6), xid_at=(0.95,)),
}


def write_test_traces(directory: str) -> list[str]:
    """(Re)generate tests/data/nvml/*.jsonl. Deterministic: the same code writes the same bytes."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for stem, kw in TEST_TRACES.items():
        path = os.path.join(directory, f"synthetic_{stem}.jsonl")
        lines = make_synthetic_trace(**kw)
        lines[0]["created_wall"] = "synthetic"  # keep the files byte-stable across regenerations
        lines[0]["pynvml"] = "any"
        with open(path, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, separators=(",", ":")) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":  # python -m aurora_core.telemetry.replay tests/data/nvml
    for p in write_test_traces(sys.argv[1] if len(sys.argv) > 1 else "tests/data/nvml"):
        print(p)
