"""The store's on-disk schema: four tables per segment, Arrow types, and records <-> columns.

A request row keeps ``t_ns`` (arrival on the host's wall clock, ns) and every other stamp, in
``STAMPS`` order, as an offset from the previous stamp present (the arrival for the first; null where the
stamp is 0: the stage did not happen), so stamp k = t_ns + the sum of the non-null offsets up to k. Offsets are small, so Parquet's
delta/zstd encoding brings a row to well under 30 bytes where the absolute stamps of the SQLite run file
took ~85 (``benchmarks/bench_fleet.py`` measures it). ``latency_ns`` repeats arrival to completion for fast scans. Small integers are int32 and the two text fields
dictionary-encoded. A record with no arrival (never admitted) keeps ``t_ns`` null and loses its stamps.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from aurora_core.records import FIELD_NAMES

#: Bumped when a reader of this version could misread a newer segment; a reader skips newer ones by name.
FORMAT_VERSION = 2
#: Schema metadata key holding the segment's meta (JSON) in every file of a segment.
META_KEY = b"aurora"

STAMPS = tuple(f for f in FIELD_NAMES if f.endswith("_ns") and f != "arrival_ns")
#: Arrival to completion (ns; null without a completion), redundant with the chained offsets' sum, and kept
#: because a scan for latency then reads 3 columns instead of 14: detection over 100 M requests reads
#: this, t_ns and status. Segments written before it existed lack it; readers sum the offsets there.
LATENCY = "latency_ns"
SMALL_INTS = ("batch_size", "bucket", "queue_depth", "priority")
_INT_FIELDS = tuple(f for f in FIELD_NAMES if f not in ("status", "device"))

TABLES: dict[str, pa.Schema] = {
    "requests": pa.schema(
        [("t_ns", pa.int64()), ("request_id", pa.int64())]
        + [(f, pa.int64()) for f in STAMPS]
        + [("batch_id", pa.int64())] + [(f, pa.int32()) for f in SMALL_INTS]
        + [("status", pa.dictionary(pa.int32(), pa.string())), ("device", pa.dictionary(pa.int32(), pa.string()))]
        + [(LATENCY, pa.int64())]),
    # Spans, samples and events keep the recorder's monotonic stamps; the segment's wall_minus_mono_ns
    # places them (they are few, so no need to save bytes).
    "spans": pa.schema([("name", pa.string()), ("start_ns", pa.int64()), ("end_ns", pa.int64()),
                        ("request_id", pa.int64()), ("attrs", pa.string())]),
    "samples": pa.schema([("ts_ns", pa.int64()), ("source", pa.string()), ("metric", pa.string()),
                          ("value", pa.float64())]),
    "events": pa.schema([("ts_ns", pa.int64()), ("source", pa.string()), ("kind", pa.string()),
                         ("value", pa.float64()), ("detail", pa.string())]),
}


def request_columns(ints: np.ndarray, status: list[str], device: list[str], wall_minus_mono_ns: int) -> pa.RecordBatch:
    """ints: int64 [n, len(_INT_FIELDS)] in ``_INT_FIELDS`` order (RequestRecord's fields less the text ones)."""
    col = {f: ints[:, i] for i, f in enumerate(_INT_FIELDS)}
    arrival = col["arrival_ns"]
    has = arrival > 0
    arrays = [pa.array(arrival + wall_minus_mono_ns, mask=~has), pa.array(col["request_id"])]
    ref = arrival
    for f in STAMPS:  # chained: each stamp from the previous one present (see module doc)
        v = col[f]
        present = has & (v != 0)
        arrays.append(pa.array(v - ref, mask=~present))
        ref = np.where(present, v, ref)
    arrays.append(pa.array(col["batch_id"]))
    arrays += [pa.array(col[f].astype(np.int32)) for f in SMALL_INTS]
    arrays += [pa.array(status).dictionary_encode(), pa.array(device).dictionary_encode()]
    done = has & (col["completion_ns"] != 0)
    arrays.append(pa.array(col["completion_ns"] - arrival, mask=~done))
    return pa.RecordBatch.from_arrays(arrays, schema=TABLES["requests"])


def rows_batch(table: str, rows: list[tuple]) -> pa.RecordBatch:
    schema = TABLES[table]
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in schema]
    return pa.RecordBatch.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, schema, strict=True)],
                                      schema=schema)


def request_arrays(tbl: pa.Table, wall_minus_mono_ns: int) -> dict[str, np.ndarray]:
    """A requests table back to RunData's arrays (monotonic stamps, 0 where absent)."""
    t = tbl.column("t_ns").to_numpy(zero_copy_only=False)
    has = ~np.isnan(t) if t.dtype.kind == "f" else np.ones(t.size, bool)
    arrival = np.where(has, np.nan_to_num(t).astype(np.int64) - wall_minus_mono_ns, 0)
    out = {"request_id": tbl.column("request_id").to_numpy().astype(np.int64), "arrival_ns": arrival}
    ref = arrival
    for f in STAMPS:
        c = tbl.column(f)
        ref = ref + c.fill_null(0).to_numpy().astype(np.int64)
        out[f] = np.where(c.is_valid().to_numpy(zero_copy_only=False) & has, ref, 0)
    out["batch_id"] = tbl.column("batch_id").to_numpy().astype(np.int64)
    for f in SMALL_INTS:
        out[f] = tbl.column(f).to_numpy().astype(np.int64)
    for f in ("status", "device"):
        out[f] = np.array(tbl.column(f).cast(pa.string()).to_pylist(), dtype=str)
    return {f: out[f] for f in FIELD_NAMES}
