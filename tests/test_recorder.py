"""Recorder and run file: round trip, streaming with a bounded ring, histograms, back-pressure."""

from __future__ import annotations

import json
import os
import sqlite3
import threading

import numpy as np
import pytest

from aurora_core.recorder import (
    FILE_NAME,
    Recorder,
    decode_histogram,
    encode_histogram,
    load_run,
    merge_histograms,
    new_histogram,
    record_many,
)
from aurora_core.records import FIELD_NAMES, STAGES, Event, RequestRecord, Sample, Span


def make_record(i: int, t0: int = 1_000_000_000, rng=None, status: str = "ok") -> RequestRecord:
    """A plausible record: stages in order, durations varied by i so histograms are not trivial."""
    rng = rng or np.random.default_rng(i)
    d = [int(x) for x in rng.integers(1_000, 3_000_000, size=7)]
    t = t0 + i * 10_000
    r = RequestRecord(request_id=i, arrival_ns=t, enqueue_ns=t + 100)
    r.batch_closed_ns = r.enqueue_ns + d[0]
    r.decode_start_ns = r.batch_closed_ns + 10
    r.decode_end_ns = r.decode_start_ns + d[1]
    r.preprocess_start_ns = r.decode_end_ns
    r.preprocess_end_ns = r.preprocess_start_ns + d[2]
    r.compute_start_ns = r.preprocess_end_ns + 5
    r.compute_end_ns = r.compute_start_ns + d[3]
    r.d2h_end_ns = r.compute_end_ns + d[4]
    r.completion_ns = r.d2h_end_ns + 50
    r.batch_id, r.batch_size, r.bucket, r.queue_depth = i // 4, 4, 4, i % 7
    r.status = status
    return r


def test_record_many_matches_record_value():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 10, 50), rng.integers(0, 5_000, 500),
                             rng.lognormal(8, 2, 2000).astype(np.int64), [2047, 2048, 4095, 4096, 10**9]])
    a, b = new_histogram(), new_histogram()
    for v in values:
        a.record_value(int(v))
    record_many(b, values)
    assert a.get_total_count() == b.get_total_count() == values.size
    assert np.array_equal(np.ctypeslib.as_array(a.counts), np.ctypeslib.as_array(b.counts))
    assert a.get_min_value() == b.get_min_value() and a.get_max_value() == b.get_max_value()
    for q in (50, 90, 99, 99.9):
        assert a.get_value_at_percentile(q) == b.get_value_at_percentile(q)


