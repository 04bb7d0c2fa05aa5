"""The run recorder: request records, user spans, telemetry samples and events on one clock, on disk.

Every timestamp is ``time.monotonic_ns()`` of the recording process (``records.now_ns``), so a request
and the GPU sample taken while it ran join without conversion. ``meta.wall_minus_mono_ns`` places a run
on the wall clock, which is how runs from several hosts are lined up.

Request path cost
-----------------
``rec(record)`` only appends the record object to two deques (the ``recent()`` ring and the writer's
pending queue). Converting to rows, histogramming and SQLite all happen on the recorder's own writer
thread, which wakes every ``flush_interval_s``. The pending queues are bounded (``max_pending``); when
the writer falls that far behind, new items are dropped and counted (``meta.dropped``) rather than let
memory grow without limit. ``benchmarks/bench_recorder.py`` measures the sink call.

Run file format (version 1)
---------------------------
One SQLite 3 database, ``run.aurora.sqlite``, written only by the writer thread: journal_mode=WAL and
synchronous=NORMAL while recording (readers see committed batches), switched back to a single
rollback-journal file at close. Tables (all times integer ns on the recorder's monotonic clock):

``meta(key TEXT PRIMARY KEY, value TEXT)``
    value is JSON. Keys always present: ``format`` (1), ``run_id``, ``host``, ``region``, ``label``,
    ``started_wall`` (ISO 8601 UTC), ``wall_minus_mono_ns``, ``gpu`` (list of {index, name, uuid,
    driver} or null when unknown), ``versions`` ({aurora, python, torch, triton, cuda}; null when not
    installed), ``cpu`` ({model, logical_cores}), ``model``, ``config``, ``capabilities``; written at
    close: ``closed_wall``, ``counts`` (rows written per table) and ``dropped`` (items dropped under
    back-pressure). Any key the caller passes in ``meta=`` or ``set_meta`` is stored as well, and a
    caller's value wins over the detected one.
``requests``
    one row per ``records.RequestRecord``, one column per field with the field's name (INTEGER, except
    ``status`` and ``device``, TEXT), in insertion order (``rowid``).
``spans(name TEXT, start_ns INTEGER, end_ns INTEGER, request_id INTEGER, attrs TEXT)``
    user spans; attrs is JSON or "".
``samples(ts_ns INTEGER, source TEXT, metric TEXT, value REAL)``
    telemetry in long format: one row per metric actually read (a missing metric has no row).
``events(ts_ns INTEGER, source TEXT, kind TEXT, value REAL, detail TEXT)``
``histograms(stage TEXT PRIMARY KEY, encoded TEXT)``
    per stage of ``records.STAGES``, an HdrHistogram in its standard compressed base64 form (V2), in
    microseconds, range 1 µs..1 h, 3 significant digits, over the requests with status "ok". Decode
    with ``decode_histogram``; histograms of several hosts merge with ``merge_histograms``.

SQLite was chosen over Parquet because a run file must be readable while it is still being written
(a crashed server still leaves a usable file) and it needs no extra dependency. A request row takes
~85-150 bytes on disk (integers are varints; large uptimes make the ns stamps 8 bytes), so a million
requests is ~100-150 MB. ``tests/test_recorder.py`` streams a scaled-down run and, marked slow, 1M.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram

from .records import FIELD_NAMES, STAGES, Event, RequestRecord, Sample, Span, current_request, now_ns

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILE_NAME = "run.aurora.sqlite"

#: Histogram range: 1 µs .. 1 hour at 3 significant digits (0.1% value error, ~190 KB per histogram raw,
#: a few hundred bytes compressed for typical latency spreads).
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000
HIST_DIGITS = 3

_TEXT_FIELDS = ("status", "device")
_INT_FIELDS = tuple(f for f in FIELD_NAMES if f not in _TEXT_FIELDS)
# Integer columns first, text last, so one SELECT feeds both numpy conversions.
_REQ_COLUMNS = _INT_FIELDS + _TEXT_FIELDS
_get_ints = attrgetter(*_INT_FIELDS)
_get_texts = attrgetter(*_TEXT_FIELDS)
_COL = {name: i for i, name in enumerate(_INT_FIELDS)}


# --------------------------------------------------------------------------------------------------
# Histograms
# --------------------------------------------------------------------------------------------------
def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)


def record_many(hist: HdrHistogram, values_us: np.ndarray) -> None:
    """Record an integer array of values into ``hist`` at once.

    The pure-Python ``record_value`` costs ~2.7 µs a value on this machine, seven stages per request;
    this computes the same counts index in numpy (the formula of ``HdrHistogram._counts_index_for``)
    and adds with bincount. ``tests/test_recorder.py`` checks it against ``record_value``.
    """
    v = np.asarray(values_us, dtype=np.int64)
    v = v[v >= 0]
    if v.size == 0:
        return
    v = np.minimum(v, hist.highest_trackable_value)
    # bit_length(x) == frexp exponent for integers below 2**53.
    bit_len = np.frexp((v | hist.sub_bucket_mask).astype(np.float64))[1].astype(np.int64)
    bucket = bit_len - hist.unit_magnitude - (hist.sub_bucket_half_count_magnitude + 1)
    sub = v >> (bucket + hist.unit_magnitude)
    idx = ((bucket + 1) << hist.sub_bucket_half_count_magnitude) + sub - hist.sub_bucket_half_count
    counts = np.ctypeslib.as_array(hist.counts)
    counts += np.bincount(idx, minlength=hist.counts_len)[: hist.counts_len].astype(counts.dtype)
    hist.total_count += int(v.size)
    hist.min_value = min(hist.min_value, int(v.min()))
    hist.max_value = max(hist.max_value, int(v.max()))


def encode_histogram(hist: HdrHistogram) -> str:
    enc = hist.encode()
    return enc.decode("ascii") if isinstance(enc, bytes) else enc


def decode_histogram(encoded: str | bytes) -> HdrHistogram:
    return HdrHistogram.decode(encoded.encode("ascii") if isinstance(encoded, str) else encoded)


def merge_histograms(hists) -> HdrHistogram:
    """Merge HdrHistograms (objects or encoded strings), e.g. the same stage from several hosts."""
    out = new_histogram()
    for h in hists:
        out.add(decode_histogram(h) if isinstance(h, (str, bytes)) else h)
    return out


# --------------------------------------------------------------------------------------------------
# Metadata detected at start
# --------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpus() -> list[dict] | None:
    """GPU identity from NVML when a driver is present; None (unknown) otherwise, never a guess."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no GPU: identity unknown
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append({"index": i, "name": pynvml.nvmlDeviceGetName(h),
                        "uuid": pynvml.nvmlDeviceGetUUID(h), "driver": driver})
        return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.items()} for g in out]
    except Exception as e:  # a broken NVML must not stop a run from being recorded
        log.info("recorder: GPU identity unavailable: %s", e)
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def default_meta() -> dict:
    mono = now_ns()
    wall = time.time_ns()
    cuda = None
    if "torch" in sys.modules:  # do not import torch just for its CUDA version
        cuda = getattr(sys.modules["torch"].version, "cuda", None)
    return {
        "format": FORMAT_VERSION,
        "run_id": uuid.uuid4().hex,
        "host": os.environ.get("AURORA_HOST") or socket.gethostname(),
        "region": os.environ.get("AURORA_REGION"),
        "label": os.environ.get("AURORA_LABEL"),
        "started_wall": _dt.datetime.fromtimestamp(wall / 1e9, _dt.timezone.utc).isoformat(),
        "wall_minus_mono_ns": wall - mono,
        "gpu": _gpus(),
        "versions": {"aurora": _version("aurora_core"), "python": platform.python_version(),
                     "torch": _version("torch"), "triton": _version("triton"), "cuda": cuda},
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count()},
        "model": None,
        "config": None,
        "capabilities": None,
    }


