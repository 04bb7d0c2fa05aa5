"""Reading a store: find and check segments, select by time/region/host/label, query with DuckDB.

``open_store(roots, since=, until=, region=, host=, label=)`` scans ``ROOT/region=*/host=*/`` for
segments, reads each one's meta from its schema metadata (the Parquet footer, or the head of an open
Arrow stream), and keeps the segments that may hold selected requests. A file that cannot be used is
named in ``Store.warnings`` and left out; the rest is analysed:

- a file that is not a segment table (a stray file, a truncated or foreign Parquet file, a ``.tmp``
  left by a crash during rotation);
- a segment of a newer format version than this reader knows;
- a segment that overlaps another process's segment of the same host (a copy under another name, or two
  recorders writing one host directory): the later one is left out;
- a segment whose host clock was ahead of this machine's (timestamps in the future), or that stepped
  by more than 1 s while it was written (kept, with the warning: its times follow the clock at start).

An open segment (``.arrows``: the process is running, or was killed) is read up to its last complete
record batch. DuckDB scans the Parquet files, with the time filter pushed into the scan (``t_ns`` is on
the wall clock; row groups carry min/max) and region/host/label resolved per segment before any scan.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from aurora_core.records import STAGES

from .schema import FORMAT_VERSION, LATENCY, META_KEY, STAMPS, TABLES, request_arrays

_NAME = re.compile(r"^(?P<seg>[^.]+)\.(?P<table>requests|spans|samples|events)\.(?P<ext>parquet|arrows)$")
#: A clock step or disagreement smaller than this is ordinary NTP slew, not worth a word.
CLOCK_TOLERANCE_NS = 1_000_000_000


class StoreError(ValueError):
    """Nothing to analyse: no store at the path, or no segment matches the selection (the message says
    what the store holds); or the query engine could not read a file (the message names it)."""


@contextlib.contextmanager
def engine_errors(store: Store, what: str):
    """A DuckDB error at query time as a StoreError naming the file where it can: a file removed by
    retention since the scan, or a damaged page behind a valid footer (the scan reads footers only)."""
    import duckdb

    try:
        yield
    except duckdb.Error as e:
        text = str(e)
        files = [p for s in store.segments for p in s.files.values()]
        bad = (next((p for p in files if str(p) in text), None) or next((p for p in files if not p.exists()), None)
               or _damaged(store, files))
        where = f"the file {bad}" if bad else f"a file under {', '.join(map(str, store.roots))}"
        raise StoreError(f"{what}: the query engine could not read {where}: {text.splitlines()[0]}; if retention "
                         "removed it, run again; if it is damaged, move it out of the store and run again") from e


def is_store(path) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("region=*/host=*"))


def parse_time(text) -> int:
    """A --since/--until value as wall-clock ns: ISO 8601 (a naive time is UTC) or Unix seconds."""
    if isinstance(text, (int, float)):
        return int(text * 1e9)
    s = str(text).strip()
    try:
        return int(float(s) * 1e9)
    except ValueError:
        pass
    try:
        d = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"store: expected a time as ISO 8601 (2026-12-05T14:00:00Z) or Unix seconds, "
                         f"got {text!r}") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return int(d.timestamp() * 1e9)


def fmt_ns(ns) -> str:
    if ns is None:
        return "?"
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _damaged(store: Store, files: list[Path]) -> Path | None:
    """The first Parquet file whose pages the engine cannot decode (DuckDB does not always say which)."""
    import duckdb

    for p in files:
        if p.suffix == ".parquet":
            try:  # hash every value: no statistic stands in for a page
                store.con.execute(f"SELECT sum(hash(COLUMNS(*))) FROM read_parquet('{_sql_str(p)}')").fetchall()
            except duckdb.Error:
                return p
    return None


@dataclass
class Segment:
    """One segment of one process: its files (table -> path), meta, and where its requests lie."""

    name: str
    dir: Path
    meta: dict
    files: dict[str, Path] = field(default_factory=dict)
    open: bool = False                        # still an Arrow stream (running or killed process)
    tables: dict[str, pa.Table] = field(default_factory=dict)  # open segments, read in memory
    t_first_ns: int | None = None
    t_last_ns: int | None = None
    n_requests: int = 0
    has_latency: bool = False                 # its requests hold ``latency_ns`` (see ``schema.LATENCY``)

    @property
    def path(self) -> Path:
        return self.files["requests"]

    @property
    def wall_minus_mono_ns(self) -> int:
        return int(self.meta.get("wall_minus_mono_ns") or 0)

    @property
    def host(self) -> str:
        return str(self.meta.get("host") or "?")

    @property
    def region(self) -> str:
        return str(self.meta.get("region") or "")

    @property
    def label(self) -> str | None:
        return self.meta.get("label")

    @property
    def key(self) -> tuple[str, str]:
        return (self.host, self.region)

    @property
    def name_(self) -> str:
        return f"{self.host}/{self.region}" if self.region else self.host


def _read_stream(path: Path, table: str, warnings: list[str]) -> tuple[dict, pa.Table]:
    """An open segment's stream up to its last complete batch. Arrow writes a stream's schema with its
    first batch, so a table nothing was written to yet is an empty file: an empty table."""
    if path.stat().st_size == 0:
        return {}, TABLES[table].empty_table()
    with pa.OSFile(str(path), "rb") as f:
        try:
            reader = ipc.open_stream(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"not an Arrow stream ({e})") from None
        meta = json.loads((reader.schema.metadata or {}).get(META_KEY, b"{}"))
        batches = []
        try:
            for b in reader:
                batches.append(b)
        except (pa.ArrowInvalid, OSError) as e:
            warnings.append(f"store: {path}: cut off after {sum(b.num_rows for b in batches)} rows (a crash while "
                            f"writing); read what was complete ({e})")
    return meta, pa.Table.from_batches(batches, schema=reader.schema)


def _read_meta(path: Path) -> tuple[dict, list[str]]:
    """(segment meta, column names) from a Parquet file's footer."""
    schema = pq.read_schema(path)
    md = schema.metadata or {}
    if META_KEY not in md:
        raise ValueError("a Parquet file without aurora segment metadata")
    return json.loads(md[META_KEY]), schema.names


