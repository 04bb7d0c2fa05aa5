"""The dynamic batcher: admission, priority queues, and the rule that closes a batch.

A batch closes when it holds ``max_batch_size`` requests, or when ``max_queue_delay_us`` has passed
since the oldest waiting request was enqueued (the timer starts when the first request of a batch
arrives), or at once while the batcher drains on close. Requests whose deadline has passed or whose
future was cancelled are taken out when a batch forms, or when they fill the queue that a new request
needs, and handed to ``on_drop``: they are never computed, and never cost a live request its admission.
Higher ``priority`` values are served first; FIFO within a level.

The batcher knows nothing about models or images; ``Request`` only carries what the policy needs
plus opaque fields that the pipeline fills in.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from aurora_core.errors import Overloaded, PipelineClosed
from aurora_core.records import RequestRecord, now_ns

#: upper bounds of BatchingConfig. A longer delay is not batching any more (and past threading.TIMEOUT_MAX,
#: ~292 years, a batch worker's wait raises OverflowError); the batch size sizes every worker's slab, and
#: a batch of 65,536 224x224 images is already 20 GB in float16; every batch scans every priority level.
MAX_QUEUE_DELAY_US = 60_000_000
MAX_BATCH_SIZE = 65_536
MAX_PRIORITY_LEVELS = 256


@dataclass(frozen=True)
class BatchingConfig:
    """Queue policy of a Pipeline.

    max_batch_size: most requests in one model call, 1 .. MAX_BATCH_SIZE (65,536).
    max_queue_delay_us: how long the first request of a batch may wait for company, 0 .. MAX_QUEUE_DELAY_US
        (60 s).
    bucket_sizes: padded batch shapes (ascending); a batch of n runs at the smallest bucket >= n.
        None means powers of two up to max_batch_size. max_batch_size is always a bucket.
    max_queue_size: waiting requests past which a new one is rejected with Overloaded (no upper bound:
        it is only compared). Cancelled and expired requests are dropped first to make room.
    priority_levels: priorities are 0 (default, lowest) .. priority_levels - 1 (served first);
        2 .. MAX_PRIORITY_LEVELS (256).
    """

    max_batch_size: int = 16
    max_queue_delay_us: int = 2000
    bucket_sizes: tuple[int, ...] | None = None
    max_queue_size: int = 256
    priority_levels: int = 2

    def __post_init__(self):
        def _int(name, lo, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                want = f">= {lo}" if hi is None else f"in [{lo}, {hi:,}]"
                raise ValueError(f"BatchingConfig: {name} must be an int {want}, got {v!r}")

        _int("max_batch_size", 1, MAX_BATCH_SIZE)
        _int("max_queue_delay_us", 0, MAX_QUEUE_DELAY_US)
        _int("max_queue_size", 1)
        _int("priority_levels", 2, MAX_PRIORITY_LEVELS)
        if self.bucket_sizes is None:
            b, buckets = 1, []
            while b < self.max_batch_size:
                buckets.append(b)
                b *= 2
            buckets.append(self.max_batch_size)
        else:
            buckets = list(self.bucket_sizes)
            if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
                raise ValueError(f"BatchingConfig: bucket_sizes must be positive ints, got {self.bucket_sizes!r}")
            if buckets != sorted(set(buckets)):
                raise ValueError(f"BatchingConfig: bucket_sizes must be strictly ascending, got {self.bucket_sizes!r}")
            if buckets[-1] > self.max_batch_size:
                raise ValueError(
                    f"BatchingConfig: bucket {buckets[-1]} exceeds max_batch_size={self.max_batch_size}; "
                    "raise max_batch_size or drop the bucket"
                )
            if buckets[-1] != self.max_batch_size:
                buckets.append(self.max_batch_size)
        object.__setattr__(self, "bucket_sizes", tuple(buckets))

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds n requests (1 <= n <= max_batch_size)."""
        for b in self.bucket_sizes:
            if b >= n:
                return b
        raise ValueError(f"BatchingConfig.bucket_for: n={n} exceeds max_batch_size={self.max_batch_size}")