# --------------------------------------------------------------------------------------------------
# Recorder
# --------------------------------------------------------------------------------------------------
def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix in (".sqlite", ".db"):
        return p
    return p / FILE_NAME


_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS requests ("
    + ", ".join(f"{c} {'TEXT' if c in _TEXT_FIELDS else 'INTEGER'}" for c in _REQ_COLUMNS) + ")",
    "CREATE TABLE IF NOT EXISTS spans (name TEXT, start_ns INTEGER, end_ns INTEGER, request_id INTEGER, attrs TEXT)",
    "CREATE TABLE IF NOT EXISTS samples (ts_ns INTEGER, source TEXT, metric TEXT, value REAL)",
    "CREATE TABLE IF NOT EXISTS events (ts_ns INTEGER, source TEXT, kind TEXT, value REAL, detail TEXT)",
    "CREATE TABLE IF NOT EXISTS histograms (stage TEXT PRIMARY KEY, encoded TEXT)",
]
_INSERT_REQ = f"INSERT INTO requests ({', '.join(_REQ_COLUMNS)}) VALUES ({', '.join('?' * len(_REQ_COLUMNS))})"


class Recorder:
    """Collects request records, spans, samples and events; streams them to a run file.

    path: a directory (the file is ``path/run.aurora.sqlite``), a ``.sqlite`` file, or None to keep
    only the in-memory ring and histograms. An existing file at the path is an error (runs are
    immutable once closed). meta: caller keys, stored as JSON; they override detected values. Put the
    config a deployment changes under ``meta["deployment"]`` and what describes the offered load under
    ``meta["load"]``: diagnose and compare read that split (a change of ``deployment`` is a deployment).

    store: instead of one run file, record always-on into a store root (``aurora_core.store``): segments
    rotated every ``rotate_s`` seconds or ``rotate_bytes`` bytes, and the host's oldest segments removed
    beyond ``max_bytes`` in all or ``max_age_s`` of age. A failed store write (a full disk) costs its batch,
    counted in ``dropped``, ``store_errors`` and ``store_error``; recording goes on in a new segment.
    """

    def __init__(self, path=None, meta: dict | None = None, ring_size: int = 100_000,
                 flush_interval_s: float = 0.05, max_pending: int = 1_000_000, *, store=None,
                 rotate_s: float = 600.0, rotate_bytes: int = 256 << 20, max_bytes: int | None = None,
                 max_age_s: float | None = None):
        self.meta = default_meta()
        self.meta.update(meta or {})
        self._ring: deque[RequestRecord] = deque(maxlen=ring_size)
        self._pending: deque[RequestRecord] = deque()
        self._spans: deque[Span] = deque()
        self._samples: deque[Sample] = deque()
        self._events: deque[Event] = deque()
        self._meta_updates: deque[tuple[str, object]] = deque(self.meta.items())
        self._flush_waiters: deque[threading.Event] = deque()
        self._max_pending = max_pending
        self.dropped = {"requests": 0, "spans": 0, "samples": 0, "events": 0}
        self.counts = {"requests": 0, "spans": 0, "samples": 0, "events": 0}
        self._hists = {stage: new_histogram() for stage in STAGES}
        self._hist_lock = threading.Lock()
        self._interval = flush_interval_s
        self._last_ints: np.ndarray | None = None
        self._wake = threading.Event()
        self._stop = False
        self._closed = False
        self.write_error: BaseException | None = None
        self.path: Path | None = None
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self.path = _resolve(path)
            if self.path.exists():
                raise FileExistsError(f"Recorder: run file {self.path} already exists; pick a new path")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Opened here so a bad path fails in the constructor; used only by the writer thread after.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            for stmt in _SCHEMA:
                self._db.execute(stmt)
        self._store = None
        if store is not None:
            if path is not None:
                raise ValueError("Recorder: pass a run file path or a store root, not both")
            from aurora_core.store.writer import StoreWriter

            self._store = StoreWriter(store, self.meta, rotate_s=rotate_s, rotate_bytes=rotate_bytes,
                                      max_bytes=max_bytes, max_age_s=max_age_s)
            self.path = self._store.root
        self._thread = threading.Thread(target=self._run, name="aurora-recorder", daemon=True)
        self._thread.start()

    # ---- hot path: called on pipeline threads; appends only ------------------------------------
    def __call__(self, record: RequestRecord) -> None:
        self._ring.append(record)
        if len(self._pending) < self._max_pending:
            self._pending.append(record)
        else:
            self.dropped["requests"] += 1

    def add_sample(self, sample: Sample) -> None:
        if len(self._samples) < self._max_pending:
            self._samples.append(sample)
        else:
            self.dropped["samples"] += 1

    def add_event(self, event: Event) -> None:
        if len(self._events) < self._max_pending:
            self._events.append(event)
        else:
            self.dropped["events"] += 1

    def add_span(self, span: Span) -> None:
        if len(self._spans) < self._max_pending:
            self._spans.append(span)
        else:
            self.dropped["spans"] += 1

    def span(self, name: str, request_id: int = -1, **attrs) -> _SpanTimer:
        """``with rec.span("feature_store"):`` times the body as a user span (an external call).
        Exceptions propagate; the span is still recorded, with ``attrs.error`` = the exception type.
        request_id -1: the request of the enclosing ``with pipe.request():`` block, if any (``diagnose``
        apportions only spans linked to a request)."""
        return _SpanTimer(self, name, request_id if request_id >= 0 else current_request.get(), attrs)

    def set_meta(self, key: str, value) -> None:
        json.dumps(value)  # fail at the caller, not on the writer thread
        self.meta[key] = value
        self._meta_updates.append((key, value))

    @property
    def store_errors(self) -> int:
        """Failed store writes so far (each abandoned its segment; ``dropped`` counts the records lost)."""
        return self._store.errors if self._store is not None else 0

    @property
    def store_error(self) -> BaseException | None:
        """The last failed store write, if any."""
        return self._store.last_error if self._store is not None else None

    # ---- queries ---------------------------------------------------------------------------------
    def recent(self, n: int) -> list[RequestRecord]:
        ring = list(self._ring)
        return ring[-n:] if n > 0 else []

    def flush(self, timeout: float = 30.0) -> None:
        """Block until everything handed in before this call is histogrammed and written."""
        if self._closed:
            return
        done = threading.Event()
        self._flush_waiters.append(done)
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError(f"Recorder.flush: writer did not drain within {timeout} s")

    def histograms(self) -> dict[str, HdrHistogram]:
        """Per stage, an HdrHistogram in µs of the "ok" requests so far (copies; safe to merge)."""
        self.flush()
        with self._hist_lock:
            return {s: decode_histogram(encode_histogram(h)) for s, h in self._hists.items()}

    # ---- writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            waiters = _drain(self._flush_waiters)
            stop = self._stop
            try:
                self._write_batch()
            except BaseException as e:  # keep histogramming; report at close
                if self.write_error is None:
                    log.error("Recorder: writing %s failed: %s", self.path, e)
                    self.write_error = e
                self._db_failed()
            for w in waiters:
                w.set()
            if stop:
                return

    def _store_batch(self, reqs, spans, samples, events, metas) -> None:
        from aurora_core.store.schema import request_columns, rows_batch

        w = self._store
        w.ensure_open()  # the segment's own clock offset places the requests
        batches = {}
        if reqs:
            ints = self._last_ints if self._last_ints is not None else np.array([_get_ints(r) for r in reqs], np.int64)
            batches["requests"] = request_columns(ints, [r.status for r in reqs], [r.device for r in reqs],
                                                  w.wall_minus_mono_ns)
        if spans:
            batches["spans"] = rows_batch("spans", [(s.name, s.start_ns, s.end_ns, s.request_id, s.attrs) for s in spans])
        if samples:
            batches["samples"] = rows_batch("samples", samples)
        if events:
            batches["events"] = rows_batch("events", [(e.ts_ns, e.source, e.kind, float(e.value), e.detail)
                                                      for e in events])
        w.write(batches, dict(metas) if metas else None)

    def _db_failed(self) -> None:
        with contextlib.suppress(Exception):
            if self._db is not None:
                self._db.execute("ROLLBACK")

    def _write_batch(self) -> None:
        reqs = _drain(self._pending)
        spans = _drain(self._spans)
        samples = _drain(self._samples)
        events = _drain(self._events)
        metas = _drain(self._meta_updates)
        self._last_ints = None
        if reqs:
            self._histogram(reqs)
        self.counts["requests"] += len(reqs)
        self.counts["spans"] += len(spans)
        self.counts["events"] += len(events)
        sample_rows = [(s.ts_ns, s.source, k, float(v)) for s in samples for k, v in s.values.items()]
        self.counts["samples"] += len(sample_rows)
        if self._store is not None:
            # Always-on: a failed write costs its batch (counted as dropped; the writer logs it and starts
            # a new segment), never the recording.
            try:
                self._store_batch(reqs, spans, sample_rows, events, metas)
            except Exception as e:
                if e is not self._store.last_error:  # not the writer's own (it counted and logged those)
                    self._store.note_error(e)
                for k, n in (("requests", reqs), ("spans", spans), ("samples", sample_rows), ("events", events)):
                    self.dropped[k] += len(n)
            return
        db = self._db
        if db is None or self.write_error is not None:
            return
        if not (reqs or spans or sample_rows or events or metas):
            return
        db.execute("BEGIN")
        if reqs:
            db.executemany(_INSERT_REQ, [_get_ints(r) + _get_texts(r) for r in reqs])
        if spans:
            db.executemany("INSERT INTO spans VALUES (?, ?, ?, ?, ?)",
                           [(s.name, s.start_ns, s.end_ns, s.request_id, s.attrs) for s in spans])
        if sample_rows:
            db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?)", sample_rows)
        if events:
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                           [(e.ts_ns, e.source, e.kind, float(e.value), e.detail) for e in events])
        if metas:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [(k, json.dumps(v)) for k, v in metas])
        db.execute("COMMIT")

    def _histogram(self, reqs: list[RequestRecord]) -> None:
        # One int64 matrix of every record serves the histograms and the store (built once: it is most of
        # the writer's per-record cost).
        # fromiter over a flat chain: no nested-sequence discovery (~2x np.array on a list of tuples).
        self._last_ints = cols = np.fromiter(itertools.chain.from_iterable(map(_get_ints, reqs)), np.int64,
                                             len(reqs) * len(_INT_FIELDS)).reshape(len(reqs), -1)
        ok = np.fromiter((r.status == "ok" for r in reqs), bool, len(reqs))
        if not ok.any():
            return
        cols = cols[ok]
        with self._hist_lock:
            for stage, (a, b) in STAGES.items():
                start, end = cols[:, _COL[a]], cols[:, _COL[b]]
                valid = (start > 0) & (end > 0) & (end >= start)
                if valid.any():
                    record_many(self._hists[stage], (end[valid] - start[valid]) // 1000)

    # ---- close -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush everything, write histograms and final meta, close the file. Idempotent.

        Raises the first write error, if any, so that an incomplete run file is never silent."""
        if self._closed:
            return
        self._stop = True
        self._wake.set()
        self._thread.join()
        self._closed = True
        if self._store is not None and self.write_error is None:
            # A failure here is the writer's like any other (counted in store_errors, logged), not raised.
            self.meta.update(closed_wall=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                             counts=dict(self.counts), dropped=dict(self.dropped))
            self._store.close({k: self.meta[k] for k in ("closed_wall", "counts", "dropped")})
        if self._db is not None:
            if self.write_error is None:
                try:
                    self._write_final()
                except Exception as e:
                    self.write_error = e
            with contextlib.suppress(Exception):
                # WAL is for reading while writing; a closed run is one plain file (no -wal/-shm to
                # carry along, readable from a read-only directory).
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.close()
        if self.write_error is not None:
            raise RuntimeError(f"Recorder: run file {self.path} is incomplete") from self.write_error

    def _write_final(self) -> None:
        db = self._db
        self.meta.update(closed_wall=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                         counts=dict(self.counts), dropped=dict(self.dropped))
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO histograms VALUES (?, ?)",
                       [(s, encode_histogram(h)) for s, h in self._hists.items()])
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                       [(k, json.dumps(self.meta[k])) for k in ("closed_wall", "counts", "dropped")])
        db.execute("COMMIT")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a forgotten close still stops the thread
        with contextlib.suppress(Exception):
            if not self._closed:
                self._stop = True
                self._wake.set()


class _SpanTimer:
    # A plain class, not @contextmanager: the generator version costs several µs more per span.
    __slots__ = ("rec", "name", "request_id", "attrs", "start")

    def __init__(self, rec: Recorder, name: str, request_id: int, attrs: dict):
        self.rec, self.name, self.request_id, self.attrs = rec, name, request_id, attrs

    def __enter__(self) -> _SpanTimer:
        self.start = now_ns()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        end = now_ns()
        if exc_type is not None:
            self.attrs["error"] = exc_type.__name__
        attrs = json.dumps(self.attrs) if self.attrs else ""
        self.rec.add_span(Span(self.name, self.start, end, self.request_id, attrs))


def _drain(q: deque) -> list:
    out = []
    pop = q.popleft
    with contextlib.suppress(IndexError):
        while True:
            out.append(pop())
    return out


# --------------------------------------------------------------------------------------------------
# Reading a run back
# --------------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """A run file in numpy arrays. Times are ns on the run's own monotonic clock.

    requests: field name -> array (int64; ``status``/``device`` as str arrays), in record order.
    spans: ``name`` (str), ``start_ns``, ``end_ns``, ``request_id`` (int64), ``attrs`` (str).
    samples: (source, metric) -> (ts_ns int64, value float64), sorted by time.
    events: ``ts_ns``, ``source``, ``kind``, ``value``, ``detail``.
    histograms: stage -> encoded HdrHistogram (µs), as written at close (empty if never closed).
    """

    path: Path
    meta: dict
    requests: dict[str, np.ndarray]
    spans: dict[str, np.ndarray]
    samples: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
    events: dict[str, np.ndarray]
    histograms: dict[str, str] = field(default_factory=dict)

    @property
    def n_requests(self) -> int:
        return int(self.requests["request_id"].size)

    def stage_ns(self, stage: str) -> np.ndarray:
        """Per request, the duration of ``stage`` in ns, -1 where it did not happen (as ``RequestRecord.stage_ns``)."""
        a, b = STAGES[stage]
        start, end = self.requests[a], self.requests[b]
        return np.where((start > 0) & (end > 0) & (end >= start), end - start, -1)

    def sample(self, source: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.samples.get((source, metric))

    def sources(self) -> list[str]:
        return sorted({s for s, _ in self.samples})

    def histogram(self, stage: str) -> HdrHistogram:
        return decode_histogram(self.histograms[stage])

    @property
    def wall_minus_mono_ns(self) -> int:
        return int(self.meta.get("wall_minus_mono_ns") or 0)

    @property
    def name(self) -> str:
        """Short human name: host/region/label where known."""
        parts = [str(self.meta[k]) for k in ("host", "region", "label") if self.meta.get(k)]
        return "/".join(parts) or str(self.path)


def find_run_file(path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / FILE_NAME
    if not p.exists():
        raise FileNotFoundError(f"load_run: no run file at {p} (expected a directory holding {FILE_NAME} or the file)")
    return p


def load_run(path) -> RunData:
    """Read a run file (a directory holding ``run.aurora.sqlite``, or the file itself), or a store root of
    one host / one host's directory (``aurora_core.store.reader.load_store_run``). Raises
    FileNotFoundError when there is none, ValueError when the file is not a readable run file."""
    from aurora_core.store.reader import is_host_dir, is_store, load_store_run

    if not (Path(path) / FILE_NAME).exists() and (is_store(path) or is_host_dir(path)):
        return load_store_run(path)
    p = find_run_file(path)
    try:
        return _read_run(p)
    except (sqlite3.DatabaseError, _Corrupt) as e:
        raise ValueError(f"load_run: {p} is not a readable aurora run file ({e})") from e


class _Corrupt(Exception):
    """The database opened but its content is not what the recorder writes (load_run adds the path)."""


def _array(rows: list, dtype, table: str, names: tuple[str, ...]) -> np.ndarray:
    """rows (tuples, one value per name) as a 2-D array. A cell numpy cannot convert (a NULL in an integer
    column, text) is named; a NULL in a float column is NaN, which is how SQLite stores a NaN."""
    try:
        return np.array(rows, dtype=dtype).reshape(len(rows), len(names))
    except (TypeError, ValueError, OverflowError):
        for i, row in enumerate(rows):
            for name, v in zip(names, row, strict=True):
                try:
                    np.array([v], dtype=dtype)
                except (TypeError, ValueError, OverflowError):
                    kind = "an integer" if np.issubdtype(dtype, np.integer) else "a number"
                    raise _Corrupt(f"{table}.{name} holds {'NULL' if v is None else repr(v)} in row {i + 1}, "
                                   f"expected {kind}") from None
        raise


def _read_run(p: Path) -> RunData:
    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        meta = {}
        for k, v in db.execute("SELECT key, value FROM meta"):
            try:
                meta[k] = json.loads(v)
            except (TypeError, ValueError) as e:
                raise _Corrupt(f"meta {k!r} is not JSON: {e}") from None
        rows = db.execute(f"SELECT {', '.join(_REQ_COLUMNS)} FROM requests ORDER BY rowid").fetchall()
        n_int = len(_INT_FIELDS)
        ints = _array([r[:n_int] for r in rows], np.int64, "requests", _INT_FIELDS)
        texts = np.array([r[n_int:] for r in rows], dtype=str).reshape(len(rows), len(_TEXT_FIELDS))
        del rows
        requests = {name: ints[:, i].copy() for i, name in enumerate(_INT_FIELDS)}
        requests.update({name: texts[:, i].copy() for i, name in enumerate(_TEXT_FIELDS)})

        sp = db.execute("SELECT name, start_ns, end_ns, request_id, attrs FROM spans ORDER BY start_ns").fetchall()
        span_ints = _array([r[1:4] for r in sp], np.int64, "spans", ("start_ns", "end_ns", "request_id"))
        spans = {
            "name": np.array([r[0] for r in sp], dtype=str),
            "start_ns": span_ints[:, 0],
            "end_ns": span_ints[:, 1],
            "request_id": span_ints[:, 2],
            "attrs": np.array([r[4] for r in sp], dtype=str),
        }

        grouped: dict[tuple[str, str], list] = {}
        for source, metric, ts, value in db.execute("SELECT source, metric, ts_ns, value FROM samples"):
            grouped.setdefault((source, metric), []).append((ts, value))
        samples: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for key, pts in grouped.items():
            ts = _array([p[:1] for p in pts], np.int64, f"samples ({key[0]}, {key[1]})", ("ts_ns",))[:, 0]
            value = _array([p[1:] for p in pts], np.float64, f"samples ({key[0]}, {key[1]})", ("value",))[:, 0]
            order = np.lexsort((value, ts))
            samples[key] = (ts[order], value[order])

        ev = db.execute("SELECT ts_ns, source, kind, value, detail FROM events ORDER BY ts_ns").fetchall()
        events = {
            "ts_ns": _array([r[:1] for r in ev], np.int64, "events", ("ts_ns",))[:, 0],
            "source": np.array([r[1] for r in ev], dtype=str),
            "kind": np.array([r[2] for r in ev], dtype=str),
            "value": _array([r[3:4] for r in ev], np.float64, "events", ("value",))[:, 0],
            "detail": np.array([r[4] for r in ev], dtype=str),
        }
        hists = dict(db.execute("SELECT stage, encoded FROM histograms").fetchall())
    finally:
        db.close()
    return RunData(p, meta, requests, spans, samples, events, hists)