def scan(roots) -> tuple[list[Segment], list[str]]:
    """Every usable segment under ``roots`` (store roots), and a warning per file left out."""
    warnings: list[str] = []
    segs: dict[tuple[Path, str], Segment] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"store: no store at {root} (expected a directory holding region=*/host=*/)")
        for d in sorted(root.glob("region=*/host=*")):
            if not d.is_dir():
                continue
            files = sorted(p for p in d.iterdir() if p.is_file())
            by_seg: dict[str, dict[str, dict[str, Path]]] = {}
            for p in files:
                m = _NAME.match(p.name)
                if not m:
                    why = ("left by a crash during rotation; the segment's stream or Parquet file is read instead"
                           if p.name.endswith(".tmp") else "not a segment file (<segment>.<table>.parquet|arrows)")
                    warnings.append(f"store: ignoring {p}: {why}")
                    continue
                by_seg.setdefault(m["seg"], {}).setdefault(m["table"], {})[m["ext"]] = p
            for name, tables in by_seg.items():
                seg = _segment(d, name, tables, warnings)
                if seg is not None:
                    segs[(d, name)] = seg
    return list(segs.values()), warnings


def _segment(d: Path, name: str, tables: dict[str, dict[str, Path]], warnings: list[str]) -> Segment | None:
    req = tables.get("requests")
    if req is None:
        warnings.append(f"store: ignoring segment {d / name}: it has no requests file")
        return None
    seg = Segment(name, d, {})
    for table, exts in tables.items():
        # A crash between the Parquet rename and the stream's removal leaves both: the Parquet is whole.
        seg.files[table] = exts.get("parquet") or exts["arrows"]
    seg.open = seg.files["requests"].suffix == ".arrows"
    try:
        if seg.open:
            meta, seg.tables["requests"] = _read_stream(seg.path, "requests", warnings)
            # No request yet (a replica that died before its first one) need not mean nothing: its samples
            # and events (an Xid) may be there, and every stream carries the meta.
            for table in ("spans", "samples", "events"):
                if meta or table not in tables or "arrows" not in tables[table] or seg.files[table].suffix != ".arrows":
                    continue
                with contextlib.suppress(ValueError, OSError, pa.ArrowException):
                    meta = _read_stream(seg.files[table], table, [])[0]
            if not meta:
                return None  # stopped before its first write: nothing to read, nothing lost
            seg.meta = meta
        else:
            seg.meta, names = _read_meta(seg.path)
            seg.has_latency = LATENCY in names
    except (ValueError, OSError, pa.ArrowException) as e:
        warnings.append(f"store: ignoring {seg.path}: not a readable aurora segment ({e})")
        return None
    # The other tables: a stream is read now (open, or a crash in the middle of closing the segment); a
    # Parquet file's footer is checked, so that one damaged table costs that table, not the whole query.
    for table, p in list(seg.files.items()):
        if table == "requests":
            continue
        try:
            if p.suffix == ".arrows":
                seg.tables[table] = _read_stream(p, table, warnings)[1]
            else:
                pq.read_schema(p)
        except (ValueError, OSError, pa.ArrowException) as e:
            warnings.append(f"store: ignoring {p}: not readable ({e}); the segment's other tables are read")
            del seg.files[table]
    fmt = seg.meta.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        warnings.append(f"store: ignoring {seg.path}: written by format version {fmt}, this reader knows up to "
                        f"{FORMAT_VERSION}; read it with a newer aurora_core")
        return None
    if seg.open:
        t = seg.tables["requests"].column("t_ns")
        seg.n_requests = seg.tables["requests"].num_rows
        seg.t_first_ns, seg.t_last_ns = pc.min(t).as_py(), pc.max(t).as_py()
        if seg.t_first_ns is None:  # no request: place the segment by its telemetry, so a selection finds it
            ts = [x for table, col in (("spans", "start_ns"), ("samples", "ts_ns"), ("events", "ts_ns"))
                  if table in seg.tables for x in (pc.min(seg.tables[table].column(col)).as_py(),
                                                   pc.max(seg.tables[table].column(col)).as_py()) if x is not None]
            if ts:
                seg.t_first_ns, seg.t_last_ns = min(ts) + seg.wall_minus_mono_ns, max(ts) + seg.wall_minus_mono_ns
    else:
        seg.t_first_ns, seg.t_last_ns = seg.meta.get("t_first_ns"), seg.meta.get("t_last_ns")
        seg.n_requests = int((seg.meta.get("segment_counts") or {}).get("requests", 0))
    if seg.open:
        seg.has_latency = LATENCY in seg.tables["requests"].schema.names
    return seg