class Request:
    """One admitted request. ``data`` is bytes or a uint8 [H, W, 3] array; ``deadline_ns`` 0 = none."""

    __slots__ = ("data", "priority", "deadline_ns", "future", "record", "image", "orig_size", "scale", "slot",
                 "decoding", "error", "route")

    def __init__(self, data, priority: int, deadline_ns: int, future: Future, record: RequestRecord):
        self.data = data
        self.priority = priority
        self.deadline_ns = deadline_ns
        self.future = future
        self.record = record
        self.image = None      # decoded uint8 [H, W, 3], filled by the pipeline's workers
        self.orig_size = None
        self.scale = 1
        self.slot = -1         # row of the batch buffer, -1 until preprocessed
        self.decoding = None   # Future of a decode started at admission, if any
        self.error = None      # the exception that ended it before compute, if any
        self.route = None      # with gpu_decode: GpuDecoder.route(data), parsed once at admission


#: reasons given to on_drop
DEADLINE = "deadline_exceeded"
CANCELLED = "cancelled"


class Batcher:
    """Thread-safe priority queue that hands out closed batches, numbered in the order they close
    (``record.batch_id``), to any number of consumer threads.

    clock: ns clock (injectable for tests of the delay rule through ``poll``).
    on_drop(request, reason): called outside the lock, once per request dropped (at batch formation, or by
        a put() that found the queue full).
    """

    def __init__(self, config: BatchingConfig, *, clock: Callable[[], int] = now_ns,
                 on_drop: Callable[[Request, str], None] | None = None):
        self.config = config
        self._clock = clock
        self._on_drop = on_drop or (lambda r, why: None)
        self._queues = [deque() for _ in range(config.priority_levels)]
        self._size = 0
        self.admitted = 0  # requests ever admitted; counted here, under the lock put() holds anyway
        self._closed = False
        self._cond = threading.Condition(threading.Lock())
        self._delay_ns = config.max_queue_delay_us * 1000
        self.batches = 0  # batches handed out; a batch's id is its index in this order
        self._idle = 0  # consumers waiting in next_batch
        self._timer_held = False  # an idle consumer waits for the forming batch's deadline
        self._sweep_after = 0  # clock time before which a full queue is not swept again

    def __len__(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, req: Request) -> None:
        """Admit ``req`` (stamps enqueue_ns and queue_depth) or raise Overloaded / PipelineClosed."""
        dropped = ()
        with self._cond:
            if self._closed:
                raise PipelineClosed("Pipeline: closed; no new requests are admitted")
            if self._size >= self.config.max_queue_size:
                # A burst of client disconnects or expired deadlines must not answer live requests with 503s.
                # Only a full queue is swept, and a sweep is O(queue) under the lock: under sustained overload
                # every put finds the queue full, and a sweep each made a rejection ~100x dearer (3.5 -> 308 us
                # with 256 waiting, busy dev box). So sweeps take at most about a tenth of the time.
                now = self._clock()
                if now >= self._sweep_after:
                    dropped = self._sweep_locked(now)
                    end = self._clock()
                    # Capped at 1 ms: a sweep stretched by a GC pause or a lost GIL must not leave dead
                    # requests turning live ones away for a second.
                    self._sweep_after = end + min(10 * (end - now), 1_000_000)
            depth = self._size
            req.record.queue_depth = depth
            if depth >= self.config.max_queue_size:
                raise Overloaded(f"Pipeline: queue full ({depth} waiting, max_queue_size={self.config.max_queue_size})")
            req.record.enqueue_ns = self._clock()
            self._queues[req.priority].append(req)
            self._size = depth + 1
            self.admitted += 1
            # Wake a consumer only when one waits and has something new to do: start a timer, or close a
            # full batch. Under a saturating load nobody waits, and a notify per request was pure cost.
            if self._idle and (depth == 0 or depth + 1 >= self.config.max_batch_size):
                self._cond.notify()
        if dropped:
            self._report(dropped)

    def close(self) -> None:
        """Stop admitting; waiting requests still form batches, without waiting for the delay."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain_all(self) -> list[Request]:
        """Remove and return every waiting request (used when the device is gone)."""
        with self._cond:
            out = [r for q in self._queues for r in q]
            for q in self._queues:
                q.clear()
            self._size = 0
            return out

    def poll(self, now: int | None = None) -> list[Request] | None:
        """Non-blocking: a closed batch if one is due at ``now``, else None. May return [] when every
        candidate was dropped."""
        now = self._clock() if now is None else now
        with self._cond:
            batch, dropped, _ = self._take_locked(now)
        self._report(dropped)
        return batch

    def next_batch(self, timeout: float | None = None) -> list[Request] | None:
        """Block until a batch is due; None once closed and empty, or when ``timeout`` (s) passes."""
        give_up = None if timeout is None else now_ns() + int(timeout * 1e9)
        while True:
            with self._cond:
                # Every way out hands the timer on, an exception included: a timer holder whose wait raises
                # (KeyboardInterrupt on the main thread), or a consumer that dies after put() woke it,
                # would otherwise leave the others asleep untimed and the waiting requests unbatched until
                # the next put(). Condition.wait re-acquires the lock before it raises.
                try:
                    while True:
                        batch, dropped, due_in = self._take_locked(self._clock())
                        if batch is not None or dropped:
                            break
                        if self._closed and self._size == 0:
                            return None
                        # One idle consumer sleeps until the forming batch is due; the others until notified.
                        # With every idle consumer on the timer, each deadline woke them all to race for one
                        # batch, on the batch's critical path.
                        timer = due_in is not None and not self._timer_held
                        wait_ns = due_in if timer else None
                        if give_up is not None:
                            left = give_up - now_ns()
                            if left <= 0:
                                return None
                            wait_ns = left if wait_ns is None else min(wait_ns, left)
                        self._idle += 1
                        self._timer_held |= timer
                        try:
                            self._cond.wait(None if wait_ns is None else wait_ns / 1e9)
                        finally:
                            self._idle -= 1
                            if timer:
                                self._timer_held = False
                finally:
                    self._hand_over_timer_locked()
            self._report(dropped)
            if batch:
                return batch

    def _hand_over_timer_locked(self) -> None:
        """A consumer leaves while requests wait and nobody times them: wake an idle one to do it."""
        if self._size and self._idle and not self._timer_held:
            self._cond.notify()

    def _take_locked(self, now: int):
        """(batch or None, dropped, ns until due or None)."""
        if self._size == 0:
            return None, [], None
        cfg = self.config
        if self._size < cfg.max_batch_size and not self._closed:
            oldest = min(q[0].record.enqueue_ns for q in self._queues if q)
            due = oldest + self._delay_ns
            if now < due:
                return None, [], due - now
        batch, dropped = [], []
        for q in reversed(self._queues):
            while q and len(batch) < cfg.max_batch_size:
                r = q.popleft()
                self._size -= 1
                # Cancellation first: a cancelled future cannot take a DeadlineExceeded, and one past its
                # deadline is set running here so that it can.
                if not r.future.set_running_or_notify_cancel():
                    dropped.append((r, CANCELLED))
                elif r.deadline_ns and now >= r.deadline_ns:
                    dropped.append((r, DEADLINE))
                else:
                    r.record.batch_closed_ns = now
                    r.record.batch_id = self.batches
                    batch.append(r)
        if batch:
            self.batches += 1
        return batch, dropped, None

    def _sweep_locked(self, now: int) -> list:
        """Take every cancelled or expired request out of the queues; returns them as (request, reason)."""
        dropped = []
        for i, q in enumerate(self._queues):
            dead = [r for r in q if 0 < r.deadline_ns <= now or r.future.cancelled()]
            if not dead:
                continue
            for r in dead:
                # As in _take_locked: the cancelled future is marked notified (concurrent.futures.wait sees it
                # done), an expired one is set running so that its DeadlineExceeded can be set.
                dropped.append((r, DEADLINE if r.future.set_running_or_notify_cancel() else CANCELLED))
            gone = set(dead)
            self._queues[i] = deque(r for r in q if r not in gone)
            self._size -= len(dead)
        return dropped

    def _report(self, dropped) -> None:
        for r, why in dropped:
            self._on_drop(r, why)
