"""``Series`` straight from a store: the per-request arithmetic of ``spikes._series`` done inside DuckDB.

The result is the same Series ``build_series`` makes from the same runs read as RunData (one run per
segment; ``tests/test_store.py`` checks them array for array), without a Python tuple or a RunData copy
of the requests: the engine scans only the selected segments and time range, links spans to their
requests, and hands back exactly the Series columns, streamed into numpy, one host (``GroupSource``) at a
time. ``diagnose`` holds only detection's columns of a host (arrival, status, latency: ~25 bytes a request)
and reads every column (~130 bytes) only for the ranges its analysis needs (``Series.select``).
"""

from __future__ import annotations

import math

import numpy as np

from aurora_core.records import STAGES
from aurora_core.store.reader import Segment, Store, _mono_range, _sql_str, engine_errors
from aurora_core.store.schema import LATENCY, STAMPS

from .spikes import SERVICE_STAGES, Series
from .stats import group_percentiles

_NARROW = ("t", "run_idx", "ok", "e2e_ns")
_COLS = {"t": np.float64, "run_idx": np.int64, "ok": np.bool_, "e2e_ns": np.int64, "wait_ns": np.int64,
         **{f"stage_{s}": np.int64 for s in SERVICE_STAGES}, "bucket": np.int64, "queue_depth": np.int64,
         "batch": np.int64, "compute0": np.float64, "compute1": np.float64, "form0": np.float64,
         "form1": np.float64}


def _select(t0: int, full: bool = True, latency: bool = True) -> str:
    """The Series columns of one segment's rows, as DuckDB expressions over ``_stamps``' columns (the stored
    offsets and their running sums). A stage whose end stamp directly follows its start stamp (all service
    stages) is the end's offset when the start is present; arrival to completion is the sum of the offsets
    (see ``store.schema``). Not ``full``: only what detection reads (arrival, status, latency). ``latency``:
    the segment holds ``latency_ns``, the same sum stored (``schema.LATENCY``), so detection's scan skips the
    12 offset columns."""
    total = (f"CASE WHEN {LATENCY} >= 0 THEN {LATENCY} ELSE -1 END" if latency else
             "CASE WHEN completion_ns IS NOT NULL AND c_completion_ns >= 0 THEN c_completion_ns ELSE -1 END")
    head = f"CAST(t_ns - {t0} AS DOUBLE) / 1e9 AS t, t_ns, request_id, status = 'ok' AS ok, {total} AS total"
    if not full:
        return head
    for a, b in (STAGES[s] for s in SERVICE_STAGES):
        assert STAMPS.index(b) == STAMPS.index(a) + 1
    stage = {s: f"CASE WHEN {a} IS NOT NULL AND {b} >= 0 THEN {b} ELSE -1 END"
             for s, (a, b) in ((s, STAGES[s]) for s in SERVICE_STAGES)}
    service = " + ".join(f"greatest(stage_{s}, 0)" for s in stage)  # DuckDB reuses a select list's aliases
    sec = lambda c: f"CAST(t_ns + {c} - {t0} AS DOUBLE) / 1e9"  # noqa: E731
    comp = "compute_start_ns IS NOT NULL AND compute_end_ns >= 0"
    form = "decode_start_ns IS NOT NULL AND preprocess_end_ns IS NOT NULL AND c_preprocess_end_ns >= c_decode_start_ns"
    return f"""{head}, {', '.join(f"{e} AS stage_{s}" for s, e in stage.items())},
        CASE WHEN total >= 0 THEN greatest(total - ({service}), 0) ELSE -1 END AS wait_ns,
        CAST(CASE WHEN bucket > 0 THEN bucket ELSE greatest(batch_size, 1) END AS BIGINT) AS bucket,
        CAST(queue_depth AS BIGINT) AS queue_depth, batch_id,
        CASE WHEN {comp} THEN {sec('c_compute_start_ns')} ELSE 'NaN'::DOUBLE END AS compute0,
        CASE WHEN {comp} THEN {sec('c_compute_end_ns')} ELSE 'NaN'::DOUBLE END AS compute1,
        CASE WHEN {form} THEN {sec('c_decode_start_ns')} ELSE 'NaN'::DOUBLE END AS form0,
        CASE WHEN {form} THEN {sec('c_preprocess_end_ns')} ELSE 'NaN'::DOUBLE END AS form1"""