def _check(segs: list[Segment], warnings: list[str]) -> list[Segment]:
    """Clocks and overlaps (see the module doc); returns the segments kept."""
    now = time.time_ns()
    kept = []
    for s in segs:
        if s.t_last_ns is not None and s.t_last_ns > now + 60 * 1_000_000_000:
            warnings.append(f"store: ignoring {s.path}: host {s.host}'s clock is ahead of this machine's: its "
                            f"requests end at {fmt_ns(s.t_last_ns)}, {(s.t_last_ns - now) / 1e9:.0f} s from now; "
                            "fix the host's clock (NTP) before comparing it with others")
            continue
        end = s.meta.get("wall_minus_mono_end_ns")
        if end is not None and abs(end - s.wall_minus_mono_ns) > CLOCK_TOLERANCE_NS:
            warnings.append(f"store: {s.path}: host {s.host}'s clock stepped by {(end - s.wall_minus_mono_ns) / 1e9:+.1f} s "
                            "while it was written; its times follow the clock at the segment's start")
        kept.append(s)
    by_host: dict[tuple[str, str], list[Segment]] = {}
    for s in kept:
        by_host.setdefault(s.key, []).append(s)
    out = []
    for _, ss in sorted(by_host.items()):
        ss.sort(key=lambda s: (s.t_first_ns is None, s.t_first_ns or 0, s.name))
        last: Segment | None = None
        for s in ss:
            dup = last is not None and s.name == last.name
            clash = (last is not None and s.t_first_ns is not None and last.t_last_ns is not None
                     and s.meta.get("run_id") != last.meta.get("run_id")
                     and min(s.t_last_ns, last.t_last_ns) - s.t_first_ns > min(
                         CLOCK_TOLERANCE_NS, (s.t_last_ns - s.t_first_ns) // 2,
                         (last.t_last_ns - last.t_first_ns) // 2))
            if dup or clash:
                warnings.append(f"store: ignoring {s.path}: it overlaps {last.path} of the same host {s.host} "
                                f"({fmt_ns(s.t_first_ns)} to {fmt_ns(min(s.t_last_ns, last.t_last_ns))})"
                                + ("; the same segment twice (copied under two roots?)" if dup else
                                   "; two recorders wrote one host directory (give each its own host name)"))
                continue
            out.append(s)
            if last is None or (s.t_last_ns or 0) >= (last.t_last_ns or 0):
                last = s
    return out


class Store:
    """The selected segments of one or more store roots, and a DuckDB connection over them.

    since/until: wall-clock ns (``parse_time``); region/host/label: exact names, or lists of them."""

    def __init__(self, roots, *, since: int | None = None, until: int | None = None, region=None, host=None,
                 label=None, dirs=None):
        import duckdb

        self.roots = [Path(r) for r in roots]
        all_segs, self.warnings = scan(self.roots)
        self.all_segments = _check(all_segs, self.warnings)
        self.since, self.until = since, until
        want = {k: (None if v is None else {v} if isinstance(v, str) else set(v))
                for k, v in (("region", region), ("host", host), ("label", label))}
        self.filters = {k: sorted(v) for k, v in want.items() if v}

        dirs = None if dirs is None else {Path(d).resolve() for d in dirs}

        def keep(s: Segment) -> bool:
            if dirs is not None and s.dir.resolve() not in dirs:
                return False
            if want["region"] and s.region not in want["region"]:
                return False
            if want["host"] and s.host not in want["host"]:
                return False
            if want["label"] and s.label not in want["label"]:
                return False
            if s.t_first_ns is None:
                return False
            return not ((since is not None and s.t_last_ns < since) or (until is not None and s.t_first_ns >= until))

        self.segments = [s for s in self.all_segments if keep(s)]
        self._count: int | None = None
        self._owner, self._local, self._open = threading.get_ident(), threading.local(), {}
        self.con = duckdb.connect()
        self.con.execute("SET threads TO 2")
        self._register()

    # ---- what the store holds (for messages) ----------------------------------------------------
    def holds(self) -> str:
        segs = self.all_segments
        if not segs:
            return "it holds no readable segment"
        lo = min((s.t_first_ns for s in segs if s.t_first_ns is not None), default=None)
        hi = max((s.t_last_ns for s in segs if s.t_last_ns is not None), default=None)
        regions = sorted({s.region or "-" for s in segs})
        hosts = sorted({s.host for s in segs})
        labels = sorted({str(s.label) for s in segs if s.label})
        shown = ", ".join(hosts[:8]) + (f" and {len(hosts) - 8} more" if len(hosts) > 8 else "")
        return (f"it holds {sum(s.n_requests for s in segs):,} requests from {fmt_ns(lo)} to {fmt_ns(hi)} in "
                f"{len(segs)} segment(s); regions {', '.join(regions)}; hosts {shown}"
                + (f"; labels {', '.join(labels)}" if labels else ""))

    def describe_selection(self) -> str:
        parts = [f"{k} {'|'.join(v)}" for k, v in self.filters.items()]
        if self.since is not None:
            parts.append(f"since {fmt_ns(self.since)}")
        if self.until is not None:
            parts.append(f"until {fmt_ns(self.until)}")
        return ", ".join(parts) or "everything"

    def require(self, what: str = "store") -> None:
        """StoreError when the selection holds no request (a typo in a host name, a range outside the data)."""
        if not self.segments or self.count() == 0:
            raise StoreError(f"{what}: no requests match ({self.describe_selection()}) in "
                             f"{', '.join(map(str, self.roots))}: {self.holds()}")

    # ---- DuckDB ---------------------------------------------------------------------------------
    def cursor(self):
        """This thread's DuckDB connection to the store: the main one on the thread that opened it, else a
        cursor with the open segments' tables registered (registrations are per connection). Queries naming
        files or ``sources()`` run on it; the store-wide views stay on the main connection."""
        if threading.get_ident() == self._owner:
            return self.con
        cur = getattr(self._local, "con", None)
        if cur is None:
            cur = self._local.con = self.con.cursor()
            for name, tbl in self._open.items():
                cur.register(name, tbl)
        return cur

    def _register(self) -> None:
        self.con.register("seginfo", pa.table({
            "seg": pa.array(range(len(self.segments)), pa.int64()),
            "region": pa.array([s.region or "-" for s in self.segments], pa.string()),
            "host": pa.array([s.host for s in self.segments], pa.string())}))
        for table, schema in TABLES.items():
            parts = []
            files, names = [], []
            for i, s in enumerate(self.segments):
                if table in s.tables:
                    tbl = s.tables[table]
                    tbl = tbl.append_column("seg", pa.array(np.full(tbl.num_rows, i), pa.int64()))
                    tbl = tbl.append_column("row", pa.array(np.arange(tbl.num_rows), pa.int64()))
                    self.con.register(f"open_{table}_{i}", tbl)
                    self._open[f"open_{table}_{i}"] = tbl
                    parts.append(f"SELECT * FROM open_{table}_{i}")
                elif table in s.files:
                    files.append(str(s.files[table]))
                    names.append(i)
            if files:
                self.con.register(f"files_{table}", pa.table({"filename": files, "seg": pa.array(names, pa.int64())}))
                parts.insert(0, f"SELECT p.* EXCLUDE (filename, file_row_number), f.seg, p.file_row_number AS row "
                                f"FROM read_parquet([{', '.join(_sql_lit(f) for f in files)}], filename=true, "
                                f"file_row_number=true) p "
                                f"JOIN files_{table} f USING (filename)")
            if not parts:
                cols = ", ".join(f"NULL::{_duck_type(f.type)} AS {f.name}" for f in schema)
                parts = [f"SELECT {cols}, NULL::BIGINT AS seg, NULL::BIGINT AS row WHERE false"]
            self.con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(parts))

    def source(self, i: int, table: str = "requests") -> str:
        """A FROM item for one segment's table alone: a plain scan, so rows come in file order."""
        s = self.segments[i]
        if table in s.tables:
            return f"open_{table}_{i}"
        if table not in s.files:
            return f"(SELECT * FROM {table} WHERE false)"
        return f"read_parquet('{_sql_str(s.files[table])}')"

    def sources(self, idx, table: str = "requests") -> str:
        """A FROM item for the table of segments ``idx`` alone, with ``seg``: only their files are opened,
        where a query on the store-wide view reads every file's footer and row groups (a per-host query on
        a 48-host store paid for all 48)."""
        parts = []
        for i in idx:
            s = self.segments[i]
            if table in s.tables:
                parts.append(f"SELECT * EXCLUDE (row) FROM open_{table}_{i}")
            elif table in s.files:
                parts.append(f"SELECT *, {int(i)}::BIGINT AS seg FROM read_parquet('{_sql_str(s.files[table])}')")
        if not parts:
            return f"(SELECT * EXCLUDE (row) FROM {table} WHERE false)"
        return "(" + " UNION ALL BY NAME ".join(parts) + ")"

    # ---- aggregation inside the engine ----------------------------------------------------------
    def intervals(self, width_s: float) -> dict[str, np.ndarray]:
        with engine_errors(self, "store.intervals"):
            return self._intervals(width_s)

    def _intervals(self, width_s: float) -> dict[str, np.ndarray]:
        """Per (region, host, interval of ``width_s`` from the selection's first arrival), computed by DuckDB
        in one pass over the selection: ``start_ns`` (wall), ``requests``, ``ok``, ``p50_ms``/``p99_ms`` of the
        ok requests' pipeline latency (arrival to completion), and ``<stage>_ms``, the summed time of each
        service stage. Memory is one row per interval and host, however many requests."""
        if width_s <= 0:
            raise ValueError(f"store.intervals: width must be > 0 s, got {width_s}")
        w = int(width_s * 1e9)
        t0 = self.con.sql(f"SELECT min(t_ns) FROM requests WHERE {self.time_where()}").fetchall()[0][0]
        if t0 is None:
            return {}
        # Offsets are chained (schema doc): a stage whose end stamp directly follows its start stamp is the end's
        # offset when the start is present, and arrival to completion is the sum of all offsets.
        total = " + ".join(f"coalesce({f}, 0)" for f in STAMPS)
        if self.segments and all(s.has_latency for s in self.segments):
            total = LATENCY  # the same sum, stored: a scan of 3 columns instead of 14
        stages = {k: STAGES[k] for k in ("decode", "preprocess", "compute", "queue")}
        assert all(STAMPS.index(b) == STAMPS.index(a) + 1 for a, b in stages.values())
        sums = ", ".join(f"sum(CASE WHEN {a} IS NOT NULL AND {b} >= 0 THEN {b} END) / 1e6 AS {k}_ms"
                         for k, (a, b) in stages.items())
        rows = self.con.sql(f"""
            SELECT g.region, g.host, (t_ns - {t0}) // {w} AS k, count(*) AS requests,
                   count(*) FILTER (WHERE status = 'ok') AS ok,
                   quantile_cont(({total}) / 1e6, [0.5, 0.99]) FILTER (WHERE status = 'ok' AND completion_ns IS NOT NULL) AS q,
                   {sums}
            FROM requests JOIN seginfo g USING (seg) WHERE {self.time_where()}
            GROUP BY ALL ORDER BY g.region, g.host, k""").to_arrow_table()
        out = {"region": np.array(rows.column("region").to_pylist(), dtype=str),
               "host": np.array(rows.column("host").to_pylist(), dtype=str),
               "start_ns": rows.column("k").to_numpy() * w + t0,
               "requests": rows.column("requests").to_numpy(), "ok": rows.column("ok").to_numpy()}
        q = rows.column("q").to_pylist()
        out["p50_ms"] = np.array([x[0] if x else np.nan for x in q], np.float64)
        out["p99_ms"] = np.array([x[1] if x else np.nan for x in q], np.float64)
        for k in stages:
            out[f"{k}_ms"] = rows.column(f"{k}_ms").fill_null(0.0).to_numpy()
        return out

    def deployments(self) -> list[dict]:
        """Label (or deployment config) changes between consecutive segments of each host: when and to what."""
        out = []
        by_host: dict[tuple[str, str], list[Segment]] = {}
        for s in self.all_segments:
            by_host.setdefault(s.key, []).append(s)
        for (host, region), ss in sorted(by_host.items()):
            ss = sorted(ss, key=lambda s: s.t_first_ns or 0)
            for a, b in zip(ss, ss[1:], strict=False):
                fa = (a.label, a.meta.get("deployment"), a.meta.get("model"))
                fb = (b.label, b.meta.get("deployment"), b.meta.get("model"))
                if fa != fb and (self.since is None or (b.t_first_ns or 0) >= self.since - 3600 * 10**9) and (
                        self.until is None or (b.t_first_ns or 0) < self.until + 3600 * 10**9):
                    out.append({"host": host, "region": region, "at_ns": b.t_first_ns, "at": fmt_ns(b.t_first_ns),
                                "from": a.label, "to": b.label, "config_changed": fa[1:] != fb[1:]})
        return out

    def time_where(self, col: str = "t_ns") -> str:
        w = [f"{col} IS NOT NULL"]
        if self.since is not None:
            w.append(f"{col} >= {int(self.since)}")
        if self.until is not None:
            w.append(f"{col} < {int(self.until)}")
        return " AND ".join(w)

    def count(self) -> int:
        """Requests in the selection (counted once: the selection does not change)."""
        if not self.segments:
            return 0
        if self._count is None:
            with engine_errors(self, "store"):
                self._count = int(self.con.execute(f"SELECT count(*) FROM requests WHERE {self.time_where()}")
                                  .fetchall()[0][0])
        return self._count

    def groups(self) -> dict[tuple[str, str], list[int]]:
        """(host, region) -> indices of its selected segments."""
        out: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(self.segments):
            out.setdefault(s.key, []).append(i)
        return out

    # ---- results ----------------------------------------------------------------------------------
    def run_data(self):
        """The selection as RunData, one per segment (for commands that read whole runs, e.g. compare)."""
        with engine_errors(self, "store"):
            return self._run_data()

    def _run_data(self):
        from aurora_core.recorder import RunData

        runs = []
        for i, s in enumerate(self.segments):
            req = self.con.sql(f"SELECT * FROM {self.source(i)} WHERE {self.time_where()}").to_arrow_table()
            if req.num_rows == 0:
                continue
            requests = request_arrays(req, s.wall_minus_mono_ns)
            lo, hi = _mono_range(self, s)
            sp = self.con.execute(f"SELECT name, start_ns, end_ns, request_id, attrs FROM spans WHERE seg = {i} "
                                  f"AND start_ns >= {lo} AND start_ns < {hi} ORDER BY start_ns").fetchnumpy()
            spans = {k: (np.asarray(v, dtype=str) if k in ("name", "attrs") else np.asarray(v, np.int64))
                     for k, v in sp.items()}
            smp = self.con.execute(f"SELECT source, metric, ts_ns, value FROM samples WHERE seg = {i} AND "
                                   f"ts_ns >= {lo} AND ts_ns < {hi} ORDER BY source, metric, ts_ns, value").fetchall()
            samples: dict = {}
            for src, met, ts, v in smp:
                samples.setdefault((src, met), ([], []))
                samples[(src, met)][0].append(ts)
                samples[(src, met)][1].append(math.nan if v is None else v)
            samples = {k: (np.array(a, np.int64), np.array(b, np.float64)) for k, (a, b) in samples.items()}
            ev = self.con.execute(f"SELECT ts_ns, source, kind, value, detail FROM events WHERE seg = {i} AND "
                                  f"ts_ns >= {lo} AND ts_ns < {hi} ORDER BY ts_ns").fetchnumpy()
            events = {k: (np.asarray(v, dtype=str) if k in ("source", "kind", "detail") else
                          np.asarray(v, np.float64 if k == "value" else np.int64)) for k, v in ev.items()}
            runs.append(RunData(s.path, dict(s.meta), requests, spans, samples, events, {}))
        return runs


#: Telemetry, events and spans are kept this far outside a --since/--until range, so that a counter read
#: just after the range still covers its last seconds.
MARGIN_NS = 10_000_000_000


def _mono_range(store: Store, s: Segment) -> tuple[int, int]:
    lo = -(2**62) if store.since is None else store.since - MARGIN_NS - s.wall_minus_mono_ns
    hi = 2**62 if store.until is None else store.until + MARGIN_NS - s.wall_minus_mono_ns
    return lo, hi


def _sql_str(p) -> str:
    return str(p).replace("'", "''")


def _sql_lit(p) -> str:
    return "'" + _sql_str(p) + "'"


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t) or pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if t == pa.int32():
        return "INTEGER"
    return "BIGINT"


