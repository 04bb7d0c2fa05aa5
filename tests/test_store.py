"""The always-on store: segments, rotation, retention, crash safety, bad files, selections, and diagnose /
compare on a store giving what they give on the run files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from test_incidents import simulate_run

from aurora_core.diagnose import diagnose
from aurora_core.diagnose.fromstore import series_from_store
from aurora_core.diagnose.spikes import build_series
from aurora_core.loadgen import poisson_schedule
from aurora_core.recorder import Recorder, load_run
from aurora_core.records import Event, RequestRecord, Sample, Span, now_ns
from aurora_core.store import StoreError, convert, open_store
from aurora_core.store.schema import META_KEY

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "aurora_core.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)


def _records(n: int, t0: int | None = None, gap_ns: int = 1_000_000):
    t = now_ns() if t0 is None else t0
    for i in range(n):
        a = t + i * gap_ns
        yield RequestRecord(request_id=i, arrival_ns=a, enqueue_ns=a + 1000, batch_closed_ns=a + 200_000,
                            decode_start_ns=a + 200_000, decode_end_ns=a + 900_000, preprocess_start_ns=a + 900_000,
                            preprocess_end_ns=a + 1_300_000, compute_start_ns=a + 1_400_000,
                            compute_end_ns=a + 5_000_000 + (i % 7) * 10_000, d2h_end_ns=a + 5_100_000,
                            completion_ns=a + 5_200_000, batch_id=i // 4, batch_size=4, bucket=4, queue_depth=i % 3,
                            status="ok" if i % 50 else "deadline_exceeded")


def _record_flushing(root, meta: dict, n: int, every: int, rotate_bytes: int) -> Recorder:
    """``n`` records into a store at ``root``, flushed every ``every`` records (so small segments rotate); closed."""
    rec = Recorder(store=root, meta=meta, rotate_bytes=rotate_bytes, flush_interval_s=0.01)
    for r in _records(n):
        rec(r)
        if r.request_id % every == 0:
            rec.flush()
    rec.close()
    return rec


def _incident_runs(tmp_path) -> list[Path]:
    """Three run files: host a before and after a slowdown with a label change (20 s apart), host b calm;
    with samples, an event, and spans linked to requests and unlinked ones."""
    arrivals = poisson_schedule(40, 10, seed=1) / 1e9
    wmm = time.time_ns() - time.monotonic_ns()
    runs = []
    for k, (host, label, slow) in enumerate((("a", "v1", 99), ("a", "v2", 5), ("b", "v1", 99))):
        p = simulate_run(
            tmp_path / f"run{k}", arrivals, meta={"host": host, "region": "eu", "label": label,
                                                  "wall_minus_mono_ns": wmm + k * 20_000_000_000},
            item_ms=lambda t, slow=slow: 6.0 if t < slow else 14.0, seed=k,
            samples=lambda t0: [Sample(t0 + i * 100_000_000, "cpu", {"cpu_util_pct": float(i % 7), "runq": 1.0})
                                for i in range(100)],
            events=lambda t0: [Event(t0 + 3_000_000_000, "gpu0", "xid", 79.0, "fell off the bus")])
        db = sqlite3.connect(p / "run.aurora.sqlite")
        rows = db.execute("SELECT request_id, arrival_ns FROM requests ORDER BY rowid LIMIT 60").fetchall()
        spans = [("feature_store", a - 3_000_000, a - 1_000_000, rid, "") for rid, a in rows[::2]]
        spans += [("warmup", rows[0][1] - 50_000_000, rows[0][1] - 40_000_000, -1, ""),
                  ("feature_store", rows[5][1], rows[5][1] + 2_000_000, 10**9, "")]  # links to no request
        db.executemany("INSERT INTO spans VALUES (?, ?, ?, ?, ?)", spans)
        db.commit()
        db.close()
        runs.append(p)
    return runs


def _same_series(a, b) -> None:
    assert a.name == b.name and a.t0_wall_ns == b.t0_wall_ns and a.run_bounds == b.run_bounds
    for f in ("t", "run_idx", "ok", "e2e_ns", "wait_ns", "bucket", "queue_depth", "batch", "compute_s", "form_s"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), f
    for d in ("stage_ns", "span_ns"):
        x, y = getattr(a, d), getattr(b, d)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), d
    for d in ("samples", "unlinked_spans"):
        x, y = getattr(a, d), getattr(b, d)
        assert x.keys() == y.keys() and all(np.array_equal(x[k][i], y[k][i]) for k in x for i in (0, 1)), d
    assert a.events == b.events
    assert [r.meta["label"] for r in a.runs] == [r.meta["label"] for r in b.runs]


def test_series_from_the_store_equal_the_run_files(tmp_path):
    """The engine's Series are the run files' Series, array for array (spans linked and not, telemetry,
    events, two runs of one host), so every verdict is the same on the store as on the files."""
    runs = _incident_runs(tmp_path)
    for r in runs:
        convert(r, tmp_path / "store")
    st = open_store(tmp_path / "store")
    assert st.warnings == []
    old = {s.name: s for s in build_series([load_run(r) for r in runs])}
    new = {s.name: s for s in series_from_store(st)}
    assert old.keys() == new.keys() == {"a/eu", "b/eu"}
    assert old["a/eu"].span_ns["feature_store"].any() and old["a/eu"].unlinked_spans
    for k in old:
        _same_series(old[k], new[k])
    a, b = diagnose(runs), diagnose([tmp_path / "store"])
    assert a.data["summary"] == b.data["summary"]
    verdicts = [[w["verdict"] for w in s["windows"]] for s in b.data["series"]]
    assert any(verdicts), b.data["summary"]


def test_a_store_is_read_one_host_and_one_range_at_a_time(tmp_path):
    """diagnose reads a store host by host: detection's columns for the whole range, every column only for
    the ranges asked (``Series.select``), from the host's own files. Each view is the full Series cut to
    those ranges, array for array; the diagnosis equals the run files' one, confinement included; the
    progress callback sees every host once."""
    runs = _incident_runs(tmp_path)
    for r in runs:
        convert(r, tmp_path / "store")
    st = open_store(tmp_path / "store")
    full = {s.name: s for s in series_from_store(st)}
    light = {s.name: s for s in series_from_store(st, full=None)}
    assert light.keys() == full.keys() and all(s.t is None and s.source is not None for s in light.values())
    s, f = light["a/eu"], full["a/eu"]
    narrow = s.select(full=False)
    assert narrow.narrow and narrow.stage_ns is None and narrow.run_bounds == f.run_bounds
    for col in ("t", "run_idx", "ok", "e2e_ns"):
        assert np.array_equal(getattr(narrow, col), getattr(f, col)), col
    t = f.t
    ranges = [(float(t[10]), float(t[60])), (float(t[40]), float(t[90])), (float(t[-30]), float(t[-1]) + 1)]
    cut = s.select(ranges)
    keep = np.zeros(t.size, bool)
    for a, b in ranges:
        keep |= (t >= a) & (t < b)
    assert cut.t.size == int(keep.sum()) and cut.t.size < t.size
    for col in ("t", "run_idx", "ok", "e2e_ns", "wait_ns", "bucket", "queue_depth", "batch", "compute_s", "form_s"):
        assert np.array_equal(getattr(cut, col), getattr(f, col)[keep], equal_nan=True), col
    for d in ("stage_ns", "span_ns"):
        assert all(np.array_equal(getattr(cut, d)[k], getattr(f, d)[k][keep]) for k in getattr(f, d)), d
    seen = []
    a = diagnose(runs)
    b = diagnose([tmp_path / "store"], progress=lambda done, total, name, n: seen.append((done, total, name, n)))
    assert [x["windows"] for x in a.data["series"]] == [x["windows"] for x in b.data["series"]]
    assert any(w.get("confinement") for x in b.data["series"] for w in x["windows"])
    assert sorted(x[2] for x in seen) == ["a/eu", "b/eu"] and [x[0] for x in seen] == [1, 2]
    assert {x[2]: x[3] for x in seen} == {x["name"]: x["n_requests"] for x in b.data["series"]}


def test_segments_without_the_latency_column_read_the_same(tmp_path):
    """Segments written before ``latency_ns`` existed (the offsets only) give the same Series and diagnosis:
    the reader sums the offsets where the column is missing, in a store that mixes both."""
    runs = _incident_runs(tmp_path)
    for r in runs:
        convert(r, tmp_path / "store")
    before = {s.name: s for s in series_from_store(open_store(tmp_path / "store"))}
    ref = diagnose([tmp_path / "store"]).data
    files = sorted((tmp_path / "store").rglob("*.requests.parquet"))
    assert len(files) == 3 and all("latency_ns" in pq.read_schema(p).names for p in files)
    for p in files[:2]:  # two old segments and one new: the view unions them by name
        tbl = pq.read_table(p)
        pq.write_table(tbl.drop_columns(["latency_ns"]).replace_schema_metadata(tbl.schema.metadata), p)
    st = open_store(tmp_path / "store")
    assert sorted(s.has_latency for s in st.segments) == [False, False, True]
    after = {s.name: s for s in series_from_store(st)}
    for k in before:
        _same_series(before[k], after[k])
    assert diagnose([tmp_path / "store"]).data["series"] == ref["series"]
    assert st.intervals(1.0)["requests"].sum() == st.count()


def test_recorder_writes_a_store_readable_while_open_and_after_close(tmp_path):
    rec = Recorder(store=tmp_path, meta={"host": "web-1", "region": "eu-west", "label": "v7",
                                         "deployment": {"workers": 4}, "load": {}})
    for r in _records(500):
        rec(r)
    rec.add_sample(Sample(now_ns(), "cpu", {"cpu_util_pct": 12.0}))
    rec.flush()
    d = tmp_path / "region=eu-west" / "host=web-1"
    assert {p.suffix for p in d.iterdir()} == {".arrows"}  # open: streams
    st = open_store(tmp_path)
    assert st.count() == 500 and st.segments[0].open
    rec.close()
    files = sorted(p.name.split(".", 1)[1] for p in d.iterdir())
    assert files == ["events.parquet", "requests.parquet", "samples.parquet", "spans.parquet"]
    meta = json.loads(pq.read_schema(next(d.glob("*.requests.parquet"))).metadata[META_KEY])
    assert (meta["host"], meta["region"], meta["label"], meta["deployment"]) == ("web-1", "eu-west", "v7", {"workers": 4})
    assert meta["segment_counts"]["requests"] == 500 and meta["format"] == 2
    (run,) = open_store(tmp_path).run_data()
    want = [r.as_tuple() for r in _records(500, t0=int(run.requests["arrival_ns"][0]))]
    got = list(zip(*(run.requests[f].tolist() for f in run.requests), strict=True))
    assert got == want  # every field back, in record order


def test_a_renamed_host_moves_the_writer_to_its_directory(tmp_path):
    """A Ray replica whose slot Ray renumbers renames its host: later segments go to the new directory,
    and the store reads both without an overlap warning."""
    rec = Recorder(store=tmp_path, meta={"host": "node-1", "region": "r"})
    t0 = now_ns()
    for r in _records(100, t0=t0):
        rec(r)
    rec.flush()
    rec.set_meta("host", "node-0")
    for r in _records(50, t0=t0 + 10**9):
        rec(r)
    rec.close()
    old, new = tmp_path / "region=r" / "host=node-1", tmp_path / "region=r" / "host=node-0"
    assert {p.suffix for p in old.iterdir()} == {p.suffix for p in new.iterdir()} == {".parquet"}
    st = open_store(tmp_path)
    assert st.warnings == [] and {(s.host, s.n_requests) for s in st.segments} == {("node-1", 100), ("node-0", 50)}


def test_rotation_and_retention(tmp_path):
    """Segments rotate by time; retention by bytes removes the oldest whole segments and never the open one."""
    rec = Recorder(store=tmp_path, meta={"host": "h", "region": "r"}, rotate_s=0.15, max_bytes=60_000,
                   flush_interval_s=0.01)
    t0 = now_ns()
    for k in range(12):
        for r in _records(1500, t0=t0 + k * 2_000_000_000):
            rec(r)
        rec.flush()
        time.sleep(0.17)
    w = rec._store
    rec.close()
    d = tmp_path / "region=r" / "host=h"
    names = sorted({p.name.split(".")[0] for p in d.iterdir()})
    assert w.segments_written >= 6 and w.deleted, (w.segments_written, w.deleted)
    assert sum(p.stat().st_size for p in d.iterdir()) <= 60_000
    assert all(n > g for n in names for g in w.deleted)  # oldest first
    assert w.meta["segment"] in names  # the last one written is kept
    st = open_store(tmp_path)
    assert st.warnings == [] and st.count() == sum(s.n_requests for s in st.segments) > 0


def test_rotation_by_size_and_age(tmp_path):
    rec = _record_flushing(tmp_path, {"host": "h"}, 20_000, every=2000, rotate_bytes=20_000)
    assert rec._store.segments_written >= 3
    d = tmp_path / "region=_" / "host=h"
    old = sorted(d.iterdir())[:4]
    for p in old:
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    rec2 = Recorder(store=tmp_path, meta={"host": "h"}, max_age_s=3600)
    rec2.close()
    assert not any(p.exists() for p in old) and open_store(tmp_path).count() < 20_000


def test_crashed_segment_is_read_up_to_its_last_whole_batch(tmp_path):
    rec = Recorder(store=tmp_path, meta={"host": "h"})
    for r in _records(300):
        rec(r)
    rec.flush()
    for r in _records(300, t0=now_ns() + 10**9):
        rec(r)
    rec.flush()
    f = next((tmp_path / "region=_" / "host=h").glob("*.requests.arrows"))
    data = f.read_bytes()
    rec._thread.join(0)  # the writer stays alive; we only read a copy
    crashed = tmp_path / "copy" / "region=_" / "host=h"
    crashed.mkdir(parents=True)
    for p in f.parent.glob("*.arrows"):
        shutil.copy(p, crashed / p.name)
    (crashed / f.name).write_bytes(data[:-100])  # the last batch cut short, as by a SIGKILL mid-write
    rec.close()
    st = open_store(tmp_path / "copy")
    assert st.count() == 300
    assert any(f.name in w and "cut off" in w for w in st.warnings), st.warnings


def test_bad_files_are_named_and_the_rest_analysed(tmp_path):
    for k, host in enumerate(("a", "b", "c")):
        rec = Recorder(store=tmp_path, meta={"host": host, "region": "eu", "run_id": f"p{k}"})
        for r in _records(400):
            rec(r)
        rec.close()
    d = tmp_path / "region=eu"
    good = next((d / "host=a").glob("*.requests.parquet"))
    # foreign file, truncated Parquet, newer format, an overlapping copy, a clock far ahead
    (d / "host=a" / "notes.txt").write_text("hello")
    trunc = d / "host=b" / "20990101T000000000000Z-x-00000.requests.parquet"
    trunc.write_bytes(good.read_bytes()[:-300])
    tbl = pq.read_table(next((d / "host=c").glob("*.requests.parquet")))
    meta = json.loads(tbl.schema.metadata[META_KEY])
    newer = d / "host=c" / "20000101T000000000000Z-new-00000.requests.parquet"
    pq.write_table(tbl.replace_schema_metadata({META_KEY: json.dumps({**meta, "format": 99})}), newer)
    overlap = d / "host=c" / "20300101T000000000000Z-dup-00000.requests.parquet"
    pq.write_table(tbl.replace_schema_metadata({META_KEY: json.dumps({**meta, "run_id": "other"})}), overlap)
    ahead = tmp_path / "region=us" / "host=z"
    ahead.mkdir(parents=True)
    shift = 3600 * 10**9
    t = tbl.column("t_ns").to_numpy() + shift
    fut = tbl.set_column(0, "t_ns", pa.array(t)).replace_schema_metadata({META_KEY: json.dumps(
        {**meta, "host": "z", "region": "us", "t_first_ns": int(t.min()), "t_last_ns": int(t.max())})})
    pq.write_table(fut, ahead / "20260101T000000000000Z-z-00000.requests.parquet")

    st = open_store(tmp_path)
    text = "\n".join(st.warnings)
    for path, why in ((d / "host=a" / "notes.txt", "not a segment file"), (trunc, "not a readable aurora segment"),
                      (newer, "format version 99"), (overlap, "overlaps"), (ahead, "clock is ahead")):
        assert re.search(re.escape(str(path)) + r"[^\n]*" + why, text), (path, why, text)
    assert sorted(s.host for s in st.segments) == ["a", "b", "c"] and st.count() == 1200
    p = _cli("diagnose", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "notes.txt" in p.stderr and "format version 99" in p.stderr and "== a/eu" in p.stdout


def test_empty_selection_is_exit_2_saying_what_the_store_holds(tmp_path):
    rec = Recorder(store=tmp_path, meta={"host": "web-1", "region": "eu", "label": "v3"})
    for r in _records(200):
        rec(r)
    rec.close()
    for extra in (["--host", "web-9"], ["--region", "us"], ["--since", "2001-01-01", "--until", "2001-01-02"]):
        p = _cli("diagnose", tmp_path, *extra)
        assert p.returncode == 2, p.stderr
        assert "no requests match" in p.stderr and "hosts web-1" in p.stderr and "regions eu" in p.stderr, p.stderr
        assert "labels v3" in p.stderr and "Traceback" not in p.stderr
    assert _cli("diagnose", tmp_path / "nothing-here").returncode == 2
    p = _cli("diagnose", tmp_path, "--since", "yesterday-ish")
    assert p.returncode == 2 and "ISO 8601" in p.stderr
    with pytest.raises(StoreError):
        open_store(tmp_path, host="web-9").require()


def test_selection_by_time_region_host_and_compare_by_label(tmp_path):
    """Two regions, a label change on one host: filters cut the store, compare takes labels of one store."""
    base = now_ns()
    for host, region, label, k in (("a", "eu", "v1", 0), ("a", "eu", "v2", 1), ("b", "us", "v1", 2)):
        rec = Recorder(store=tmp_path, meta={"host": host, "region": region, "label": label, "run_id": f"r{k}",
                                             "wall_minus_mono_ns": time.time_ns() - time.monotonic_ns()})
        for r in _records(1000, t0=base + (k % 2) * 5_000_000_000, gap_ns=3_000_000):
            rec(r)
        rec.close()
    assert open_store(tmp_path).count() == 3000
    assert open_store(tmp_path, region="us").count() == 1000
    assert open_store(tmp_path, host="a", label="v2").count() == 1000
    mid = time.time_ns() - time.monotonic_ns() + base + 5_000_000_000
    assert open_store(tmp_path, until=mid).count() == 2000
    res = diagnose([tmp_path], region=["eu"], since=mid / 1e9)
    assert [s["name"] for s in res.data["series"]] == ["a/eu"] and res.data["series"][0]["n_requests"] == 1000
    p = _cli("compare", tmp_path, tmp_path, "--before-label", "v1", "--after-label", "v2", "--host", "a", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["verdict"] in ("no regression", "load not matched")
    p = _cli("compare", tmp_path, tmp_path, "--before-label", "v0", "--after-label", "v2")
    assert p.returncode == 2 and "no requests match" in p.stderr and "labels v1, v2" in p.stderr


def test_convert_cli_and_old_files_still_load(tmp_path):
    (run,) = _incident_runs(tmp_path)[:1]
    p = _cli("convert", run, "--store", tmp_path / "store")
    assert p.returncode == 0, p.stderr
    a = _cli("diagnose", run, "--json")
    b = _cli("diagnose", tmp_path / "store", "--json")
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout)["summary"] == json.loads(b.stdout)["summary"]
    assert _cli("diagnose", run, "--host", "a").returncode == 2  # a run file is read whole


@pytest.mark.slow
def test_sigkill_of_a_recording_server_under_load(tmp_path):
    """A real ``aurora serve --record`` under load, SIGKILLed: the store is diagnosed, with every request
    answered more than 1 s before the kill in it."""
    import httpx
    import torch
    from test_server import TinyNet, make_jpeg

    model = tmp_path / "tiny.pt2"
    exported = torch.export.export(TinyNet().eval(), (torch.zeros(2, 3, 32, 32),),
                                   dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    torch.export.save(exported, str(model))
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "aurora_core.cli", "serve", "--model", str(model), "--resize", "32", "--crop", "32",
           "--device", "cpu", "--port", "0", "--log-level", "info", "--telemetry-period-s", "0.2",
           "--record", str(store), "--region", "eu", "--label", "v1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}, cwd=REPO)
    answered: list[float] = []
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "server did not report its address"
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        stop = threading.Event()

        def client(seed):
            with httpx.Client(base_url=url, timeout=10) as c:
                i = seed
                while not stop.is_set():
                    try:
                        if c.post("/v1/classify", content=make_jpeg(i % 20)).status_code == 200:
                            answered.append(time.time())
                    except httpx.HTTPError:
                        return
                    i += 4

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(4.0)
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    old = sum(1 for a in answered if a < killed_at - 1.0)
    assert old > 50, len(answered)
    st = open_store(store)
    assert st.segments and all(s.open for s in st.segments)
    assert st.count() >= old
    assert st.segments[0].meta["deployment"]["model"] == str(model) and st.segments[0].region == "eu"
    p = _cli("diagnose", store, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["series"][0]["n_requests"] >= old


def test_fleet_overview_from_the_engine(tmp_path):
    """Per region and host figures aggregated inside DuckDB match the requests; a label change is a deployment."""
    base = now_ns()
    wmm = time.time_ns() - time.monotonic_ns()
    for host, region, label, k in (("a", "eu", "v1", 0), ("a", "eu", "v2", 1), ("b", "us", "v1", 2)):
        rec = Recorder(store=tmp_path, meta={"host": host, "region": region, "label": label, "run_id": f"r{k}",
                                             "wall_minus_mono_ns": wmm})
        for r in _records(1000 if k < 2 else 2000, t0=base + (k % 2) * 5_000_000_000, gap_ns=5_000_000 if k < 2 else 2_500_000):
            rec(r)
        rec.close()
    st = open_store(tmp_path)
    iv = st.intervals(1.0)
    assert iv["requests"].sum() == 4000 and set(iv["region"]) == {"eu", "us"}
    one = (iv["host"] == "b") & (iv["requests"] == 400)
    assert one.any() and np.all(iv["compute_ms"][one] > 0)
    from aurora_core.diagnose.fromstore import fleet_overview, overview_lines

    ov = fleet_overview(st, width_s=1.0)
    assert [d["host"] for d in ov["deployments"]] == ["a"] and ov["deployments"][0]["to"] == "v2"
    regions = {r["name"]: r for r in ov["regions"]}
    assert regions["us"]["requests"] == 2000 and regions["us"]["median_rate_per_s"] == pytest.approx(400, rel=0.01)
    assert any("deployment on a/eu" in line and "v1 -> v2" in line for line in overview_lines(ov))
    # diagnose builds the same overview from the arrays it reads (one scan), not from a second engine pass
    mine = diagnose([tmp_path], interval_s=1.0).data["store"]["overview"][0]
    assert [(r["name"], r["requests"]) for r in mine["regions"]] == [(r["name"], r["requests"]) for r in ov["regions"]]
    assert [(h["name"], h["requests"]) for h in mine["hosts"]] == [(h["name"], h["requests"]) for h in ov["hosts"]]


def test_trace_and_replay_read_a_store_host(tmp_path):
    from aurora_core.loadgen import replay_schedule

    rec = _record_flushing(tmp_path, {"host": "h", "region": "eu"}, 3000, every=500, rotate_bytes=30_000)
    assert rec._store.segments_written >= 2
    host = tmp_path / "region=eu" / "host=h"
    run = load_run(host)
    assert run.n_requests == 3000 and np.all(np.diff(np.sort(run.requests["arrival_ns"])) == 1_000_000)
    assert replay_schedule(tmp_path).size == 3000
    p = _cli("trace", host, "--max-requests", "10")
    assert p.returncode == 0 and (tmp_path / "trace-h.json").is_file(), p.stderr
    assert open_store(tmp_path).warnings == []  # the trace lands outside the partitions


def test_a_clock_step_while_recording_is_named_and_the_segment_kept(tmp_path):
    rec = Recorder(store=tmp_path, meta={"host": "h", "region": "eu"})
    for r in _records(300):
        rec(r)
    rec.close()
    f = next(tmp_path.glob("region=eu/host=h/*.requests.parquet"))
    tbl = pq.read_table(f)
    meta = json.loads(tbl.schema.metadata[META_KEY])
    meta["wall_minus_mono_end_ns"] = meta["wall_minus_mono_ns"] + 5_000_000_000  # NTP stepped the clock by 5 s
    pq.write_table(tbl.replace_schema_metadata({META_KEY: json.dumps(meta)}), f)
    st = open_store(tmp_path)
    assert st.count() == 300
    assert any(str(f) in w and "stepped by +5.0 s" in w for w in st.warnings), st.warnings


def test_a_crash_while_closing_and_a_damaged_table(tmp_path):
    """Requests already Parquet, spans still a stream (killed between the two renames); samples damaged:
    requests and spans are read, the damaged file is named, and quotes in a path do no harm."""
    root = tmp_path / "it's a store"
    rec = Recorder(store=root, meta={"host": "h"})
    for r in _records(200):
        rec(r)
    rec.add_span(Span("db", 1, 2, 5))
    rec.add_sample(Sample(now_ns(), "cpu", {"cpu_util_pct": 1.0}))
    rec.close()
    d = root / "region=_" / "host=h"
    spans = next(d.glob("*.spans.parquet"))
    tbl = pq.read_table(spans)
    with pa.OSFile(str(spans.with_suffix(".arrows")), "wb") as sink, ipc.new_stream(sink, tbl.schema) as w:
        w.write_table(tbl)
    spans.unlink()
    samples = next(d.glob("*.samples.parquet"))
    samples.write_bytes(samples.read_bytes()[:20])
    st = open_store(root)
    assert st.count() == 200
    assert st.con.sql("SELECT count(*) FROM spans").fetchall()[0][0] == 1
    assert any(str(samples) in w and "not readable" in w for w in st.warnings), st.warnings
    assert diagnose([root]).data["series"][0]["n_requests"] == 200


def test_aurora_host_names_the_host_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("AURORA_HOST", "gpu-07-a")
    monkeypatch.setenv("AURORA_REGION", "eu-west")
    rec = Recorder(store=tmp_path)
    for r in _records(10):
        rec(r)
    rec.close()
    assert list(tmp_path.glob("region=eu-west/host=gpu-07-a/*.requests.parquet"))


def _flush_batch(rec, n: int, t0: int) -> None:
    for r in _records(n, t0=t0):
        rec(r)
    rec.flush()


def test_a_failed_write_costs_its_batch_not_the_recording(tmp_path, caplog):
    """A full disk at rotation abandons the segment (its batch stays readable in the streams), retention still
    runs; a failure opening the next segment drops that one batch; recording goes on either way."""
    import errno
    import logging

    d = tmp_path / "region=_" / "host=h"
    d.mkdir(parents=True)
    old = d / "20000101T000000000000Z-old-00000.requests.parquet"
    old.write_bytes(b"x" * 100)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    rec = Recorder(store=tmp_path, meta={"host": "h"}, rotate_bytes=5000, max_age_s=3600, flush_interval_s=0.01)
    w = rec._store
    full = OSError(errno.ENOSPC, "No space left on device")

    def once(real):
        calls = []

        def f(*a, **k):
            if not calls:
                calls.append(1)
                raise full
            return real(*a, **k)
        return f

    caplog.set_level(logging.ERROR, logger="aurora_core.store.writer")
    w._finish = once(w._finish)
    t0 = now_ns()
    _flush_batch(rec, 200, t0)  # appended, then the rotation fails
    assert rec.store_errors == 1 and rec.store_error is full and rec.dropped["requests"] == 0
    assert not old.exists()  # retention ran on the failure
    w._start = once(w._start)
    _flush_batch(rec, 200, t0 + 10**9)  # the new segment cannot be opened: this batch is lost
    assert rec.store_errors == 2 and rec.dropped["requests"] == 200
    _flush_batch(rec, 200, t0 + 2 * 10**9)  # and the next one is written
    rec.close()
    assert rec.write_error is None and rec.store_errors == 2
    assert not [p for p in d.iterdir() if p.suffix == ".tmp" or p.stat().st_size == 0]
    st = open_store(tmp_path)
    assert st.count() == 400 and st.warnings == []
    arrivals = np.concatenate([r.requests["arrival_ns"] for r in st.run_data()])
    assert sorted(arrivals.tolist()) == [t0 + k * 10**9 + i * 1_000_000 for k in (0, 2) for i in range(200)]
    logged = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(logged) == 1 and "No space left" in logged[0].getMessage()  # rate-limited: one line a minute


def test_each_segment_takes_the_clock_offset_afresh(tmp_path, monkeypatch):
    """NTP steps the wall clock by 5 s while segment 1 is open: segment 1 is named as stepped, segment 2
    starts from the new offset, is not flagged, and its requests follow the new wall clock."""
    rec = Recorder(store=tmp_path, meta={"host": "h"}, rotate_bytes=5000, flush_interval_s=0.01)
    t0 = now_ns()
    _flush_batch(rec, 200, t0)  # segment 0, rotated
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 5_000_000_000)
    _flush_batch(rec, 200, t0 + 10**9)  # segment 1 (opened before the step), rotated after it
    _flush_batch(rec, 200, t0 + 2 * 10**9)  # segment 2
    rec.close()
    st = open_store(tmp_path)
    segs = sorted(st.segments, key=lambda s: s.meta["seq"])
    assert [s.n_requests for s in segs] == [200, 200, 200]
    stepped = [w for w in st.warnings if "stepped" in w]
    assert len(stepped) == 1 and str(segs[1].path) in stepped[0], st.warnings
    assert segs[2].wall_minus_mono_ns - segs[0].wall_minus_mono_ns == pytest.approx(5e9, abs=5e8)
    t = pq.read_table(segs[2].path).column("t_ns").to_numpy()
    assert int(t[0]) == t0 + 2 * 10**9 + segs[2].wall_minus_mono_ns
    run = load_run(tmp_path / "region=_" / "host=h")  # one process: its segments on one monotonic clock
    assert np.all(np.diff(run.requests["arrival_ns"]) > 0)


def test_engine_errors_name_the_file(tmp_path):
    """A damaged page behind a valid footer (the scan reads footers only), or a file removed by retention
    after the scan: a StoreError naming the file, and the CLI exits 2 with one line."""
    rec = Recorder(store=tmp_path, meta={"host": "h"})
    _flush_batch(rec, 5000, now_ns())
    rec.close()
    f = next(tmp_path.glob("region=_/host=h/*.requests.parquet"))
    good = f.read_bytes()
    b = bytearray(good)
    for i in range(4, 200):
        b[i] ^= 0x5A
    f.write_bytes(bytes(b))
    st = open_store(tmp_path)
    assert st.warnings == [] and st.segments  # the footer is whole
    with pytest.raises(StoreError, match=re.escape(str(f))):
        st.run_data()
    p = _cli("diagnose", tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert str(f) in p.stderr and "move it out of the store" in p.stderr and p.stderr.strip().count("\n") == 0
    f.write_bytes(good)
    st = open_store(tmp_path)
    f.unlink()  # retention, between the scan and the query
    with pytest.raises(StoreError, match=re.escape(str(f))):
        st.count()
    with pytest.raises(StoreError, match=re.escape(str(f))):
        diagnose([st])


def test_an_open_segment_without_requests_keeps_its_events(tmp_path):
    """A replica killed before its first request: its Xid event and samples are still read, with its meta."""
    rec = Recorder(store=tmp_path, meta={"host": "r1", "region": "eu"})
    t = now_ns()
    rec.add_event(Event(t, "gpu0", "xid", 79.0, "fell off the bus"))
    rec.add_sample(Sample(t, "gpu0", {"util_pct": 97.0}))
    rec.flush()
    killed = tmp_path / "copy" / "region=eu" / "host=r1"
    killed.mkdir(parents=True)
    for p in (tmp_path / "region=eu" / "host=r1").glob("*.arrows"):
        shutil.copy(p, killed / p.name)
    rec.close()
    st = open_store(tmp_path / "copy")
    assert st.warnings == [] and [s.host for s in st.segments] == ["r1"]
    assert st.con.sql("SELECT kind, detail FROM events").fetchall() == [("xid", "fell off the bus")]
    assert st.con.sql("SELECT metric, value FROM samples").fetchall() == [("util_pct", 97.0)]


def test_an_abandoned_segment_without_requests_keeps_its_events(tmp_path):
    import errno

    rec = Recorder(store=tmp_path, meta={"host": "h"}, rotate_bytes=500, flush_interval_s=0.01)

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    rec._store._finish = full
    for _ in range(20):
        rec.add_event(Event(now_ns(), "gpu0", "xid", 79.0, "x" * 50))
    rec.flush()
    rec.close()
    assert rec.store_errors == 2 and rec.dropped["events"] == 0  # the rotation, and the close
    st = open_store(tmp_path)
    assert st.warnings == [] and st.con.sql("SELECT count(*) FROM events").fetchall()[0][0] == 20


def test_a_batch_that_cannot_be_built_is_counted_and_logged(tmp_path, monkeypatch, caplog):
    import logging

    import aurora_core.store.schema as schema

    caplog.set_level(logging.ERROR, logger="aurora_core.store.writer")
    rec = Recorder(store=tmp_path, meta={"host": "h"})

    def bad(*a):
        raise TypeError("bad row")

    monkeypatch.setattr(schema, "rows_batch", bad)
    rec.add_event(Event(now_ns(), "gpu0", "xid", 79.0, ""))
    rec.flush()
    monkeypatch.undo()
    _flush_batch(rec, 10, now_ns())
    rec.close()
    assert rec.store_errors == 1 and isinstance(rec.store_error, TypeError) and rec.dropped["events"] == 1
    assert any("bad row" in r.getMessage() for r in caplog.records)
    assert open_store(tmp_path).count() == 10
