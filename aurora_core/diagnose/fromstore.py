"""``Series`` straight from a store: the per-request arithmetic of ``spikes._series`` done inside DuckDB.

The result is the same Series ``build_series`` makes from the same runs read as RunData (one run per
segment; ``tests/test_store.py`` checks them array for array), without a Python tuple or a RunData copy
of the requests: the engine scans only the selected segments and time range, links spans to their
requests, and hands back exactly the Series columns, streamed into numpy. Memory is the Series itself
(~130 bytes a request) plus one batch.
"""

from __future__ import annotations

import math

import numpy as np

from aurora_core.store.reader import Segment, Store, _mono_range, stamp_exprs

from .spikes import SERVICE_STAGES, Series

_STAGE_COLS = {"queue": ("enqueue_ns", "batch_closed_ns"), "decode": ("decode_start_ns", "decode_end_ns"),
               "preprocess": ("preprocess_start_ns", "preprocess_end_ns"), "h2d": ("h2d_start_ns", "h2d_end_ns"),
               "compute": ("compute_start_ns", "compute_end_ns"), "d2h": ("compute_end_ns", "d2h_end_ns"),
               "total": ("arrival_ns", "completion_ns")}


def _dur(a: str, b: str) -> str:
    return f"CASE WHEN {a} IS NOT NULL AND {b} IS NOT NULL AND {b} >= {a} THEN {b} - {a} ELSE -1 END"


def series_from_store(store: Store) -> list[Series]:
    out = []
    for (host, region), idx in store.groups().items():
        s = _group(store, f"{host}/{region}" if region else host, idx)
        if s is not None:
            out.append(s)
    return out