def _stamps(source: str, needed: bool) -> str:
    """A FROM item: ``source`` with ``c_<stamp>``, each stamp minus the arrival (the running sum of the chained
    offsets; valid where the stamp is present), computed once per row instead of once per use (1.5x faster
    reading every column). ``needed`` False: the source as it is."""
    if not needed:
        return source
    cum, prev = [], None
    for f in STAMPS:
        cum.append(f"{prev + ' + ' if prev else ''}coalesce({f}, 0) AS c_{f}")
        prev = f"c_{f}"
    return f"(SELECT *, {', '.join(cum)} FROM {source})"


def _fill(c: dict, at: slice, tbl, k: int, links) -> None:
    """Copy one batch of ``_select`` rows into the Series columns at ``at`` (those ``c`` holds); link spans
    (widening e2e)."""
    def col(name):
        return tbl.column(name).to_numpy(zero_copy_only=False)

    for name in c.keys() & set(tbl.column_names):
        c[name][at] = col(name)
    c["run_idx"][at] = k
    if "batch" in c:
        bid = col("batch_id")
        c["batch"][at] = np.where(bid >= 0, k * 2**32 + bid, -1)
    total = col("total")
    if links is None:
        c["e2e_ns"][at] = total  # no span: the user saw arrival to completion
        return
    ids, s0, s1, per = links
    rid = col("request_id")
    j = np.clip(np.searchsorted(ids, rid), 0, max(ids.size - 1, 0))
    hit = (ids[j] == rid) if ids.size else np.zeros(rid.size, bool)
    arrival = col("t_ns")
    start = np.where(hit, np.minimum(arrival, s0[j]), arrival)
    end = np.where(total >= 0, arrival + total, 0)
    end = np.where(hit, np.maximum(end, s1[j]), end)
    c["e2e_ns"][at] = np.where((total >= 0) & (end >= start), end - start, -1)
    if "span_0" in c:  # every column (detection reads only the widened e2e)
        for q, v in enumerate(per):
            c[f"span_{q}"][at] = np.where(hit, v[j], 0)


