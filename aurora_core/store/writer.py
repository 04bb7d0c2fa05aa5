"""The store writer: rotated, bounded, crash-safe segments under ``ROOT/region=R/host=H/``.

A segment is one stretch of one recording process: ``<start UTC>-<run id>-<seq>.<table>.<ext>`` for
the four tables of ``schema.TABLES``. While open, each table is an Arrow IPC stream (``.arrows``),
appended one record batch per writer flush and written straight to the OS (no user-space buffer), so a
SIGKILL loses at most the batch being written: the reader reads a stream up to its last whole batch.
At rotation (``rotate_s``, ``rotate_bytes``) or close the streams are rewritten as Parquet (zstd,
through a ``.tmp`` file renamed into place, then the stream is removed), so a crash at any point
leaves either the stream or the Parquet file. Every file carries the segment's meta (JSON) in its
schema metadata: a copied file still says which host, region, label, model and config wrote it.

A meta update that renames the host or region (a Ray replica whose slot Ray renumbered) closes the open
segment and opens the next one in the new directory.

Retention (``max_bytes``, ``max_age_s``) applies to the writer's own ``region=/host=`` directory after
each rotation: whole segments, oldest first, never the open one. A fleet merges stores by copying
these directories side by side.

A failed write (a full disk at rotation, say) abandons the segment: its files are closed as they are
(the reader reads a stream up to its last whole batch), retention runs, and the next write opens a new
segment; ``errors`` and ``last_error`` count and keep the failures, logged at most once a minute.

Each segment takes the clock offset (``wall_minus_mono_ns``) afresh when it starts, so a clock stepped by
NTP costs the segment it stepped in, not every later one.

Only the recorder's writer thread calls a ``StoreWriter``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .schema import FORMAT_VERSION, LATENCY, META_KEY, STAMPS, TABLES

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_OWN = ("format", "segment", "seq", "segment_started_wall", "segment_closed_wall", "segment_counts", "t_first_ns",
        "t_last_ns", "wall_minus_mono_end_ns")
#: Seconds between two log lines about failed writes (a full disk fails every flush).
LOG_EVERY_S = 60.0


def partition(value) -> str:
    """A host/region name as a path component (Hive style ``key=value``): unsafe characters become _."""
    return _SAFE.sub("_", str(value)) if value else "_"


def segment_dir(root, meta: dict) -> Path:
    return Path(root) / f"region={partition(meta.get('region'))}" / f"host={partition(meta.get('host'))}"


def _parquet_kw(table: str) -> dict:
    if table != "requests":
        return {"compression": "zstd"}
    # Stamps, ids, offsets and latency are near-sorted or small: delta encoding (bit-packed: a constant offset
    # decodes at almost no cost, where PLAIN + zstd inflated 8 bytes a row), then zstd; the rest dictionary/RLE.
    delta = ["t_ns", "request_id", "batch_id", *STAMPS, LATENCY]
    return {"compression": "zstd", "compression_level": 6, "use_dictionary": ["status", "device", "batch_size",
            "bucket", "queue_depth", "priority"], "column_encoding": {c: "DELTA_BINARY_PACKED" for c in delta},
            "row_group_size": 1 << 17}


class StoreWriter:
    """Writes one process's records into ``root``. meta: the recorder's meta (host, region, run_id, ...)."""

    def __init__(self, root, meta: dict, *, rotate_s: float = 600.0, rotate_bytes: int = 256 << 20,
                 max_bytes: int | None = None, max_age_s: float | None = None, live: bool = True):
        if rotate_s <= 0 or rotate_bytes <= 0:
            raise ValueError(f"StoreWriter: rotate_s and rotate_bytes must be > 0, got {rotate_s}, {rotate_bytes}")
        self.root = Path(root)
        self.dir = segment_dir(root, meta)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = {k: v for k, v in meta.items() if k not in _OWN}
        self.rotate_s, self.rotate_bytes = rotate_s, rotate_bytes
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self.seq = 0
        self.live = live  # recording now: the clock offset at close says whether the host's clock stepped
        self.segments_written = 0
        self.deleted: list[str] = []
        self.errors = 0
        self.last_error: BaseException | None = None
        self._logged_at = -LOG_EVERY_S
        self._logged_errors = 0
        self._open: dict[str, tuple[ipc.RecordBatchStreamWriter, pa.OSFile, Path]] = {}
        self._name = ""
        self._opened_at = 0.0
        self._t_range = [None, None]
        self._counts: dict[str, int] = {}
        self._start()

    # ---- segments ------------------------------------------------------------------------------
    def _start(self) -> None:
        now = _dt.datetime.now(_dt.timezone.utc)
        self._name = f"{now:%Y%m%dT%H%M%S%f}Z-{str(self.meta.get('run_id', 'run'))[:12]}-{self.seq:05d}"
        self._opened_at = time.monotonic()
        self._t_range = [None, None]
        self._counts = {t: 0 for t in TABLES}
        self.meta.update(format=FORMAT_VERSION, segment=self._name, seq=self.seq,
                         segment_started_wall=now.isoformat())
        if self.live:
            self.meta["wall_minus_mono_ns"] = time.time_ns() - time.monotonic_ns()
        self._open = {}
        for table, schema in TABLES.items():
            path = self.dir / f"{self._name}.{table}.arrows"
            sink = pa.OSFile(str(path), "wb")
            writer = ipc.new_stream(sink, schema.with_metadata({META_KEY: json.dumps(self.meta)}))
            self._open[table] = (writer, sink, path)

    def _finish(self) -> None:
        """Rewrite the open streams as Parquet with the final meta; remove the streams."""
        self.meta.update(segment_closed_wall=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                         segment_counts=dict(self._counts), t_first_ns=self._t_range[0], t_last_ns=self._t_range[1])
        if self.live:
            self.meta["wall_minus_mono_end_ns"] = time.time_ns() - time.monotonic_ns()
        md = {META_KEY: json.dumps(self.meta)}
        for table, (writer, sink, path) in self._open.items():
            writer.close()
            sink.close()
            with pa.memory_map(str(path)) as src:
                tbl = ipc.open_stream(src).read_all()
            tbl = tbl.replace_schema_metadata(md)
            final = path.with_suffix(".parquet")
            tmp = path.with_suffix(".parquet.tmp")
            pq.write_table(tbl, tmp, **_parquet_kw(table))
            os.replace(tmp, final)
            path.unlink()
        self._open = {}
        self.segments_written += 1

    def open_bytes(self) -> int:
        return sum(sink.tell() for _, sink, _ in self._open.values())

    @property
    def wall_minus_mono_ns(self) -> int:
        """The open segment's clock offset: what a request's monotonic stamps are placed with."""
        return int(self.meta.get("wall_minus_mono_ns") or 0)

    def ensure_open(self) -> None:
        """Open a new segment if the last one was abandoned; on failure, abandon again and raise."""
        if not self._open:
            try:
                self._start()
            except Exception as e:
                self._fail(e)
                raise

    def _fail(self, e: BaseException) -> None:
        """Count and log a failed write, and abandon the segment."""
        self.note_error(e)
        self.abandon()

    def note_error(self, e: BaseException) -> None:
        """Count a failure and log it, at most once every ``LOG_EVERY_S`` (a full disk fails every flush)."""
        self.errors += 1
        self.last_error = e
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.error("store: writing segment %s in %s failed: %r (%d failure(s), %d since the last report); "
                      "the batch or segment is abandoned, the next write opens a new segment", self._name, self.dir,
                      e, self.errors, self.errors - self._logged_errors)
            self._logged_at, self._logged_errors = now, self.errors

    def abandon(self) -> None:
        """Give up the open segment after a failure: close its files as they are (best effort), remove its
        half-written Parquet files and empty streams, run retention. The next write opens a new segment."""
        for writer, sink, _ in self._open.values():
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(Exception):
                sink.close()
        self._open = {}
        with contextlib.suppress(Exception):
            files = list(self.dir.glob(f"{self._name}.*"))
            # The reader needs a requests file to find a segment: keep it, empty, beside other data.
            empty = all(_size(p) == 0 for p in files if p.suffix != ".tmp")
            for p in files:
                if p.suffix == ".tmp" or (_size(p) == 0 and (empty or ".requests." not in p.name)):
                    p.unlink()
        self.seq += 1
        with contextlib.suppress(Exception):
            self.retain()

    # ---- writing -------------------------------------------------------------------------------
    def write(self, batches: dict[str, pa.RecordBatch], meta_updates: dict | None = None) -> None:
        """Append one flush's batches (table -> RecordBatch, any subset); rotate when due. Requests must be
        placed with ``wall_minus_mono_ns`` after ``ensure_open``. Raises (after abandoning the segment) when
        the batches could not be appended; a failed rotation is counted and abandoned, not raised: the
        batches are in the abandoned segment's streams."""
        if meta_updates:
            # The recorder's "format" is its run file's; a segment's keys (and a live clock offset) the writer's own.
            own = _OWN + ("wall_minus_mono_ns",) if self.live else _OWN
            updates = {k: v for k, v in meta_updates.items() if k not in own}
            moved = segment_dir(self.root, {**self.meta, **updates})
            if moved != self.dir:  # a new host or region name: its segments go to its own directory
                self.close()  # finished (or abandoned): ensure_open below starts the next one there
                self.seq += 1
                self.dir = moved
                self.dir.mkdir(parents=True, exist_ok=True)
            self.meta.update(updates)
        self.ensure_open()
        try:
            for table, batch in batches.items():
                if batch.num_rows == 0:
                    continue
                self._open[table][0].write_batch(batch)
                self._counts[table] += batch.num_rows
                if table == "requests":
                    t = batch.column(0)
                    lo, hi = pc.min(t).as_py(), pc.max(t).as_py()
                    if lo is not None:
                        a, b = self._t_range
                        self._t_range = [lo if a is None else min(a, lo), hi if b is None else max(b, hi)]
        except Exception as e:
            self._fail(e)
            raise
        if time.monotonic() - self._opened_at >= self.rotate_s or self.open_bytes() >= self.rotate_bytes:
            try:
                self.rotate()
            except Exception as e:
                self._fail(e)

    def rotate(self) -> None:
        self._finish()
        self.seq += 1
        self._start()
        self.retain()

    def close(self, meta_updates: dict | None = None) -> None:
        """Finish the open segment; a failure is counted and the segment abandoned, as in ``write``."""
        if meta_updates:
            self.meta.update(meta_updates)
        if self._open:
            try:
                self._finish()
                self.retain()
            except Exception as e:
                self._fail(e)

    # ---- retention -----------------------------------------------------------------------------
    def retain(self) -> list[str]:
        """Delete whole closed segments of this host directory, oldest first, beyond max_bytes or max_age_s."""
        if self.max_bytes is None and self.max_age_s is None:
            return []
        segs: dict[str, list[Path]] = {}
        live = time.time() - 60
        for p in self.dir.iterdir():
            segs.setdefault(p.name.split(".", 1)[0], []).append(p)
        # The segment being written (or just closed) counts toward the total but is never removed.
        total = sum(_size(p) for ps in segs.values() for p in ps)
        segs.pop(self._name, None)
        # Another live writer's open segment (one process per host directory is the rule, but do no harm).
        segs = {s: ps for s, ps in segs.items() if not any(p.suffix == ".arrows" and _mtime(p) > live for p in ps)}
        # Names start with the UTC start time, so name order is age order.
        order = sorted(segs)
        sizes = {s: sum(_size(p) for p in segs[s]) for s in order}
        now = time.time()
        gone = []
        for s in order:
            too_old = self.max_age_s is not None and now - max(_mtime(p) for p in segs[s]) > self.max_age_s
            too_big = self.max_bytes is not None and total > self.max_bytes
            if not (too_old or too_big):
                break
            for p in segs[s]:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            total -= sizes[s]
            gone.append(s)
        if gone:
            log.info("store: retention removed %d segment(s) from %s (%s)", len(gone), self.dir, ", ".join(gone))
        self.deleted += gone
        return gone


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0