def open_store(roots, **kw) -> Store:
    return Store([roots] if isinstance(roots, (str, Path)) else roots, **kw)


def is_host_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and p.name.startswith("host=") and p.parent.name.startswith("region=")


def load_store_run(path):
    """A store root holding one host, or one host's directory (ROOT/region=R/host=H), as one RunData: its
    segments end to end on the first one's monotonic clock. For the commands that read one run (trace,
    bench --replay); diagnose and compare read stores directly."""
    from aurora_core.recorder import RunData

    p = Path(path)
    st = Store([p.parent.parent], dirs=[p]) if is_host_dir(p) else Store([p])
    st.require("load_run")
    hosts = sorted({s.name_ for s in st.segments})
    if len(hosts) > 1:
        raise ValueError(f"load_run: the store {p} holds {len(hosts)} hosts ({', '.join(hosts[:5])}); pass one "
                         "host's directory, ROOT/region=R/host=H")
    runs = st.run_data()
    # One process's segments share its monotonic clock (each segment's own wall offset differs by the
    # clock's drift, or an NTP step); another process is placed by the wall clock at its first segment.
    first: dict = {}
    for r in runs:
        first.setdefault(r.meta.get("run_id"), r.wall_minus_mono_ns)
    w0 = runs[0].wall_minus_mono_ns
    shift = lambda r: first[r.meta.get("run_id")] - w0  # noqa: E731
    def shifted(arrs: dict, r) -> dict:
        d = shift(r)
        return {k: (np.where(v != 0, v + d, 0) if k.endswith("_ns") and v.dtype.kind == "i" else v)
                for k, v in arrs.items()}
    cat = lambda dicts: {k: np.concatenate([x[k] for x in dicts]) for k in dicts[0]}  # noqa: E731
    samples: dict = {}
    for r in runs:
        for key, (ts, v) in r.samples.items():
            samples.setdefault(key, []).append((ts + shift(r), v))
    samples = {k: (np.concatenate([a for a, _ in x]), np.concatenate([b for _, b in x])) for k, x in samples.items()}
    meta = dict(runs[0].meta, segments=[str(r.path) for r in runs])
    return RunData(p, meta, cat([shifted(r.requests, r) for r in runs]), cat([shifted(r.spans, r) for r in runs]),
                   samples, cat([shifted(r.events, r) for r in runs]), {})