def series_from_store(store: Store, full: bool | None = True) -> list[Series]:
    """One Series per (host, region) of the selection: with every column (``full``), only detection's
    (False: ``Series.narrow``), or none (None: held by no array until ``Series.select`` loads what is needed,
    so a fleet is analysed one host at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    groups = list(store.groups().items())
    make = lambda g: GroupSource(store, f"{g[0][0]}/{g[0][1]}" if g[0][1] else g[0][0], g[1])  # noqa: E731
    if len(groups) > 1:
        with ThreadPoolExecutor(2) as ex:  # DuckDB releases the GIL while it reads
            sources = list(ex.map(make, groups))
    else:
        sources = [make(g) for g in groups]  # on this thread: its main connection, no second one
    sources = [src for src in sources if src.order]
    return [src.light() if full is None else src.series(full=full) for src in sources]


class GroupSource:
    """One (host, region) of a store: loads its requests as Series columns, all of them or only those
    arriving in given ranges, with every column or only detection's. Telemetry, events and span links are
    read once."""

    def __init__(self, store: Store, name: str, idx: list[int]):
        self.store, self.name = store, name
        con = store.cursor()  # a thread's own: series_from_store builds the hosts' sources on two threads
        first, last, count = {}, {}, {}
        for seg, a, b, n in con.execute(f"SELECT seg, min(t_ns), max(t_ns), count(*) FROM {store.sources(idx)} "
                                        f"WHERE {store.time_where()} GROUP BY seg").fetchall():
            first[seg], last[seg], count[seg] = a, b, n
        # Runs in the order build_series sorts them: by first arrival on the wall clock.
        self.order = sorted(first, key=lambda i: (first[i], i))
        if not self.order:
            return
        self.t0 = t0 = min(first.values())
        self.segments: list[Segment] = [store.segments[i] for i in self.order]
        # Per run (first, last arrival) in the Series' seconds, as float(t_ns - t0) / 1e9 like ``_select``.
        self.bounds = [((first[i] - t0) / 1e9, (last[i] - t0) / 1e9) for i in self.order]
        for i, s in zip(self.order, self.segments, strict=True):
            s.n_selected = count[i]
        self.counts = count
        ridx = {seg: k for k, seg in enumerate(self.order)}
        con.register("ridx", _ridx_table(ridx, store))
        self.span_where = span_where = " OR ".join(
            f"(s.seg = {i} AND s.start_ns >= {lo} AND s.start_ns < {hi})"
            for i in self.order for lo, hi in [_mono_range(store, store.segments[i])])
        self.span_names = [r[0] for r in con.execute(
            f"SELECT DISTINCT name FROM {store.sources(self.order, 'spans')} s WHERE {span_where} ORDER BY name").fetchall()]
        linked = None
        if self.span_names:
            # Spans link to requests of the same process (run_id), whichever segment each landed in.
            per_name = ", ".join(f"sum(CASE WHEN name = '{_sql_str(n)}' THEN end_ns - start_ns ELSE 0 END) AS span_{k}"
                                 for k, n in enumerate(self.span_names))
            linked = con.sql(f"""
                SELECT r.run_id, s.request_id, min(s.start_ns + r.wmm) AS s0, max(s.end_ns + r.wmm) AS s1, {per_name}
                FROM {store.sources(self.order, 'spans')} s JOIN ridx r USING (seg) WHERE ({span_where}) AND s.request_id >= 0 GROUP BY ALL
                ORDER BY r.run_id, s.request_id""").to_arrow_table()
        self.links = [_links_of(linked, str(s.meta.get("run_id")), len(self.span_names)) for s in self.segments]
        self._telemetry(con)
        con.unregister("ridx")

    def _telemetry(self, con) -> None:
        t0, span_where = self.t0, self.span_where
        part = lambda table: self.store.sources(self.order, table)  # noqa: E731
        sec = lambda e: f"CAST(({e}) - {t0} AS DOUBLE) / 1e9"  # noqa: E731
        self.samples = {}
        rows = con.execute(f"""SELECT source, metric, list({sec('s.ts_ns + x.wmm')} ORDER BY {sec('s.ts_ns + x.wmm')}, x.ridx, s.ts_ns, s.value),
                                      list(s.value ORDER BY {sec('s.ts_ns + x.wmm')}, x.ridx, s.ts_ns, s.value)
                               FROM {part('samples')} s JOIN ridx x USING (seg) WHERE {span_where.replace('start_ns', 'ts_ns')}
                               GROUP BY source, metric""").fetchall()
        for src, met, ts, vs in rows:
            self.samples[(src, met)] = (np.array(ts, np.float64),
                                        np.array([math.nan if v is None else v for v in vs], np.float64))
        self.events = [{"t": t, "source": src, "kind": k, "value": float(v), "detail": d} for t, src, k, v, d in con.execute(
            f"""SELECT {sec('s.ts_ns + x.wmm')} AS t, source, kind, value, detail FROM {part('events')} s JOIN ridx x USING (seg)
                WHERE {span_where.replace('start_ns', 'ts_ns')} ORDER BY t, x.ridx, s.ts_ns""").fetchall()]
        unl: dict[str, tuple] = {}
        if self.span_names:
            rows = con.execute(f"""
                SELECT s.name, {sec('s.start_ns + r.wmm')}, s.end_ns - s.start_ns FROM {part('spans')} s JOIN ridx r USING (seg)
                WHERE ({span_where}) AND (s.request_id < 0 OR NOT EXISTS (
                    SELECT 1 FROM {part('requests')} q JOIN ridx x USING (seg)
                    WHERE x.run_id = r.run_id AND q.request_id = s.request_id))
                ORDER BY r.ridx, s.start_ns""").fetchall()
            for nm, a, d in rows:
                unl.setdefault(nm, ([], []))
                unl[nm][0].append(a)
                unl[nm][1].append(d)
        self.unlinked = {k: (np.array(a, np.float64), np.array(d, np.int64)) for k, (a, d) in unl.items()}

    def _where(self, ranges) -> str:
        """SQL: the selection, and arrival (in the Series' seconds, computed as ``_select`` does, so the edges
        fall exactly where a mask on ``Series.t`` puts them) in one of ``ranges``; ns bounds a hair wider
        let the scan skip row groups."""
        w = self.store.time_where()
        if ranges is None:
            return w
        t = f"CAST(t_ns - {self.t0} AS DOUBLE) / 1e9"
        union: list[tuple[float, float]] = []  # the hosts of a region share a window: one range, not 16
        for a, b in sorted((float(a), float(b)) for a, b in ranges if b > a):
            if union and a <= union[-1][1]:
                union[-1] = (union[-1][0], max(union[-1][1], b))
            else:
                union.append((a, b))
        parts = [f"(t_ns >= {self.t0 + math.floor(a * 1e9) - 1000} AND t_ns < {self.t0 + math.ceil(b * 1e9) + 1000} "
                 f"AND {t} >= {a!r} AND {t} < {b!r})" for a, b in union]
        return f"{w} AND ({' OR '.join(parts) or 'false'})"

    def load(self, ranges=None, full: bool = True) -> dict[str, np.ndarray]:
        """The Series columns of the requests arriving in ``ranges`` ([(a, b)] in the Series' seconds; None: all),
        in ``build_series``' order."""
        con, where = self.store.cursor(), self._where(ranges)
        counts = self.counts if ranges is None else dict(con.execute(
            f"SELECT seg, count(*) FROM {self.store.sources(self.order)} WHERE {where} GROUP BY seg").fetchall())
        n = sum(counts.values())
        kinds = _COLS if full else {k: _COLS[k] for k in _NARROW}
        c = {k: np.empty(n, dt) for k, dt in kinds.items()}
        if full:
            c.update({f"span_{k}": np.empty(n, np.int64) for k in range(len(self.span_names))})
        pos = 0
        # One batch at a time, each segment a plain scan in file order: the peak is the columns plus one batch.
        for k, seg in enumerate(self.order):
            if counts.get(seg):
                latency = self.store.segments[seg].has_latency
                cols = _select(self.t0, full, latency)
                src = _stamps(self.store.source(seg), full or not latency)
                reader = con.sql(f"SELECT {cols} FROM {src} WHERE {where}").to_arrow_reader(1 << 16)
                for batch in reader:
                    m = batch.num_rows
                    _fill(c, slice(pos, pos + m), batch, k, self.links[k])
                    pos += m
                del reader
        if pos != n:
            raise RuntimeError(f"store: read {pos} requests of {self.name}, counted {n}")
        # build_series' order: by arrival, ties in run then record order (a stable sort of the concatenation).
        if n and np.any(np.diff(c["t"]) < 0):
            perm = np.argsort(c["t"], kind="stable")
            for key in c:
                c[key] = c[key][perm]
        return c

    def light(self) -> Series:
        """The Series with no request arrays (t and the rest None): runs, bounds and telemetry only."""
        return Series(name=self.name, runs=self.segments, t0_wall_ns=int(self.t0), t=None, run_idx=None, ok=None,
                      e2e_ns=None, wait_ns=None, stage_ns=None, bucket=None, queue_depth=None, batch=None,
                      compute_s=None, form_s=None, span_ns=None, unlinked_spans=self.unlinked, samples=self.samples,
                      events=self.events, run_bounds=list(self.bounds), source=self, narrow=True)

    def series(self, ranges=None, full: bool = True) -> Series:
        c = self.load(ranges, full)
        if full:
            compute_s = np.column_stack([c.pop("compute0"), c.pop("compute1")])
            form_s = np.column_stack([c.pop("form0"), c.pop("form1")])
        return Series(
            name=self.name, runs=self.segments, t0_wall_ns=int(self.t0), t=c["t"], run_idx=c["run_idx"], ok=c["ok"],
            e2e_ns=c["e2e_ns"], wait_ns=c.get("wait_ns"),
            stage_ns={s: c[f"stage_{s}"] for s in SERVICE_STAGES} if full else None,
            bucket=c.get("bucket"), queue_depth=c.get("queue_depth"), batch=c.get("batch"),
            compute_s=compute_s if full else None, form_s=form_s if full else None,
            span_ns={n: c[f"span_{k}"] for k, n in enumerate(self.span_names)} if full else None,
            unlinked_spans=self.unlinked, samples=self.samples, events=self.events, run_bounds=list(self.bounds),
            source=None if full and ranges is None else self, narrow=not full)


def _links_of(linked, run_id: str, n_spans: int):
    """(request ids sorted, first span start, last span end, [ns per span name]) of one process, or None."""
    if linked is None:
        return None
    import pyarrow.compute as pc

    rows = linked.filter(pc.equal(linked.column("run_id"), run_id))
    get = lambda name: rows.column(name).to_numpy()  # noqa: E731
    return get("request_id"), get("s0"), get("s1"), [get(f"span_{q}") for q in range(n_spans)]


def _ridx_table(ridx: dict[int, int], store: Store):
    import pyarrow as pa

    segs = list(ridx)
    return pa.table({"seg": pa.array(segs, pa.int64()), "ridx": pa.array([ridx[s] for s in segs], pa.int64()),
                     "wmm": pa.array([store.segments[s].wall_minus_mono_ns for s in segs], pa.int64()),
                     "run_id": pa.array([str(store.segments[s].meta.get("run_id")) for s in segs])})


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
        with engine_errors(st, "diagnose"):
            found = series_from_store(st, full=None) if st.segments else []
            if not found:
                st.require("diagnose")  # nothing selected: the error says what the store holds
            series += found
            info = info or {"selection": [], "requests": 0, "warnings": [], "overview": [], "stores": []}
            info["selection"].append(st.describe_selection())
            info["requests"] += sum(r.n_selected for s in found for r in s.runs)
            info["warnings"] += st.warnings
            info["stores"].append(st)
    if sel["since"] is not None and sel["until"] is not None and sel["until"] <= sel["since"]:
        raise ValueError("diagnose: --until must be later than --since")
    return series, info


def overview_grid(store: Store, width_s: float | None = None) -> tuple[int, float, float]:
    """(first ns, interval s, span s) of the fleet overview's intervals: ~60 over the selection, >= 10 s."""
    segs = store.segments
    lo = max([x for x in (store.since, min((s.t_first_ns for s in segs), default=None)) if x is not None], default=0)
    hi = min([x for x in (store.until, max((s.t_last_ns for s in segs), default=None)) if x is not None], default=0)
    span_s = max((hi - lo) / 1e9, 1e-9)
    return int(lo), float(width_s or max(10.0, span_s / 60)), span_s


def host_intervals(s: Series, grid: tuple[int, float, float]) -> dict[str, np.ndarray]:
    """One host's rows of ``Store.intervals`` on ``grid`` (``overview_grid``) from its held requests (a
    ``Series`` with detection's columns): diagnose builds the overview from the arrays it reads anyway,
    where a second scan of the store with per-interval quantiles took longer than the diagnosis (20 s for
    100 M requests). Latency is what the user saw (``Series.e2e_ns``)."""
    t0, width, _ = grid
    k = np.floor((s.t0_wall_ns - t0 + s.t * 1e9) / (width * 1e9)).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if k.size else np.zeros(0, np.intp)
    keys = k[starts]  # arrivals are sorted, so each interval is one run of k
    req = np.diff(np.r_[starts, k.size])
    inv = np.repeat(np.arange(keys.size), req)
    good = s.ok & (s.e2e_ns >= 0)
    gi, gl = inv[good], s.e2e_ns[good] / 1e6  # in arrival order, so already grouped by interval
    p50, p99 = group_percentiles(gl, np.searchsorted(gi, np.arange(keys.size + 1)), [50, 99])
    host, region = s.runs[0].host, s.runs[0].region or "-"
    return {"region": np.full(keys.size, region, dtype=object), "host": np.full(keys.size, host, dtype=object),
            "start_ns": keys * int(width * 1e9) + t0, "requests": req, "p50_ms": p50, "p99_ms": p99}


def fleet_overview(store: Store, width_s: float | None = None, rows: list[dict] | None = None) -> dict:
    """The store-level answers from per-interval aggregates: per region and host the request rate, its peak
    interval against its median one (did the load rise, by how much), and the worst interval's p99 against
    the median interval's (where it spiked); and each deployment (a label or config change between a host's
    segments) with its time. rows: ``host_intervals`` per host on ``overview_grid(store, width_s)``; None:
    the engine computes them (``Store.intervals``)."""
    from aurora_core.store.reader import fmt_ns

    _, width, span_s = overview_grid(store, width_s)
    if rows is None:
        iv = store.intervals(width)
    else:
        iv = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}
    out = {"interval_s": width, "regions": [], "hosts": [], "deployments": store.deployments()}
    if not iv:
        return out
    for level, key in (("regions", ("region",)), ("hosts", ("region", "host"))):
        names = sorted(set(zip(*(iv[k].tolist() for k in key), strict=True)))
        for name in names:
            m = np.ones(iv["requests"].size, bool)
            for k, v in zip(key, name, strict=True):
                m &= iv[k] == v
            # Per interval across the level's hosts: sum the counts; p99 as the worst host's (a bound).
            starts, inv = np.unique(iv["start_ns"][m], return_inverse=True)
            req = np.bincount(inv, weights=iv["requests"][m])
            p99 = np.full(starts.size, np.nan)
            np.fmax.at(p99, inv, iv["p99_ms"][m])
            full = req[:-1] if req.size > 2 else req  # the last interval is usually cut short
            med_rate = float(np.median(full)) / width
            peak = int(np.argmax(full))
            good = ~np.isnan(p99)
            worst = int(np.nanargmax(p99)) if good.any() else 0
            out[level].append({
                "name": "/".join(name), "requests": int(req.sum()), "rate_per_s": float(req.sum()) / span_s,
                "median_rate_per_s": med_rate, "peak_rate_per_s": float(full[peak]) / width,
                "peak_at": fmt_ns(int(starts[peak])),
                "p99_median_ms": float(np.median(p99[good])) if good.any() else math.nan,
                "p99_worst_ms": float(p99[worst]) if good.any() else math.nan, "p99_worst_at": fmt_ns(int(starts[worst]))})
    return out


