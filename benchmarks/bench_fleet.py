"""Fleet-scale diagnosis: a synthetic store built through the real writer, then ``aurora diagnose`` timed.

    python benchmarks/bench_fleet.py --hosts 1 --regions 1 --rate 580 --duration 1800 --out /tmp/fleet
    python benchmarks/bench_fleet.py --hosts 12 --regions 3 --rate 580 --duration 3600 --window 600

Building: two base segments of ``--segment-s`` seconds each are simulated (Poisson arrivals at --rate, a
batching model with lognormal service times) and written through ``Recorder(store=...)``, the code a
server runs: a calm one, and one with a 60 s compute slowdown (x2.5) in its middle. They are then
replicated as Parquet with shifted times and other host/region/run names until every host has
--duration seconds; the slow segment lands once, in the first region only, at the middle of the
timeline. Replicas share the base segments' values (only times and names differ), which the byte
figure states. Then ``aurora diagnose`` runs as a subprocess over the whole range and, with --window,
over a window at the middle, and its wall time and peak RSS (ru_maxrss of the child) are printed.

``test_fleet_smoke`` runs a tiny fleet through the same path under pytest (CI smoke, no timing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aurora_core.recorder import Recorder
from aurora_core.records import RequestRecord, now_ns
from aurora_core.store.schema import META_KEY
from aurora_core.store.writer import _parquet_kw

ROOT_DIR = Path(__file__).resolve().parents[1]


def simulate(rec: Recorder, rate: float, duration_s: float, seed: int, slow: tuple[float, float] | None = None,
             max_batch: int = 16) -> int:
    """Poisson arrivals into a one-model-at-a-time batcher; records go through ``rec`` (the real sink)."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate * duration_s)
    arr = np.sort(rng.uniform(0, duration_s, n))
    dec = 0.0015 * rng.lognormal(0, 0.15, n)
    t0 = now_ns()
    free, i, bid, count = 0.0, 0, 0, 0
    per_item = 1.0 / rate * 0.45  # 45% busy at the base rate
    while i < n:
        start = max(free, arr[i] + 0.002)
        j = int(np.searchsorted(arr, start, side="right"))
        j = min(max(j, i + 1), i + max_batch)
        bucket = 1 << (j - i - 1).bit_length()
        factor = 2.5 if slow and slow[0] <= start < slow[1] else 1.0
        form = float(dec[i:j].sum()) / 4  # four decode threads
        c = bucket * per_item * factor * rng.lognormal(0, 0.1)
        cs, ce = start + form, start + form + c
        for k in range(i, j):
            a = t0 + int(arr[k] * 1e9)
            d0 = t0 + int(start * 1e9)
            rec(RequestRecord(request_id=k, arrival_ns=a, enqueue_ns=a + 900, batch_closed_ns=d0, decode_start_ns=d0,
                              decode_end_ns=d0 + int(dec[k] * 0.7e9), preprocess_start_ns=d0 + int(dec[k] * 0.7e9),
                              preprocess_end_ns=d0 + int(dec[k] * 1e9), compute_start_ns=t0 + int(cs * 1e9),
                              compute_end_ns=t0 + int(ce * 1e9), d2h_end_ns=t0 + int(ce * 1e9) + 30_000,
                              completion_ns=t0 + int(ce * 1e9) + 40_000, batch_id=bid, batch_size=j - i,
                              bucket=bucket, queue_depth=int(j - i)))
        count += j - i
        free, i, bid = ce, j, bid + 1
    return count


def base_segments(work: Path, rate: float, segment_s: float) -> list[Path]:
    """Two real segments (calm, slow in the middle) written through the Recorder: their directories."""
    dirs = []
    for k, slow in enumerate((None, (segment_s / 2 - 30, segment_s / 2 + 30))):
        root = work / f"base{k}"
        shutil.rmtree(root, ignore_errors=True)
        rec = Recorder(store=root, meta={"host": "base", "region": "base", "label": "v1", "model": "resnet50",
                                         "deployment": {"model": "resnet50", "max_batch_size": 16},
                                         "load": {"rate": rate}}, rotate_s=1e9)
        simulate(rec, rate, segment_s, seed=k, slow=slow)
        rec.close()
        dirs.append(root / "region=base" / "host=base")
    return dirs


