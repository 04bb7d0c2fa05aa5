"""The per-request timing record and the sink protocol that carries it to a recorder.

All timestamps are ``time.monotonic_ns()`` of this process (CLOCK_MONOTONIC): the same clock the
telemetry samplers stamp their samples with, so requests and hardware samples join without
conversion. A stage that did not happen for a request (no H2D copy on the CPU, a request rejected
before batching) keeps 0.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, fields
from typing import Protocol

now_ns = time.monotonic_ns

#: The request the running code works for, -1 for none. ``with pipe.request() as ctx:`` sets it, so that a
#: ``Recorder.span`` opened inside (a feature-store call before the data is ready) is linked to that request.
current_request: contextvars.ContextVar[int] = contextvars.ContextVar("aurora_current_request", default=-1)

#: Stage name -> (start field, end field). The order is the order a request crosses them.
STAGES: dict[str, tuple[str, str]] = {
    "queue": ("enqueue_ns", "batch_closed_ns"),
    "decode": ("decode_start_ns", "decode_end_ns"),
    "preprocess": ("preprocess_start_ns", "preprocess_end_ns"),
    "h2d": ("h2d_start_ns", "h2d_end_ns"),
    "compute": ("compute_start_ns", "compute_end_ns"),
    "d2h": ("compute_end_ns", "d2h_end_ns"),
    "total": ("arrival_ns", "completion_ns"),
}


@dataclass(slots=True)
class RequestRecord:
    """One request's trip through the pipeline. ``status`` is "ok" or the error's ``reason``."""

    request_id: int = 0
    arrival_ns: int = 0          # the caller handed the request to the pipeline
    enqueue_ns: int = 0          # admitted to the batcher queue
    batch_closed_ns: int = 0     # its batch stopped accepting requests
    decode_start_ns: int = 0
    decode_end_ns: int = 0
    preprocess_start_ns: int = 0
    preprocess_end_ns: int = 0
    h2d_start_ns: int = 0
    h2d_end_ns: int = 0
    compute_start_ns: int = 0
    compute_end_ns: int = 0      # on CUDA: derived from CUDA events, mapped onto this clock
    d2h_end_ns: int = 0
    completion_ns: int = 0       # result or error handed back
    batch_id: int = -1
    batch_size: int = 0          # real requests in the batch
    bucket: int = 0              # padded batch shape actually run
    queue_depth: int = 0         # requests waiting when this one arrived
    priority: int = 0
    status: str = "ok"
    device: str = "cpu"

    def stage_ns(self, stage: str) -> int:
        """Duration of ``stage`` (a key of STAGES) in ns, or -1 when the stage did not happen."""
        start, end = STAGES[stage]
        a, b = getattr(self, start), getattr(self, end)
        return b - a if a and b and b >= a else -1

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, f) for f in FIELD_NAMES)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RequestRecord))


@dataclass(slots=True)
class Span:
    """A user span (``with recorder.span("feature_store"):``), e.g. around an external call."""

    name: str
    start_ns: int
    end_ns: int
    request_id: int = -1
    attrs: str = ""  # free-form JSON


class RecordSink(Protocol):
    """Anything that accepts finished records. Called on pipeline threads: must not block."""

    def __call__(self, record: RequestRecord) -> None: ...


@dataclass(slots=True)
class Sample:
    """One telemetry reading: ``values`` holds only the metrics actually read (see docs/CONTRACTS.md)."""

    ts_ns: int
    source: str  # "gpu0", "gpu1", ..., or "cpu"
    values: dict[str, float]


def coverage_cap(ts) -> float:
    """How far back one reading of a cumulative counter (a throttled fraction) reaches: the interval since
    its previous read, but at most twice its series' median spacing, so a gap (between runs, a stale sampler)
    is covered by nothing. ts: the series' sorted timestamps (ns). Follows the sampling period: 0.1 s ticks,
    1 s for costly counters, 10 s for those under ``aurora serve``'s 1 s period."""
    gaps = sorted(b - a for a, b in zip(ts, ts[1:], strict=False))
    if not gaps:
        return 0.0
    mid = len(gaps) // 2
    return float(gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2) * 2


@dataclass(slots=True)
class Event:
    """A discrete hardware or runtime event: an Xid, a GPU lost, a sampler recovery, a config change."""

    ts_ns: int
    source: str
    kind: str  # "xid", "gpu_lost", "sampler_error", ...
    value: float = 0.0
    detail: str = ""
