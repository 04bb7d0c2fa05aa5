"""Prometheus exporter: request records, telemetry samples and events as metrics (prometheus-client).

Names follow Triton Inference Server where Triton has the metric, so existing dashboards work:
``nv_inference_request_success``, ``nv_inference_request_failure{reason}``, ``nv_inference_count``,
``nv_inference_exec_count``, ``nv_inference_request_duration_us``, ``nv_inference_queue_duration_us``,
``nv_inference_compute_input_duration_us`` (decode + preprocess + H2D here),
``nv_inference_compute_infer_duration_us``, ``nv_inference_compute_output_duration_us`` (D2H + top-k),
``nv_inference_pending_request_count``, ``nv_gpu_utilization`` (0..1, time busy), ``nv_gpu_memory_used_bytes``,
``nv_gpu_memory_total_bytes``, ``nv_gpu_power_usage`` (W), ``nv_gpu_power_limit`` (W),
``nv_energy_consumption`` (J), ``nv_cpu_utilization`` (0..1). Triton's cumulative ones are exposed with
Triton's exact sample names; they are declared untyped because prometheus-client renames anything
declared a counter to ``*_total``.

aurora's own: ``aurora_throttled_fraction{gpu,reason}``, ``aurora_sm_clock_ratio{gpu}`` (SM clock / max),
``aurora_temperature_margin_c{gpu}``, ``aurora_telemetry_staleness_seconds{source}`` (age of the newest
good reading, growing at scrape time if the sampler goes quiet), ``aurora_sampler_cpu_seconds_total``,
``aurora_stage_duration_seconds{stage}`` (histogram per stage of ``records.STAGES``),
``aurora_events_total{source,kind}``, and ``aurora_<metric>{source}`` for every other sample value.

Samples carry only what was read at their tick, and the NVML and CPU backends read some metrics only
every 10th tick, 1 Hz at the sampler's default 0.1 s period (the costly throttle counters, GPM,
application clock, PCIe link, load, pressure; see ``NvmlBackend.capabilities()["gpuN"]["cadence"]``).
So the exporter keeps, per source, the newest value of each metric, merged over good samples: a 1 Hz
reading stays on /metrics between its reads instead of vanishing on 9 scrapes out of 10 (Prometheus
would mark the series stale). Each value is exported as read: a throttled fraction read once a second
is the fraction of its own 1 s interval, never combined with others. A reading missing from
``max_missed`` (30) good samples in a row of its source, three slow cadences whatever the sampling
period, is dropped (a field that started failing); a stale sample
(``stale_age_s`` > 0, or no reading: the sampler marks a failed read with ``stale_age_s`` alone) drops
every reading of its source at once. An unread or dropped metric is absent from the output, never a
fake zero.

One object is both the pipeline sink and the sampler callback: call it with a ``RequestRecord``, a
``Sample`` or an ``Event``. Each exporter owns its ``CollectorRegistry``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from aurora_core.records import STAGES, Event, RequestRecord, Sample, now_ns
from aurora_core.telemetry.nvml import SLOW_EVERY

# RequestRecord stages summed into each Triton duration counter (µs).
TRITON_DURATIONS = {
    "nv_inference_request_duration_us": (("total",), "Cumulative inference request duration in microseconds"),
    "nv_inference_queue_duration_us": (("queue",), "Cumulative inference queuing duration in microseconds"),
    "nv_inference_compute_input_duration_us": (("decode", "preprocess", "h2d"),
                                               "Cumulative compute input duration in microseconds"),
    "nv_inference_compute_infer_duration_us": (("compute",), "Cumulative compute inference duration in microseconds"),
    "nv_inference_compute_output_duration_us": (("d2h",), "Cumulative inference compute output duration in microseconds"),
}

# sample metric -> (Triton name, scale, help). GPU ones are labelled gpu_uuid, CPU ones unlabelled.
TRITON_GAUGES = {
    "util_gpu_busy_pct": ("nv_gpu_utilization", 0.01, "GPU utilization rate [0.0 - 1.0) (time busy, not occupancy)"),
    "mem_used_bytes": ("nv_gpu_memory_used_bytes", 1.0, "GPU used memory, in bytes"),
    "mem_total_bytes": ("nv_gpu_memory_total_bytes", 1.0, "GPU total memory, in bytes"),
    "power_w": ("nv_gpu_power_usage", 1.0, "GPU power usage in watts"),
    "power_limit_w": ("nv_gpu_power_limit", 1.0, "GPU power management limit in watts"),
    "cpu_util_pct": ("nv_cpu_utilization", 0.01, "CPU utilization rate [0.0 - 1.0]"),
}

THROTTLE_HELP = ("Fraction of the interval ending at the latest read of the cause's counter that the clocks were "
                 f"held down, per cause (one sampling period; {SLOW_EVERY} periods for the costly counters read "
                 "at the slow cadence, whose value stays until their next read)")

DEFAULT_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_BATCH_MEMORY = 4096  # batch ids remembered to count each batch execution once

#: Good samples of a source a reading may be missing from before it is dropped: three slow cadences
#: (NVML's SLOW_EVERY; the CPU backend's slow_every is also 10 ticks). Counted in samples, not seconds,
#: so the bound follows the sampling period: 3 s at the sampler's default 0.1 s, 30 s at the 1 s of
#: ``aurora serve``, whose slow readings come every 10 s (a fixed 5 s would drop them between reads).
MAX_MISSED = 3 * SLOW_EVERY

_BOOKKEEPING = ("stale_age_s", "sampler_cpu_s")  # in every sample, not readings


class PrometheusExporter:
    """Collects metrics from records, samples and events; render with ``generate()`` or ``serve(port)``.

    model, version: Triton's ``model`` and ``version`` labels on the inference metrics.
    gpu_uuids: source ("gpu0") -> UUID for Triton's ``gpu_uuid`` label (default: the source name).
    max_missed: good samples of a source a reading may be absent from before it is no longer exported.
    """

    def __init__(self, model: str = "aurora", version: str = "1", registry: CollectorRegistry | None = None,
                 gpu_uuids: dict[str, str] | None = None, buckets=DEFAULT_BUCKETS, max_missed: int = MAX_MISSED):
        if max_missed < 1:
            raise ValueError(f"PrometheusExporter: max_missed must be >= 1 sample, got {max_missed}")
        self.model, self.version = model, version
        self.max_missed = max_missed
        self.gpu_uuids = dict(gpu_uuids or {})
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._success = 0.0
        self._failure: dict[str, float] = defaultdict(float)
        self._count = 0.0
        self._exec = 0.0
        self._durations_us: dict[str, float] = defaultdict(float)
        self._pending: float | None = None
        self._batches: OrderedDict[int, None] = OrderedDict()
        self._newest: dict[str, Sample] = {}  # per source, for the staleness gauge
        self._good: dict[str, int] = defaultdict(int)  # good samples seen per source
        # source -> metric -> (value, number of the good sample it came from)
        self._readings: dict[str, dict[str, tuple[float, int]]] = {}
        self._sampler_cpu_s = 0.0
        self._events: dict[tuple[str, str], float] = defaultdict(float)
        self._stage = Histogram("aurora_stage_duration_seconds", "Per-stage request latency in seconds",
                                ["stage"], registry=self.registry, buckets=buckets)
        self.registry.register(_Collector(self))

    # -- inputs --------------------------------------------------------------------------------------
    def __call__(self, item) -> None:
        """Record sink and telemetry callback in one: a RequestRecord, a Sample or an Event."""
        if isinstance(item, RequestRecord):
            self.add_record(item)
        elif isinstance(item, Sample):
            self.add_sample(item)
        elif isinstance(item, Event):
            self.add_event(item)
        else:
            raise TypeError(f"PrometheusExporter: expected a RequestRecord, Sample or Event, got {type(item).__name__}")

    def add_record(self, r: RequestRecord) -> None:
        stages = {name: r.stage_ns(name) for name in STAGES}
        with self._lock:
            if r.status == "ok":
                self._success += 1
                self._count += 1
            else:
                self._failure[r.status] += 1
            if r.batch_id >= 0 and r.batch_id not in self._batches:
                self._batches[r.batch_id] = None
                self._exec += 1
                if len(self._batches) > _BATCH_MEMORY:
                    self._batches.popitem(last=False)
            for name, (parts, _) in TRITON_DURATIONS.items():
                us = sum(stages[p] for p in parts if stages[p] >= 0) / 1000.0
                self._durations_us[name] += us
            self._pending = float(r.queue_depth)
        for name, ns in stages.items():
            if ns >= 0:
                self._stage.labels(name).observe(ns / 1e9)

    def set_pending(self, n: int) -> None:
        """Requests waiting right now (the batcher can call this; otherwise the last record's queue depth)."""
        with self._lock:
            self._pending = float(n)

    def add_sample(self, s: Sample) -> None:
        fresh = {m: x for m, x in s.values.items() if m not in _BOOKKEEPING}
        with self._lock:
            self._newest[s.source] = s
            if s.values.get("stale_age_s", 0.0) > 0 or not fresh:
                self._readings.pop(s.source, None)  # a failed read: old readings are not presented as current
            else:
                n = self._good[s.source] = self._good[s.source] + 1
                kept = self._readings.setdefault(s.source, {})
                kept.update((m, (x, n)) for m, x in fresh.items())
                for m in [m for m, (_, k) in kept.items() if n - k >= self.max_missed]:
                    del kept[m]
            cpu_s = s.values.get("sampler_cpu_s")
            if cpu_s is not None and cpu_s > self._sampler_cpu_s:
                self._sampler_cpu_s = cpu_s

    def add_event(self, e: Event) -> None:
        with self._lock:
            self._events[(e.source, e.kind)] += 1

    # -- output --------------------------------------------------------------------------------------
    def generate(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Serve /metrics on a daemon thread (prometheus_client.start_http_server)."""
        from prometheus_client import start_http_server

        return start_http_server(port, addr=addr, registry=self.registry)

    def _gpu_label(self, source: str) -> str:
        return self.gpu_uuids.get(source, source)


def _untyped(name: str, doc: str, labels: dict[str, str], value: float) -> Metric:
    m = Metric(name, doc, "unknown")
    m.add_sample(name, labels, value)
    return m


class _Collector:
    """Renders the exporter's state at scrape time."""

    def __init__(self, exp: PrometheusExporter):
        self.exp = exp

    def collect(self):
        exp = self.exp
        with exp._lock:
            success, failure, count, execs = exp._success, dict(exp._failure), exp._count, exp._exec
            durations, pending = dict(exp._durations_us), exp._pending
            newest, cpu_s, events = dict(exp._newest), exp._sampler_cpu_s, dict(exp._events)
            readings = {src: {m: x for m, (x, _) in kept.items()} for src, kept in exp._readings.items()}
        ml = {"model": exp.model, "version": exp.version}
        yield _untyped("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
                       ml, success)
        fail = Metric("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "unknown")
        for reason, n in sorted(failure.items()):
            fail.add_sample("nv_inference_request_failure", {**ml, "reason": reason}, n)
        yield fail
        yield _untyped("nv_inference_count", "Number of inferences performed (does not include cached requests)",
                       ml, count)
        yield _untyped("nv_inference_exec_count", "Number of model executions performed", ml, execs)
        for name, (_, doc) in TRITON_DURATIONS.items():
            yield _untyped(name, doc, ml, durations.get(name, 0.0))
        if pending is not None:
            g = GaugeMetricFamily("nv_inference_pending_request_count",
                                  "Instantaneous number of pending requests awaiting execution per-model.",
                                  labels=list(ml))
            g.add_metric(list(ml.values()), pending)
            yield g

        yield from self._telemetry(newest, readings)
        c = CounterMetricFamily("aurora_sampler_cpu_seconds", "CPU time used by the telemetry sampler's threads")
        c.add_metric([], cpu_s)
        yield c
        ev = CounterMetricFamily("aurora_events", "Hardware and sampler events (Xid, GPU lost, sampler errors)",
                                 labels=["source", "kind"])
        for (src, kind), n in sorted(events.items()):
            ev.add_metric([src, kind], n)
        yield ev

    def _telemetry(self, newest: dict[str, Sample], readings: dict[str, dict[str, float]]):
        exp = self.exp
        gauges: dict[str, GaugeMetricFamily] = {}

        def put(name: str, doc: str, labels: dict[str, str], value: float) -> None:
            g = gauges.get(name)
            if g is None:
                g = gauges[name] = GaugeMetricFamily(name, doc, labels=list(labels))
            g.add_metric(list(labels.values()), value)

        now = now_ns()
        energy = []
        for src, s in sorted(newest.items()):
            v = readings.get(src, {})
            gpu = src.startswith("gpu")
            age = s.values.get("stale_age_s", 0.0) + max(0.0, (now - s.ts_ns) / 1e9)
            put("aurora_telemetry_staleness_seconds", "Age of the newest good telemetry reading, seconds",
                {"source": src}, age)
            for metric, x in v.items():
                if metric in TRITON_GAUGES:
                    name, scale, doc = TRITON_GAUGES[metric]
                    put(name, doc, {"gpu_uuid": exp._gpu_label(src)} if gpu else {}, x * scale)
                if metric.startswith("throttle_frac_"):
                    put("aurora_throttled_fraction", THROTTLE_HELP, {"gpu": src, "reason": metric[len("throttle_frac_"):]}, x)
                elif metric.startswith("cpu_core") and metric.endswith("_util_pct"):
                    put("aurora_cpu_core_util_pct", "Per-core CPU utilization, percent",
                        {"core": metric[len("cpu_core"):-len("_util_pct")]}, x)
                elif metric == "temp_margin_c":
                    put("aurora_temperature_margin_c", "Degrees C below the slowdown threshold", {"gpu": src}, x)
                elif metric == "energy_mj":
                    energy.append((exp._gpu_label(src), x / 1000.0))
                elif metric not in TRITON_GAUGES:
                    put(f"aurora_{metric}", f"Telemetry reading {metric} (units in the name)", {"source": src}, x)
            if gpu and v.get("sm_clock_max_mhz") and "sm_clock_mhz" in v:
                put("aurora_sm_clock_ratio", "SM clock / maximum SM clock", {"gpu": src},
                    v["sm_clock_mhz"] / v["sm_clock_max_mhz"])
        yield from gauges.values()
        if energy:
            m = Metric("nv_energy_consumption", "GPU energy consumption in joules since the driver loaded", "unknown")
            for label, joules in energy:
                m.add_sample("nv_energy_consumption", {"gpu_uuid": label}, joules)
            yield m