def overview_lines(ov: dict, top: int = 8) -> list[str]:
    lines = [f"== fleet: per-interval figures over {ov['interval_s']:.0f} s intervals (computed in the store's engine)"]
    for level in ("regions", "hosts"):
        rows = ov[level]
        if level == "hosts":
            rows = sorted(rows, key=lambda r: -(r["p99_worst_ms"] / r["p99_median_ms"] if r["p99_median_ms"] > 0 else 0))
            if len(rows) > top:
                lines.append(f"   hosts: the {top} with the largest worst/median p99 of {len(rows)}")
            rows = rows[:top]
        for r in rows:
            rise = r["peak_rate_per_s"] / r["median_rate_per_s"] - 1 if r["median_rate_per_s"] > 0 else math.nan
            lines.append(f"   {level[:-1]} {r['name']}: {r['requests']:,} requests, {r['median_rate_per_s']:.0f}/s median, "
                         f"peak {r['peak_rate_per_s']:.0f}/s ({rise:+.0%}) at {r['peak_at']}; p99 {r['p99_median_ms']:.1f} ms "
                         f"median, worst {r['p99_worst_ms']:.1f} ms at {r['p99_worst_at']}")
    if ov["deployments"]:
        for d in ov["deployments"]:
            what = f"label {d['from']} -> {d['to']}" + (" and config" if d["config_changed"] else "")
            lines.append(f"   deployment on {d['host']}/{d['region']} at {d['at']}: {what}")
    else:
        lines.append("   deployments: no label or config change in the selection")
    return lines