def test_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    recs = [make_record(i, rng=rng, status="ok" if i % 10 else "overloaded") for i in range(500)]
    recs[3].h2d_start_ns = recs[3].h2d_end_ns = 0  # a stage that did not happen stays 0
    with Recorder(tmp_path / "run", meta={"label": "v2", "region": "eu", "custom": {"a": 1}}) as rec:
        for r in recs:
            rec(r)
        rec.add_sample(Sample(5, "cpu", {"cpu_util_pct": 12.5, "steal_pct": 0.0}))
        rec.add_sample(Sample(3, "gpu0", {"sm_clock_mhz": 1410.0}))
        rec.add_sample(Sample(1, "cpu", {"cpu_util_pct": 50.0}))
        rec.add_event(Event(7, "gpu0", "xid", 79.0, "fell off the bus"))
        rec.add_span(Span("db", 10, 20, 4, '{"k": 1}'))
        with pytest.raises(KeyError), rec.span("feature_store", request_id=9, shard=3):
            raise KeyError("boom")
        rec.set_meta("config", {"resize": 256})
    run = load_run(tmp_path / "run")
    assert run.path.name == FILE_NAME
    assert run.n_requests == 500
    for name in FIELD_NAMES:
        assert list(run.requests[name]) == [getattr(r, name) for r in recs], name
    for stage in STAGES:
        assert list(run.stage_ns(stage)) == [r.stage_ns(stage) for r in recs]
    assert run.meta["label"] == "v2" and run.meta["region"] == "eu" and run.meta["custom"] == {"a": 1}
    assert run.meta["config"] == {"resize": 256}
    assert run.meta["counts"]["requests"] == 500 and run.meta["dropped"]["requests"] == 0
    for key in ("run_id", "host", "started_wall", "wall_minus_mono_ns", "gpu", "versions", "model",
                "capabilities", "cpu"):
        assert key in run.meta
    assert run.meta["versions"]["torch"]
    ts, v = run.sample("cpu", "cpu_util_pct")
    assert list(ts) == [1, 5] and list(v) == [50.0, 12.5]
    assert run.sample("cpu", "steal_pct")[1].tolist() == [0.0]
    assert run.sample("gpu0", "util_gpu_busy_pct") is None  # absent, not zero
    assert run.sources() == ["cpu", "gpu0"]
    assert run.events["kind"].tolist() == ["xid"] and run.events["value"].tolist() == [79.0]
    assert run.spans["name"].tolist() == ["db", "feature_store"]
    fs = json.loads(run.spans["attrs"][1])
    assert fs == {"shard": 3, "error": "KeyError"} and run.spans["request_id"][1] == 9
    assert run.spans["end_ns"][1] >= run.spans["start_ns"][1]
    # Histograms hold exactly the ok requests' stage durations, in µs.
    ok = [r for r in recs if r.status == "ok"]
    for stage in STAGES:
        ref = new_histogram()
        for r in ok:
            if r.stage_ns(stage) >= 0:
                ref.record_value(r.stage_ns(stage) // 1000)
        h = run.histogram(stage)
        assert h.get_total_count() == ref.get_total_count(), stage
        assert h.get_value_at_percentile(99) == ref.get_value_at_percentile(99)


def test_histograms_encode_decode_and_merge_across_hosts():
    rng = np.random.default_rng(2)
    recs = [make_record(i, rng=rng) for i in range(400)]
    with Recorder(None) as a, Recorder(None) as b:
        for r in recs[:150]:
            a(r)
        for r in recs[150:]:
            b(r)
        ha, hb = a.histograms(), b.histograms()
        with Recorder(None) as both:
            for r in recs:
                both(r)
            hall = both.histograms()
    for stage in STAGES:
        enc = encode_histogram(ha[stage])
        back = decode_histogram(enc)
        expected = 0 if stage == "h2d" else 150  # make_record has no H2D copy (a CPU run)
        assert back.get_total_count() == ha[stage].get_total_count() == expected
        assert back.get_value_at_percentile(99) == ha[stage].get_value_at_percentile(99)
        merged = merge_histograms([enc, hb[stage]])
        assert merged.get_total_count() == (0 if stage == "h2d" else 400)
        for q in (50, 99, 99.9):
            assert merged.get_value_at_percentile(q) == hall[stage].get_value_at_percentile(q)


def test_streaming_bounded_ring_and_readable_while_writing(tmp_path):
    """Scaled-down version of the 1M-request requirement: 2 producer threads, 60k records, ring of 1000."""
    n_per, ring = 30_000, 1_000
    rec = Recorder(tmp_path / "r.sqlite", ring_size=ring, flush_interval_s=0.01)
    base = make_record(0)

    def produce(offset):
        for i in range(n_per):
            r = RequestRecord(**{f: getattr(base, f) for f in FIELD_NAMES})
            r.request_id = offset + i
            rec(r)

    threads = [threading.Thread(target=produce, args=(k * n_per,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rec.recent(10 * ring)) == ring
    rec.flush()
    partial = load_run(tmp_path / "r.sqlite")  # WAL: a reader sees committed rows while open
    assert partial.n_requests == 2 * n_per
    db = sqlite3.connect(tmp_path / "r.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    rec.close()
    run = load_run(tmp_path / "r.sqlite")
    assert run.n_requests == 2 * n_per
    assert sorted(run.requests["request_id"].tolist()) == list(range(2 * n_per))
    assert run.histogram("total").get_total_count() == 2 * n_per
    assert not (tmp_path / "r.sqlite-wal").exists()  # closed: one plain file


def test_back_pressure_drops_and_counts(tmp_path):
    rec = Recorder(tmp_path / "bp", max_pending=10, flush_interval_s=60)
    for i in range(100):
        rec(make_record(i))
    assert rec.dropped["requests"] == 90
    assert len(rec.recent(1000)) == 100  # the ring still sees everything
    rec.close()
    run = load_run(tmp_path / "bp")
    assert run.n_requests == 10 and run.meta["dropped"]["requests"] == 90


def test_existing_file_is_refused(tmp_path):
    Recorder(tmp_path / "x").close()
    with pytest.raises(FileExistsError):
        Recorder(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "missing")


def test_set_meta_rejects_non_json():
    with Recorder(None) as rec, pytest.raises(TypeError):
        rec.set_meta("bad", object())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("AURORA_SLOW"), reason="~70 s on 2 cores; set AURORA_SLOW=1 to run it")
def test_one_million_requests(tmp_path):
    rec = Recorder(tmp_path / "big", ring_size=10_000)
    base = make_record(0)
    for i in range(1_000_000):
        r = RequestRecord(**{f: getattr(base, f) for f in FIELD_NAMES})
        r.request_id = i
        rec(r)
    rec.close()
    run = load_run(tmp_path / "big")
    assert run.n_requests == 1_000_000
    assert run.requests["request_id"][-1] == 999_999


def test_write_failure_is_reported_at_close(tmp_path):
    """A failing disk must not reach the request path, and close() must not hide an incomplete file."""
    rec = Recorder(tmp_path / "w", flush_interval_s=0.01)
    rec._db.execute("DROP TABLE requests")  # the next batch insert fails on the writer thread
    for i in range(20):
        rec(make_record(i))  # still cheap and silent on the calling thread
    rec.flush()
    assert rec.write_error is not None
    assert rec.histograms()["total"].get_total_count() == 20  # in-memory view keeps working
    with pytest.raises(RuntimeError, match="incomplete"):
        rec.close()


def _tampered(tmp_path, sql: str):
    """A valid run file (requests, a span, a sample, an event), then one SQL statement run on it."""
    with Recorder(tmp_path / "run") as rec:
        for i in range(5):
            rec(make_record(i))
        rec.add_span(Span("db", 10, 20, 4, ""))
        rec.add_sample(Sample(3, "cpu", {"cpu_util_pct": 1.0}))
        rec.add_event(Event(7, "gpu0", "xid", 79.0, ""))
    p = tmp_path / "run" / FILE_NAME
    with sqlite3.connect(p) as db:
        db.execute(sql)
    db.close()
    return p


@pytest.mark.parametrize(("sql", "what"), [
    ("UPDATE meta SET value = '{\"a\":' WHERE key = 'host'", "meta 'host' is not JSON"),
    ("UPDATE meta SET value = NULL WHERE key = 'label'", "meta 'label' is not JSON"),
    ("UPDATE requests SET arrival_ns = NULL WHERE rowid = 3", "requests.arrival_ns holds NULL in row 3"),
    ("UPDATE requests SET batch_id = 'x' WHERE rowid = 1", "requests.batch_id holds 'x' in row 1"),
    ("UPDATE spans SET end_ns = NULL", "spans.end_ns holds NULL"),
    ("UPDATE samples SET ts_ns = NULL", "samples (cpu, cpu_util_pct).ts_ns holds NULL"),
    ("UPDATE events SET ts_ns = NULL", "events.ts_ns holds NULL"),
    ("UPDATE samples SET value = 'x'", "samples (cpu, cpu_util_pct).value holds 'x'"),
    ("UPDATE events SET value = 'x'", "events.value holds 'x'"),
])
def test_corrupt_content_names_the_file_and_the_fault(tmp_path, sql, what):
    """Content the recorder never writes is the same ValueError as a damaged database: the path and the fault."""
    p = _tampered(tmp_path, sql)
    with pytest.raises(ValueError, match="not a readable aurora run file") as e:
        load_run(p)
    assert str(p) in str(e.value) and what in str(e.value)


def test_null_float_reads_as_nan(tmp_path):
    """SQLite stores a NaN as NULL: a sample or event value of NULL reads back as NaN, not as corruption."""
    p = _tampered(tmp_path, "UPDATE samples SET value = NULL")
    with sqlite3.connect(p) as db:
        db.execute("UPDATE events SET value = NULL")
    db.close()
    run = load_run(p)
    assert np.isnan(run.sample("cpu", "cpu_util_pct")[1]).all() and np.isnan(run.events["value"]).all()