def replicate(base: list[Path], out: Path, hosts: int, regions: int, duration_s: float, segment_s: float) -> int:
    """Copy the base segments to every host with shifted times; returns the number of requests."""
    tables = []
    for d in base:
        by_table = {}
        for p in d.glob("*.parquet"):
            by_table[p.name.split(".")[1]] = pq.read_table(p)
        tables.append(by_table)
    meta0 = json.loads(tables[0]["requests"].schema.metadata[META_KEY])
    t_base = [int(tb["requests"].column("t_ns").to_numpy().min()) for tb in tables]
    start = int(time.time_ns() - duration_s * 1e9 - 3600e9)
    start -= start % int(segment_s * 1e9)
    n_seg = int(round(duration_s / segment_s))
    total = 0
    for h in range(hosts):
        region = f"r{h % regions}"
        host = f"h{h:03d}"
        d = out / f"region={region}" / f"host={host}"
        d.mkdir(parents=True, exist_ok=True)
        for s in range(n_seg):
            k = 1 if (h % regions == 0 and s == n_seg // 2) else 0
            shift = start + int(s * segment_s * 1e9) - t_base[k]
            name = f"seg{s:04d}-{host}"
            meta = dict(meta0, host=host, region=region, run_id=f"{host}-proc", segment=name, seq=s,
                        wall_minus_mono_ns=meta0["wall_minus_mono_ns"] + shift,
                        t_first_ns=int(tables[k]["requests"].column("t_ns").to_numpy().min()) + shift,
                        t_last_ns=int(tables[k]["requests"].column("t_ns").to_numpy().max()) + shift)
            meta.pop("wall_minus_mono_end_ns", None)
            for table, tbl in tables[k].items():
                if table == "requests":
                    t = tbl.column("t_ns").to_numpy() + shift
                    tbl = tbl.set_column(0, "t_ns", pa.array(t))
                tbl = tbl.replace_schema_metadata({META_KEY: json.dumps(meta)})
                pq.write_table(tbl, d / f"{name}.{table}.parquet", **_parquet_kw(table))
            total += tables[k]["requests"].num_rows
    return total


def sqlite_baseline(store: Path, out: Path) -> Path:
    """The first host's requests as one version-1 run file (``run.aurora.sqlite``), for the old reader."""
    import sqlite3

    from aurora_core.recorder import _INSERT_REQ, _REQ_COLUMNS, _SCHEMA
    from aurora_core.store import open_store

    st = open_store(store, host=sorted({s.host for s in open_store(store).segments})[0])
    runs = st.run_data()
    wmm0 = runs[0].wall_minus_mono_ns
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.aurora.sqlite"
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    for stmt in _SCHEMA:
        db.execute(stmt)
    meta = dict(runs[0].meta, format=1, wall_minus_mono_ns=wmm0)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    for r in runs:
        shift = r.wall_minus_mono_ns - wmm0
        q = {f: (np.where(v != 0, v + shift, 0) if f.endswith("_ns") else v) for f, v in r.requests.items()}
        db.executemany(_INSERT_REQ, zip(*(q[c].tolist() for c in _REQ_COLUMNS), strict=True))
    db.commit()
    db.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1)
    ap.add_argument("--regions", type=int, default=1)
    ap.add_argument("--rate", type=float, default=580.0, help="requests/s per host")
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds per host")
    ap.add_argument("--segment-s", type=float, default=600.0)
    ap.add_argument("--window", type=float, default=None, help="also diagnose a window of this many s at the middle")
    ap.add_argument("--out", default="/tmp/aurora-fleet")
    ap.add_argument("--keep", action="store_true", help="reuse an existing fleet at --out")
    ap.add_argument("--baseline", action="store_true",
                    help="also write the first host as one old run file and time `aurora diagnose` on it")
    ap.add_argument("--repeat", type=int, default=1, help="time each command this many times (median reported)")
    ap.add_argument("--measure-only", choices=["all", "window"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    store = out / "store"
    if not (args.keep and store.exists()):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        base = base_segments(out / "work", args.rate, args.segment_s)
        t_write = time.perf_counter() - t
        n = replicate(base, store, args.hosts, args.regions, args.duration, args.segment_s)
        print(f"built {n:,} requests: {args.hosts} hosts, {args.regions} regions, {args.duration:.0f} s at "
              f"{args.rate:g}/s each (base segments written through the Recorder in {t_write:.1f} s)")
    files = [p for p in store.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in files if p.name.endswith(".requests.parquet"))
    print(f"on disk: {size / 1e6:.1f} MB in {len(files)} files, {size / n:.1f} bytes/request (all four tables)")
    py = sys.executable
    runs = [("whole range", [])]
    if args.window:
        metas = [json.loads(pq.read_schema(p).metadata[META_KEY]) for p in files if p.name.endswith(".requests.parquet")]
        lo = min(m["t_first_ns"] for m in metas)
        hi = max(m["t_last_ns"] for m in metas)
        mid = (lo + hi) // 2
        a, b = (mid - args.window * 5e8) / 1e9, (mid + args.window * 5e8) / 1e9
        runs.append((f"{args.window:.0f} s window", ["--since", f"{a:.3f}", "--until", f"{b:.3f}"]))
    targets = [(what, [str(store), *extra]) for what, extra in runs]
    if args.baseline:
        base = out / "baseline"
        if not (base / "run.aurora.sqlite").exists():
            sqlite_baseline(store, base)
        targets.append(("old run file (run.aurora.sqlite, first host)", [str(base)]))
    results: dict[str, list] = {what: [] for what, _ in targets}
    for _ in range(args.repeat):
        for what, target in targets:  # interleaved, so both see the same load
            results[what].append(_measure(py, target))
    for what, rs in results.items():
        wall = float(np.median([r[0] for r in rs]))
        rss = float(np.median([r[1] for r in rs]))
        print(f"aurora diagnose, {what}: {wall:.2f} s wall, {rss:.0f} MB peak RSS (median of {len(rs)}), "
              f"exit {rs[0][2]}")
        if rs[0][2] != 0:
            print(rs[0][3], file=sys.stderr)
    print(f"load average: {os.getloadavg()}")
    return 0


def _measure(py: str, target: list[str]) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MB, exit status, stderr) of one `aurora diagnose` in a fresh process."""
    cmd = [py, "-m", "aurora_core.cli", "diagnose", *target, "--json"]
    # A fresh helper per measure, so its RUSAGE_CHILDREN ru_maxrss is this command's alone.
    helper = [py, "-c", "import resource,subprocess,sys,time;t=time.perf_counter();"
              "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);w=time.perf_counter()-t;"
              "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
              "print(w,r,p.returncode);sys.stderr.write(p.stderr[-600:])", *cmd]
    p = subprocess.run(helper, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT_DIR)})
    wall, rss_kb, rc = p.stdout.split()
    return float(wall), int(rss_kb) / 1024, int(rc), p.stderr


def test_fleet_smoke(tmp_path):
    base = base_segments(tmp_path / "work", 200.0, 20.0)
    n = replicate(base, tmp_path / "store", hosts=3, regions=2, duration_s=60.0, segment_s=20.0)
    from aurora_core.diagnose import diagnose

    res = diagnose([tmp_path / "store"])
    assert sum(s["n_requests"] for s in res.data["series"]) == n
    assert {s["name"] for s in res.data["series"]} == {"h000/r0", "h001/r1", "h002/r0"}


if __name__ == "__main__":
    sys.exit(main())
