"""``TelemetrySampler``: runs the CPU and NVML backends on daemon threads, off every request path.

Threads (all daemons):

* ``aurora-telemetry``: every period reads the CPU backend and acts as the watchdog of the GPU
  poller. When the poller has not finished a tick for ``stale_after_s`` it publishes stale GPU samples
  (only ``stale_age_s``); after ``hang_timeout_s`` it abandons the poller (a hung NVML call cannot be
  interrupted) and starts a fresh one, which re-initialises NVML. The abandoned thread exits, without
  publishing, whenever its call returns. At most MAX_ABANDONED pollers are left stuck at a time.
* ``aurora-nvml``: ``NvmlBackend.tick()`` every period; NVML errors become stale samples + re-init
  with backoff inside the backend.
* ``aurora-nvml-events``: Xid and other critical events, ``nvmlEventSetWait_v2`` with a 500 ms timeout.

Callbacks receive ``records.Sample`` / ``records.Event`` on these threads; they must not block (a
``Recorder`` and the Prometheus exporter do not). A callback that raises is counted and skipped.
``stop()`` returns within about ``join_timeout_s`` per thread even while an NVML call hangs.
Every sample carries ``sampler_cpu_s``: CPU seconds used so far by the sampler's own threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from aurora_core.records import Event, Sample, now_ns
from aurora_core.telemetry.cpu import CpuBackend

MIN_BURST_PERIOD_S = 0.01
MAX_BURST_S = 10.0
MAX_ABANDONED = 3  # pollers left stuck in hung NVML calls before the watchdog stops restarting


class TelemetrySampler:
    """Samples hardware telemetry in the background.

    callbacks: called with each ``Sample``; event_callbacks: with each ``Event``.
    period_s: sampling period in seconds (default 0.1 s, 10 Hz).
    gpu: True (sample NVML, retrying until it works), False, or "auto" (only when NVML initialises).
    cpu: sample the host and this process.
    nvml_api: the nvml API object (default the ``pynvml`` module; a ``replay.ReplayNvml`` or
    ``replay.RecordingNvml`` to replay or record a trace). Giving one implies gpu=True under "auto".
    """

    def __init__(self, callbacks: Iterable[Callable[[Sample], None]] = (),
                 event_callbacks: Iterable[Callable[[Event], None]] = (), period_s: float = 0.1,
                 gpu: bool | str = "auto", cpu: bool = True, nvml_api=None, events: bool = True,
                 hang_timeout_s: float = 5.0, stale_after_s: float | None = None, join_timeout_s: float = 1.0):
        if period_s <= 0:
            raise ValueError(f"TelemetrySampler: period_s must be > 0 seconds, got {period_s}")
        self.callbacks = list(callbacks)
        self.event_callbacks = list(event_callbacks)
        self.period_s = period_s
        self.gpu, self.cpu, self.events = gpu, cpu, events
        self.nvml_api = nvml_api
        self.hang_timeout_s = hang_timeout_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else max(3 * period_s, 1.0)
        self.join_timeout_s = join_timeout_s
        self.callback_errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latest: dict[str, Sample] = {}
        self._threads: list[threading.Thread] = []
        self._cpu_backend: CpuBackend | None = None
        self._gpu_caps: dict = {}
        self._gpu_missing: dict[str, str] = {}
        self._event_missing: dict[str, str] = {}
        self._gpu_gen = 0
        self._gpu_thread: threading.Thread | None = None
        self._abandoned: list[threading.Thread] = []  # pollers stuck in a hung call
        self._gpu_heartbeat_ns = 0
        self._gpu_last_good_ns: int | None = None
        self._gpu_sources: list[str] = []
        self._thread_cpu: dict[str, float] = {}
        self._burst_until = 0.0
        self._burst_period = period_s
        self._started = False

    # -- public --------------------------------------------------------------------------------------
    def start(self) -> TelemetrySampler:
        if self._started:
            return self
        self._started = True
        self._stop.clear()
        if self.cpu:
            self._cpu_backend = CpuBackend()
        api = self._resolve_gpu()
        if api is not None:
            self._api = api
            self._start_gpu_poller()
            if self.events:
                self._spawn("aurora-nvml-events", self._event_loop)
        self._spawn("aurora-telemetry", self._main_loop)
        return self

    def stop(self) -> None:
        """Stop sampling. Bounded: a thread stuck in a hung NVML call is left behind (it is a daemon)."""
        self._stop.set()
        deadline = time.monotonic() + self.join_timeout_s
        for t in self._threads:
            if t is not threading.current_thread() and t not in self._abandoned:
                t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        self._started = False

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def burst(self, period_s: float = 0.01, duration_s: float = 2.0) -> None:
        """Sample faster for a while (e.g. around a latency spike). Bounded: period >= 10 ms, <= 10 s."""
        self._burst_period = max(MIN_BURST_PERIOD_S, period_s)
        self._burst_until = time.monotonic() + min(MAX_BURST_S, max(0.0, duration_s))

    def latest(self) -> dict[str, Sample]:
        """Newest sample per source, for /metrics and /readyz. GPU entries carry the current staleness."""
        with self._lock:
            out = {k: Sample(s.ts_ns, s.source, dict(s.values)) for k, s in self._latest.items()}
        now = now_ns()
        for src in self._gpu_sources:
            if src in out:
                since = self._gpu_last_good_ns or out[src].ts_ns
                out[src].values["stale_age_s"] = max(0.0, (now - since) / 1e9)
        return out

    def capabilities(self) -> dict:
        """For the run's meta: per source what is read and how, plus ``missing``."""
        caps: dict = {"period_s": self.period_s, "gpu": self._gpu_caps, "missing": self.missing()}
        if self._cpu_backend is not None:
            caps["cpu"] = self._cpu_backend.capabilities()
        return caps

    def missing(self) -> dict[str, str]:
        """Flat ``{"source.metric": reason}`` of everything that could not be read."""
        out = dict(self._gpu_missing)
        out.update(self._event_missing)
        if self._cpu_backend is not None:
            out.update({f"cpu.{k}": r for k, r in self._cpu_backend.missing.items()})
        return out

    @property
    def sampler_cpu_s(self) -> float:
        """CPU seconds used by the sampler's threads so far (their thread CPU time)."""
        return sum(self._thread_cpu.values())

    # -- internals ---------------------------------------------------------------------------------
    def _period(self) -> float:
        return self._burst_period if time.monotonic() < self._burst_until else self.period_s

    def _spawn(self, name: str, target, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _resolve_gpu(self):
        if self.gpu is False:
            return None
        if self.nvml_api is not None:
            return self.nvml_api
        try:
            import pynvml
        except ImportError as exc:
            self._gpu_missing["gpu"] = f"pynvml not importable: {exc}"
            return None
        if self.gpu == "auto":
            try:
                pynvml.nvmlInit()
                pynvml.nvmlShutdown()
            except Exception as exc:  # no driver, no library, no GPU: CPU telemetry only
                from aurora_core.telemetry.nvml import nvml_error_text

                self._gpu_missing["gpu"] = f"NVML unavailable: {nvml_error_text(exc)}"
                return None
        return pynvml

    def _publish(self, samples: Iterable[Sample] = (), events: Iterable[Event] = ()) -> None:
        for s in samples:
            with self._lock:
                self._latest[s.source] = s
            for cb in self.callbacks:
                try:
                    cb(s)
                except Exception:  # a broken consumer must not stop telemetry
                    self.callback_errors += 1
        for e in events:
            for cb in self.event_callbacks:
                try:
                    cb(e)
                except Exception:
                    self.callback_errors += 1

    def _account(self, name: str) -> float:
        self._thread_cpu[name] = time.thread_time()
        return self.sampler_cpu_s

    def _main_loop(self) -> None:
        name = threading.current_thread().name
        while not self._stop.is_set():
            if self._cpu_backend is not None:
                s = self._cpu_backend.tick()
                s.values["sampler_cpu_s"] = self._account(name)
                self._publish([s], self._cpu_backend.drain_events())
            self._watchdog()
            self._account(name)
            self._stop.wait(self._period())

    def _start_gpu_poller(self) -> None:
        self._gpu_gen += 1
        self._gpu_heartbeat_ns = now_ns()
        self._gpu_thread = self._spawn(f"aurora-nvml-{self._gpu_gen}", self._gpu_loop, self._gpu_gen)

    def _gpu_loop(self, gen: int) -> None:
        from aurora_core.telemetry.nvml import NvmlBackend

        name = threading.current_thread().name
        backend = NvmlBackend(self._api)
        try:
            while not self._stop.is_set() and gen == self._gpu_gen:
                samples = backend.tick()
                if gen != self._gpu_gen:
                    return  # abandoned while a call hung: a newer poller owns the output now
                self._gpu_heartbeat_ns = now_ns()
                cpu_s = self._account(name)
                if backend.healthy:
                    self._gpu_last_good_ns = self._gpu_heartbeat_ns  # this clock, even when replaying
                    self._gpu_sources = [s.source for s in samples]
                    self._gpu_caps = backend.capabilities()
                    self._gpu_missing = backend.missing()
                elif backend.error:
                    self._gpu_missing = {**backend.missing(), "gpu": backend.error}
                for s in samples:
                    s.values["sampler_cpu_s"] = cpu_s
                self._publish(samples, backend.drain_events())
                self._stop.wait(self._period())
        finally:
            if gen == self._gpu_gen:
                backend.shutdown()

    def _watchdog(self) -> None:
        if self._gpu_thread is None:
            return
        now = now_ns()
        silent_s = (now - self._gpu_heartbeat_ns) / 1e9
        if silent_s < self.stale_after_s:
            return
        since = self._gpu_last_good_ns or self._gpu_heartbeat_ns
        age = (now - since) / 1e9
        self._publish([Sample(now, src, {"stale_age_s": age}) for src in (self._gpu_sources or ["gpu0"])])
        if silent_s >= self.hang_timeout_s:
            self._abandoned = [t for t in self._abandoned if t.is_alive()]
            if len(self._abandoned) >= MAX_ABANDONED:
                return  # NVML is wedged: more threads would only pile up in it; stay stale until one returns
            self._publish(events=[Event(now, "gpu", "sampler_error", silent_s,
                                        f"NVML call blocked for {silent_s:.1f} s; poller restarted")])
            self._abandoned.append(self._gpu_thread)
            self._start_gpu_poller()

    def _event_loop(self) -> None:
        from aurora_core.telemetry.nvml import NvmlEventWatcher, nvml_error_text

        name = threading.current_thread().name
        watcher = NvmlEventWatcher(self._api)
        backoff = 1.0
        while not self._stop.is_set():
            try:
                t0 = time.monotonic()
                evs = watcher.poll(500)
                backoff = 1.0
                self._event_missing = dict(watcher.missing)
                if not watcher.sets:
                    self._stop.wait(5.0)  # nothing to wait on: do not spin
                elif not evs and time.monotonic() - t0 < 0.05:
                    self._stop.wait(0.5)  # a wait that returned at once (replay, a broken driver): do not spin
                self._publish(events=evs)
            except Exception as exc:
                self._event_missing = {"gpu.events": nvml_error_text(exc)}
                self._publish(events=[Event(now_ns(), "gpu", "sampler_error", 0.0, f"events: {nvml_error_text(exc)}")])
                watcher.close()
                watcher = NvmlEventWatcher(self._api)
                self._stop.wait(backoff)
                backoff = min(30.0, backoff * 2)
            self._account(name)
        watcher.close()