def _group(store: Store, name: str, idx: list[int]) -> Series | None:
    con = store.con
    segs = ", ".join(map(str, idx))
    where = f"seg IN ({segs}) AND {store.time_where()}"
    # Runs in the order build_series sorts them: by first arrival on the wall clock.
    firsts = dict(con.execute(f"SELECT seg, min(t_ns) FROM requests WHERE {where} GROUP BY seg").fetchall())
    order = sorted((i for i in idx if firsts.get(i) is not None), key=lambda i: (firsts[i], i))
    if not order:
        return None
    t0 = min(firsts[i] for i in order)
    ridx = {seg: k for k, seg in enumerate(order)}
    segments: list[Segment] = [store.segments[i] for i in order]
    con.register("ridx", _ridx_table(ridx, store))
    where = f"seg IN ({', '.join(map(str, order))}) AND {store.time_where()}"

    span_where = " OR ".join(f"(s.seg = {i} AND s.start_ns >= {lo} AND s.start_ns < {hi})"
                             for i in order for lo, hi in [_mono_range(store, store.segments[i])])
    span_names = [r[0] for r in con.execute(f"SELECT DISTINCT name FROM spans s WHERE {span_where} ORDER BY name")
                  .fetchall()]
    st = stamp_exprs("q")
    stage = {k: _dur(st[a], st[b]) for k, (a, b) in _STAGE_COLS.items()}
    # Spans link to requests of the same process (run_id), whichever segment each landed in.
    link = ""
    span_cols = ""
    if span_names:
        per_name = ", ".join(f"sum(CASE WHEN name = '{_q(n)}' THEN d ELSE 0 END) AS span_{k}"
                             for k, n in enumerate(span_names))
        link = (f"LEFT JOIN (SELECT r.run_id, s.request_id, min(s.start_ns + r.wmm) AS s0, max(s.end_ns + r.wmm) AS s1, "
                f"{per_name} FROM (SELECT *, end_ns - start_ns AS d FROM spans s WHERE ({span_where}) AND "
                f"request_id >= 0) s JOIN ridx r USING (seg) GROUP BY ALL) l "
                f"ON l.run_id = x.run_id AND l.request_id = q.request_id")
        span_cols = ", " + ", ".join(f"coalesce(l.span_{k}, 0) AS span_{k}" for k in range(len(span_names)))
    start = "least(q.t_ns, coalesce(l.s0, q.t_ns))" if span_names else "q.t_ns"
    end = f"greatest({st['completion_ns']}, coalesce(l.s1, {st['completion_ns']}))" if span_names else st["completion_ns"]
    service = " + ".join(f"greatest({stage[s]}, 0)" for s in SERVICE_STAGES)
    sec = lambda e: f"CAST(({e}) - {t0} AS DOUBLE) / 1e9"  # noqa: E731
    win = lambda a, b: (f"CASE WHEN {st[a]} IS NOT NULL AND {st[b]} >= {st[a]} THEN {sec(st[a])} ELSE 'NaN'::DOUBLE END",  # noqa: E731
                        f"CASE WHEN {st[a]} IS NOT NULL AND {st[b]} >= {st[a]} THEN {sec(st[b])} ELSE 'NaN'::DOUBLE END")
    c0, c1 = win("compute_start_ns", "compute_end_ns")
    f0, f1 = win("decode_start_ns", "preprocess_end_ns")
    sql = f"""
        SELECT {sec('q.t_ns')} AS t, x.ridx AS run_idx, q.status = 'ok' AS ok,
               CASE WHEN {stage['total']} >= 0 AND ({end}) >= ({start}) THEN ({end}) - ({start}) ELSE -1 END AS e2e_ns,
               CASE WHEN {stage['total']} >= 0 THEN greatest({stage['total']} - ({service}), 0) ELSE -1 END AS wait_ns,
               {', '.join(f"{stage[s]} AS stage_{s}" for s in SERVICE_STAGES)},
               CASE WHEN q.bucket > 0 THEN q.bucket ELSE greatest(q.batch_size, 1) END AS bucket,
               q.queue_depth AS queue_depth,
               CASE WHEN q.batch_id >= 0 THEN x.ridx * 4294967296 + q.batch_id ELSE -1 END AS batch,
               {c0} AS compute0, {c1} AS compute1, {f0} AS form0, {f1} AS form1 {span_cols}
        FROM (SELECT * FROM requests WHERE {where}) q JOIN ridx x USING (seg) {link}
        ORDER BY q.t_ns, x.ridx, q.row"""
    cols = {"t": np.float64, "run_idx": np.int64, "ok": np.bool_, "e2e_ns": np.int64, "wait_ns": np.int64,
            **{f"stage_{s}": np.int64 for s in SERVICE_STAGES}, "bucket": np.int64, "queue_depth": np.int64,
            "batch": np.int64, "compute0": np.float64, "compute1": np.float64, "form0": np.float64,
            "form1": np.float64, **{f"span_{k}": np.int64 for k in range(len(span_names))}}
    n = sum(int(c) for c in con.execute(f"SELECT count(*) FROM requests WHERE {where}").fetchall()[0])
    c = store.fetch(sql, cols, n)
    bounds = [tuple(map(float, r[1:])) for r in con.execute(
        f"SELECT x.ridx, {sec('min(q.t_ns)')}, {sec('max(q.t_ns)')} FROM (SELECT * FROM requests WHERE {where}) q "
        "JOIN ridx x USING (seg) GROUP BY x.ridx ORDER BY x.ridx").fetchall()]

    samples = {}
    rows = con.execute(f"""SELECT source, metric, list({sec('s.ts_ns + x.wmm')} ORDER BY {sec('s.ts_ns + x.wmm')}, x.ridx, s.ts_ns, s.value),
                                  list(s.value ORDER BY {sec('s.ts_ns + x.wmm')}, x.ridx, s.ts_ns, s.value)
                           FROM samples s JOIN ridx x USING (seg) WHERE {span_where.replace('start_ns', 'ts_ns')}
                           GROUP BY source, metric""").fetchall()
    for src, met, ts, vs in rows:
        samples[(src, met)] = (np.array(ts, np.float64), np.array([math.nan if v is None else v for v in vs], np.float64))
    events = [{"t": t, "source": src, "kind": k, "value": float(v), "detail": d} for t, src, k, v, d in con.execute(
        f"""SELECT {sec('s.ts_ns + x.wmm')} AS t, source, kind, value, detail FROM events s JOIN ridx x USING (seg)
            WHERE {span_where.replace('start_ns', 'ts_ns')} ORDER BY t, x.ridx, s.ts_ns""").fetchall()]
    unl: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if span_names:
        rows = con.execute(f"""
            SELECT s.name, {sec('s.start_ns + r.wmm')}, s.end_ns - s.start_ns FROM spans s JOIN ridx r USING (seg)
            WHERE ({span_where}) AND (s.request_id < 0 OR NOT EXISTS (
                SELECT 1 FROM requests q JOIN ridx x USING (seg)
                WHERE x.run_id = r.run_id AND q.request_id = s.request_id))
            ORDER BY r.ridx, s.start_ns""").fetchall()
        for nm, a, d in rows:
            unl.setdefault(nm, ([], []))
            unl[nm][0].append(a)
            unl[nm][1].append(d)
        unl = {k: (np.array(a, np.float64), np.array(d, np.int64)) for k, (a, d) in unl.items()}
    con.unregister("ridx")
    for s, k in zip(segments, range(len(segments)), strict=True):
        s.n_selected = int(np.count_nonzero(c["run_idx"] == k))
    compute_s = np.column_stack([c.pop("compute0"), c.pop("compute1")])
    form_s = np.column_stack([c.pop("form0"), c.pop("form1")])
    return Series(
        name=name, runs=segments, t0_wall_ns=int(t0), t=c["t"], run_idx=c["run_idx"], ok=c["ok"],
        e2e_ns=c["e2e_ns"], wait_ns=c["wait_ns"], stage_ns={s: c[f"stage_{s}"] for s in SERVICE_STAGES},
        bucket=c["bucket"], queue_depth=c["queue_depth"], batch=c["batch"], compute_s=compute_s, form_s=form_s,
        span_ns={n: c[f"span_{k}"] for k, n in enumerate(span_names)}, unlinked_spans=unl, samples=samples, events=events,
        run_bounds=bounds)


