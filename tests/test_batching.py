"""The batcher's queue policy, driven by an injected clock (no sleeps, no timing assertions)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait

import pytest

from aurora_core.batching import CANCELLED, DEADLINE, Batcher, BatchingConfig, Request
from aurora_core.errors import Overloaded, PipelineClosed
from aurora_core.records import RequestRecord

US = 1000


class FakeClock:
    def __init__(self, step=0):
        self.t = 1_000_000
        self.step = step  # ns added after each read

    def __call__(self):
        self.t += self.step
        return self.t - self.step


def make(priority=0, deadline_ns=0, rid=0):
    return Request(b"x", priority, deadline_ns, Future(), RequestRecord(request_id=rid, priority=priority))


def ids(batch):
    return [r.record.request_id for r in batch]


@pytest.mark.parametrize("kwargs", [
    {"max_batch_size": 0}, {"max_batch_size": 2.5}, {"max_queue_delay_us": -1}, {"max_queue_size": 0},
    {"priority_levels": 1}, {"bucket_sizes": ()}, {"bucket_sizes": (4, 2)}, {"bucket_sizes": (1, 1)},
    {"bucket_sizes": (0, 4)}, {"max_batch_size": 4, "bucket_sizes": (2, 8)}, {"max_batch_size": True},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="BatchingConfig"):
        BatchingConfig(**kwargs)


@pytest.mark.parametrize("field, too_big", [
    ("max_queue_delay_us", 60_000_001), ("max_queue_delay_us", 10**16),  # 10**16 us: past threading.TIMEOUT_MAX
    ("max_batch_size", 65_537), ("max_batch_size", 2**70), ("priority_levels", 257), ("priority_levels", 10**7),
])
def test_config_rejects_values_past_the_maximum_naming_the_field(field, too_big):
    """Before, these passed: 10**16 us made every batch worker die with OverflowError in Condition.wait
    (and later requests hang); 2**70 / 10**7 failed later with MemoryError or an allocator error."""
    with pytest.raises(ValueError, match=f"BatchingConfig: {field} must be an int in \\[") as e:
        BatchingConfig(**{field: too_big})
    assert str(too_big) in str(e.value)


def test_config_accepts_the_maxima_and_a_worker_waits_out_the_longest_delay():
    cfg = BatchingConfig(max_queue_delay_us=60_000_000, max_batch_size=65_536, priority_levels=256)
    assert cfg.bucket_sizes[-1] == 65_536
    b = Batcher(BatchingConfig(max_queue_delay_us=60_000_000, max_batch_size=8))
    got = []
    t = _consumer(b, got)
    _wait_idle(b, 1)
    b.put(make(rid=1))  # the worker now waits 60 s for the batch (the wait a huge delay overflowed)
    _wait_for(lambda: b._timer_held, "the worker on the batch's timer")
    b.close()  # flushes at once
    t.join(5)
    assert [ids(x) for x in got] == [[1]]


def test_config_buckets():
    assert BatchingConfig(max_batch_size=16).bucket_sizes == (1, 2, 4, 8, 16)
    assert BatchingConfig(max_batch_size=12).bucket_sizes == (1, 2, 4, 8, 12)
    assert BatchingConfig(max_batch_size=1).bucket_sizes == (1,)
    c = BatchingConfig(max_batch_size=8, bucket_sizes=(2, 6))
    assert c.bucket_sizes == (2, 6, 8)
    assert [c.bucket_for(n) for n in range(1, 9)] == [2, 2, 6, 6, 6, 6, 8, 8]
    with pytest.raises(ValueError):
        c.bucket_for(9)


def test_delay_timer_starts_at_first_request():
    clk = FakeClock()
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=1000), clock=clk)
    t0 = clk.t
    b.put(make(rid=1))
    clk.t = t0 + 600 * US
    b.put(make(rid=2))
    clk.t = t0 + 999 * US
    assert b.poll() is None
    clk.t = t0 + 1000 * US
    batch = b.poll()
    assert ids(batch) == [1, 2]
    assert all(r.record.batch_closed_ns == clk.t for r in batch)
    assert len(b) == 0 and b.poll() is None


def test_full_batch_closes_without_waiting_and_leftover_keeps_its_timer():
    clk = FakeClock()
    b = Batcher(BatchingConfig(max_batch_size=4, max_queue_delay_us=1000), clock=clk)
    t0 = clk.t
    for i in range(6):
        b.put(make(rid=i))
    assert ids(b.poll()) == [0, 1, 2, 3]
    # The two left over arrived at t0: their batch is due at t0 + delay, not later.
    assert b.poll() is None
    clk.t = t0 + 1000 * US
    assert ids(b.poll()) == [4, 5]


def test_zero_delay_closes_at_once():
    clk = FakeClock()
    b = Batcher(BatchingConfig(max_batch_size=4, max_queue_delay_us=0), clock=clk)
    b.put(make(rid=7))
    assert ids(b.poll()) == [7]


def test_priorities_higher_first_fifo_within_level():
    clk = FakeClock()
    b = Batcher(BatchingConfig(max_batch_size=4, max_queue_delay_us=0, priority_levels=3), clock=clk)
    for rid, prio in [(0, 0), (1, 0), (2, 1), (3, 0), (4, 2), (5, 1), (6, 2)]:
        b.put(make(prio, rid=rid))
    assert ids(b.poll()) == [4, 6, 2, 5]
    assert ids(b.poll()) == [0, 1, 3]


def test_deadline_and_cancellation_drop_at_formation():
    clk = FakeClock()
    dropped = []
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=100), clock=clk,
                on_drop=lambda r, why: dropped.append((r.record.request_id, why)))
    t0 = clk.t
    b.put(make(rid=0, deadline_ns=t0 + 50 * US))
    b.put(make(rid=1, deadline_ns=t0 + 500 * US))
    cancelled = make(rid=2)
    b.put(cancelled)
    b.put(make(rid=3))
    assert cancelled.future.cancel()
    clk.t = t0 + 100 * US
    batch = b.poll()
    assert ids(batch) == [1, 3]
    assert sorted(dropped) == [(0, DEADLINE), (2, CANCELLED)]
    assert all(r.future.running() for r in batch)  # no longer cancellable: it will be computed


def test_a_cancelled_request_past_its_deadline_is_dropped_as_cancelled():
    """Both at once (asyncio.wait_for cancels near the deadline): reported as cancelled, and a request
    dropped for its deadline is running, so the pipeline can set its DeadlineExceeded."""
    clk = FakeClock()
    dropped = []
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=100), clock=clk,
                on_drop=lambda r, why: dropped.append((r, why)))
    both, late = make(rid=0, deadline_ns=clk.t + 50 * US), make(rid=1, deadline_ns=clk.t + 50 * US)
    for r in (both, late, make(rid=2)):
        b.put(r)
    assert both.future.cancel()
    clk.t += 100 * US
    assert ids(b.poll()) == [2]
    assert [(r.record.request_id, why) for r, why in dropped] == [(0, CANCELLED), (1, DEADLINE)]
    assert late.future.running()


def test_all_dropped_gives_empty_batch():
    clk = FakeClock()
    b = Batcher(BatchingConfig(max_batch_size=2, max_queue_delay_us=0), clock=clk)
    r = make()
    b.put(r)
    r.future.cancel()
    assert b.poll() == []


def test_batches_are_numbered_in_the_order_they_close():
    clk = FakeClock()
    b = Batcher(BatchingConfig(max_batch_size=2, max_queue_delay_us=0), clock=clk)
    reqs = [make(rid=i) for i in range(5)]
    for r in reqs[:3]:
        b.put(r)
    reqs[1].future.cancel()
    assert ids(b.poll()) == [0, 2]
    b.put(reqs[3])
    reqs[3].future.cancel()
    assert b.poll() == []
    b.put(reqs[4])
    assert ids(b.poll()) == [4]
    # A batch whose every request was dropped is no batch: it takes no number.
    assert [r.record.batch_id for r in reqs] == [0, -1, 0, -1, 1]
    assert b.batches == 2


def test_overload_and_queue_depth():
    clk = FakeClock()
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_size=3), clock=clk)
    reqs = [make(rid=i) for i in range(5)]
    admitted = rejected = 0
    for r in reqs:
        try:
            b.put(r)
            admitted += 1
        except Overloaded:
            rejected += 1
    assert (admitted, rejected) == (3, 2)
    assert [r.record.queue_depth for r in reqs] == [0, 1, 2, 3, 3]
    assert [r.record.enqueue_ns != 0 for r in reqs] == [True] * 3 + [False] * 2
    assert len(b) == 3


def _queue_of_4(clk, reqs, dropped):
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=1000, max_queue_size=4, priority_levels=3),
                clock=clk, on_drop=lambda r, why: dropped.append((r, why)))
    for r in reqs:
        b.put(r)
    assert len(b) == len(reqs)
    return b


def test_cancelled_requests_give_their_queue_slots_to_new_ones():
    """Before, 4 cancelled requests in a queue of 4 made the next submit fail with Overloaded until a batch
    formed (spurious 503s after a burst of client disconnects)."""
    clk, dropped = FakeClock(), []
    reqs = [make(priority=i % 3, rid=i) for i in range(4)]
    b = _queue_of_4(clk, reqs, dropped)
    for i in (0, 2, 3):
        assert reqs[i].future.cancel()
    new = make(priority=1, rid=9)
    b.put(new)  # no Overloaded
    assert [(r.record.request_id, why) for r, why in dropped] == [(0, CANCELLED), (3, CANCELLED), (2, CANCELLED)]
    assert new.record.queue_depth == 1 and len(b) == 2
    # Marked notified, as a batch formation does: concurrent.futures.wait sees them done.
    assert all(reqs[i].future.cancelled() and wait([reqs[i].future], 0).done for i in (0, 2, 3))
    b.put(make(rid=10))
    b.put(make(rid=11))  # the queue is full again (4), with nothing to sweep
    with pytest.raises(Overloaded):
        b.put(make(rid=12))
    clk.t += 1000 * US
    assert ids(b.poll()) == [1, 9, 10, 11]
    assert len(dropped) == 3  # each cancelled request reported once: the batch did not see them again


def test_expired_requests_give_their_queue_slots_to_new_ones():
    clk, dropped = FakeClock(), []
    t0 = clk.t
    reqs = [make(rid=0, deadline_ns=t0 + 10 * US), make(rid=1, deadline_ns=t0 + 500 * US), make(rid=2),
            make(rid=3, deadline_ns=t0 + 10 * US)]
    b = _queue_of_4(clk, reqs, dropped)
    clk.t = t0 + 10 * US  # 0 and 3 expire; 1 still has time
    b.put(make(rid=4))
    assert [(r.record.request_id, why) for r, why in dropped] == [(0, DEADLINE), (3, DEADLINE)]
    assert all(reqs[i].future.running() for i in (0, 3))  # so that the pipeline can set DeadlineExceeded
    clk.t = t0 + 1000 * US
    assert ids(b.poll()) == [2, 4]
    assert [(r.record.request_id, why) for r, why in dropped[2:]] == [(1, DEADLINE)]


def test_a_full_queue_sweep_reports_outside_the_lock_and_only_when_full():
    clk, dropped = FakeClock(), []
    reqs = [make(rid=i) for i in range(3)]
    b = _queue_of_4(clk, reqs, dropped)  # 3 of 4: not full
    reqs[0].future.cancel()
    b.put(make(rid=3))  # room: nothing is swept
    assert dropped == [] and len(b) == 4
    locked = []
    b._on_drop = lambda r, why: locked.append(b._cond._is_owned())
    b.put(make(rid=4))
    assert locked == [False] and len(b) == 4


def test_a_full_queue_is_swept_at_most_a_tenth_of_the_time():
    """Under sustained overload every put finds the queue full, and a sweep each made a rejection ~100x dearer:
    after a sweep, the next waits 10x as long as it took. The clock advances 1 us a read here."""
    clk, dropped = FakeClock(step=US), []
    reqs = [make(rid=i) for i in range(4)]
    b = _queue_of_4(clk, reqs, dropped)
    with pytest.raises(Overloaded):
        b.put(make(rid=4))  # a sweep of 1 us that finds nothing
    assert reqs[1].future.cancel()
    with pytest.raises(Overloaded):
        b.put(make(rid=5))  # 2 us after it: not swept
    clk.t += 10 * US
    b.put(make(rid=6))
    assert [(r.record.request_id, why) for r, why in dropped] == [(1, CANCELLED)]
    assert len(b) == 4


def test_close_rejects_and_flushes_without_delay():
    clk = FakeClock()
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=60_000_000), clock=clk)
    b.put(make(rid=1))
    assert b.poll() is None
    b.close()
    with pytest.raises(PipelineClosed):
        b.put(make(rid=2))
    assert ids(b.next_batch(timeout=5)) == [1]
    assert b.next_batch(timeout=5) is None


def test_next_batch_timeout_on_empty_queue():
    b = Batcher(BatchingConfig())
    assert b.next_batch(timeout=0.01) is None


def test_many_producers_one_consumer_nothing_lost_or_duplicated():
    cfg = BatchingConfig(max_batch_size=7, max_queue_delay_us=50, max_queue_size=10_000)
    b = Batcher(cfg)
    n_threads, per = 8, 250
    got: list[int] = []
    sizes: list[int] = []

    def produce(t):
        for i in range(per):
            b.put(make(priority=i % 2, rid=t * per + i))

    def consume():
        while True:
            batch = b.next_batch(timeout=10)
            if batch is None:
                return
            sizes.append(len(batch))
            got.extend(ids(batch))

    c = threading.Thread(target=consume)
    c.start()
    ps = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(10)
    b.close()
    c.join(10)
    assert not c.is_alive()
    assert sorted(got) == list(range(n_threads * per))
    assert max(sizes) <= cfg.max_batch_size


def test_two_consumers_share_the_batches_nothing_lost_or_duplicated():
    """The pipeline's two batch workers both wait on the batcher: every request goes to exactly one of
    them, batch numbers are unique and contiguous, and close() releases both."""
    cfg = BatchingConfig(max_batch_size=5, max_queue_delay_us=100, max_queue_size=10_000)
    b = Batcher(cfg)
    n_threads, per = 4, 300
    got: list[list[int]] = [[], []]
    batch_ids: list[list[int]] = [[], []]

    def produce(t):
        for i in range(per):
            b.put(make(priority=i % 2, rid=t * per + i))

    def consume(k):
        while True:
            batch = b.next_batch(timeout=10)
            if batch is None:
                return
            assert len({r.record.batch_id for r in batch}) == 1
            batch_ids[k].append(batch[0].record.batch_id)
            got[k].extend(ids(batch))

    cs = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    ps = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for t in cs + ps:
        t.start()
    for p in ps:
        p.join(10)
    b.close()
    for c in cs:
        c.join(10)
    assert not any(c.is_alive() for c in cs)
    assert sorted(got[0] + got[1]) == list(range(n_threads * per))
    assert sorted(batch_ids[0] + batch_ids[1]) == list(range(b.batches))
    assert all(ids_ == sorted(ids_) for ids_ in batch_ids)  # each consumer gets them in closing order


def _consumer(b, out, **kw):
    t = threading.Thread(target=lambda: out.append(b.next_batch(**kw)), daemon=True)
    t.start()
    return t


def _wait_for(pred, what):
    for _ in range(2000):
        if pred():
            return
        threading.Event().wait(0.001)
    raise AssertionError(f"never happened: {what}")


def _wait_idle(b, n):
    _wait_for(lambda: b._idle == n, f"{n} idle consumers")


def test_one_idle_consumer_times_the_forming_batch(monkeypatch):
    """A consumer that comes back while a batch forms sleeps until notified instead of also waiting for
    the deadline: the deadline wakes one thread. Counted through _take_locked calls."""
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=300_000))
    takes = []
    real = Batcher._take_locked
    monkeypatch.setattr(Batcher, "_take_locked", lambda self, now: (takes.append(1), real(self, now))[1])
    got_b, got_a = [], []
    tb = _consumer(b, got_b)
    _wait_idle(b, 1)
    b.put(make(rid=1))  # wakes B, which then sleeps until the batch is due
    _wait_for(lambda: b._timer_held and b._idle == 1, "B on the timer")
    ta = _consumer(b, got_a)  # A comes back from its batch while this one forms
    _wait_idle(b, 2)
    tb.join(5)
    assert [ids(x) for x in got_b] == [[1]]
    threading.Event().wait(0.05)  # A, had it been on the timer too, would have woken and taken again by now
    assert len(takes) == 4, takes  # B: empty, notified, due; A: forming (then asleep, not on the timer)
    b.put(make(rid=2))  # the next batch's first request wakes A, which times it
    ta.join(5)
    assert [ids(x) for x in got_a] == [[2]]


def test_a_timer_holder_that_gives_up_hands_the_timer_over():
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=400_000))
    got_b, got_a = [], []
    tb = _consumer(b, got_b, timeout=0.1)
    _wait_idle(b, 1)
    ta = _consumer(b, got_a)
    _wait_idle(b, 2)
    b.put(make(rid=7))  # wakes B (first to wait), which holds the timer and gives up at 0.1 s
    tb.join(5)
    assert got_b == [None]
    ta.join(5)  # without the hand-over A sleeps untimed and the batch is never handed out
    assert not ta.is_alive() and [ids(x) for x in got_a] == [[7]]


@pytest.mark.parametrize("dies", ["timer_holder", "woken_by_put"])
def test_a_consumer_whose_wait_raises_hands_the_timer_over(monkeypatch, dies):
    """The wait of one of two idle consumers raises once (KeyboardInterrupt when next_batch runs on the main
    thread): timer_holder, the timed wait for the forming batch's deadline, before it sleeps; woken_by_put,
    an untimed wait, once put() has woken it (the wake-up dies with it). The other consumer must still get
    the batch: without the hand-over it sleeps untimed and the batch waits for the next put()."""
    b = Batcher(BatchingConfig(max_batch_size=8, max_queue_delay_us=100_000))
    real_wait, raised = b._cond.wait, []

    def wait(timeout=None):
        if dies == "woken_by_put":
            woke = real_wait(timeout)  # back under the lock: one thread at a time tests and sets `raised`
            if timeout is not None or raised:
                return woke
        elif timeout is None or raised:
            return real_wait(timeout)
        raised.append(threading.current_thread())
        raise KeyboardInterrupt  # re-raised in that consumer's thread only; caught below

    monkeypatch.setattr(b._cond, "wait", wait)
    got = {}

    def consume(k):
        try:
            got[k] = ids(b.next_batch())
        except KeyboardInterrupt as e:
            got[k] = e

    ts = [threading.Thread(target=consume, args=(k,), daemon=True) for k in range(2)]
    for t in ts:
        t.start()
    _wait_idle(b, 2)
    b.put(make(rid=7))
    _wait_for(lambda: raised, "a wait raised")
    survivor = ts[1] if raised[0] is ts[0] else ts[0]
    survivor.join(5)  # the batch is due at 0.1 s
    stuck = survivor.is_alive()
    b.close()  # lets a stuck survivor go (close wakes every consumer)
    for t in ts:
        t.join(5)
    assert not stuck, "the other consumer slept through the batch's deadline"
    dead = ts.index(raised[0])
    assert isinstance(got[dead], KeyboardInterrupt) and got[1 - dead] == [7]


@pytest.mark.parametrize("how", ["cancelled", "deadline_exceeded"])
def test_pipeline_counts_a_request_dropped_from_a_full_queue_once(how):
    """The cancelslots repro on the pipeline: both workers busy, 4 cancelled (or expired) requests fill the
    queue of 4. New requests are admitted, and each dropped one ends with one record and one count."""
    from tests.test_pipeline import WAIT, Harness, check_accounting, image

    h = Harness(BatchingConfig(max_batch_size=1, max_queue_delay_us=0, max_queue_size=4))
    try:
        a, b = h.block()
        gone = [h.pipe.submit(image(i), timeout=0.001 if how == "deadline_exceeded" else None) for i in range(4)]
        if how == "cancelled":
            assert all(f.cancel() for f in gone)
        else:
            threading.Event().wait(0.01)  # let the deadlines pass; nothing is asserted about time
        new = [h.pipe.submit(image(10)), h.pipe.submit(image(11), priority=1)]
        assert not any(f.done() for f in new)  # admitted: not rejected with Overloaded
        assert all(f.done() for f in gone)  # ended before any batch formed
        kinds = h.release([a, b, *new])
        assert kinds == ["ok"] * 4
        h.pipe.close(WAIT)
        assert check_accounting(h, [a, b, *gone, *new]) == ["ok"] * 2 + [how] * 4 + ["ok"] * 2
    finally:
        h.close()