def _ridx_table(ridx: dict[int, int], store: Store):
    import pyarrow as pa

    segs = list(ridx)
    return pa.table({"seg": pa.array(segs, pa.int64()), "ridx": pa.array([ridx[s] for s in segs], pa.int64()),
                     "wmm": pa.array([store.segments[s].wall_minus_mono_ns for s in segs], pa.int64()),
                     "run_id": pa.array([str(store.segments[s].meta.get("run_id")) for s in segs])})


def _q(name: str) -> str:
    return str(name).replace("'", "''")


def load_series(runs, *, since=None, until=None, region=None, host=None, label=None):
    """Series for ``runs``: run files / RunData (``build_series``) and store roots / Stores (the engine).

    The selection (since/until wall-clock ns or text, region/host/label) applies to the stores; given with
    run files only, it is a ValueError (a run file is selected whole). Returns (series, store info or None):
    the info holds the selection, what it matched and the store's warnings (files left out, by name)."""
    from aurora_core.recorder import RunData, load_run
    from aurora_core.store import Store, is_store, open_store, parse_time

    from .spikes import build_series

    sel = {"since": None if since is None else parse_time(since), "until": None if until is None else parse_time(until),
           "region": region or None, "host": host or None, "label": label or None}
    files, roots, stores = [], [], []
    for r in runs:
        if isinstance(r, Store):
            stores.append(r)
        elif not isinstance(r, RunData) and is_store(r):
            roots.append(r)
        else:
            files.append(r if isinstance(r, RunData) else load_run(r))
    if roots:
        stores.append(open_store(roots, **sel))
    if not stores and any(v is not None for v in sel.values()):
        raise ValueError("diagnose: --since/--until/--region/--host/--label select within a store, and "
                         f"{', '.join(str(f.path) for f in files)} is a run file (read whole; `aurora convert` "
                         "turns it into a store)")
    series = build_series(files) if files else []
    info = None
    for st in stores:
        st.require("diagnose")
        series += series_from_store(st)
        info = info or {"selection": [], "requests": 0, "warnings": []}
        info["selection"].append(st.describe_selection())
        info["requests"] += st.count()
        info["warnings"] += st.warnings
    if sel["since"] is not None and sel["until"] is not None and sel["until"] <= sel["since"]:
        raise ValueError("diagnose: --until must be later than --since")
    return series, info
