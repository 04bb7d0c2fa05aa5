"""The always-on store: rotated, bounded, crash-safe Parquet segments and an embedded query engine.

Layout: ``ROOT/region=R/host=H/<segment>.<table>.parquet`` (Hive-style partitions: a fleet merges
stores by copying directories). ``writer`` writes (through ``Recorder(store=ROOT)``), ``reader``
selects and queries with DuckDB, ``convert`` turns a version-1 run file into a segment.
"""

from __future__ import annotations

from .reader import Store, StoreError, is_store, open_store, parse_time

__all__ = ["Store", "StoreError", "is_store", "open_store", "parse_time", "convert"]


def convert(run_path, root) -> str:
    """Write the run file ``run_path`` (SQLite, format 1; or a loaded ``RunData``) into the store ``root`` as one
    segment; returns the segment's directory. The run's meta travels whole; its monotonic stamps keep their
    values."""
    import numpy as np

    from aurora_core.recorder import RunData, load_run

    from .schema import _INT_FIELDS, request_columns, rows_batch
    from .writer import StoreWriter

    run = run_path if isinstance(run_path, RunData) else load_run(run_path)
    meta = dict(run.meta)
    meta.setdefault("run_id", "converted")
    meta["converted_from"] = str(run.path)
    meta.pop("wall_minus_mono_end_ns", None)
    w = StoreWriter(root, meta, rotate_s=float("inf"), rotate_bytes=1 << 62, live=False)
    q = run.requests
    ints = np.column_stack([q[f] for f in _INT_FIELDS]).astype(np.int64)
    sp = run.spans
    smp = [(int(t), src, met, float(v)) for (src, met), (ts, vs) in run.samples.items() for t, v in zip(ts, vs, strict=True)]
    ev = run.events
    w.write({
        "requests": request_columns(ints.reshape(run.n_requests, -1), q["status"].tolist(), q["device"].tolist(),
                                    run.wall_minus_mono_ns),
        "spans": rows_batch("spans", list(zip(sp["name"].tolist(), sp["start_ns"].tolist(), sp["end_ns"].tolist(),
                                              sp["request_id"].tolist(), sp["attrs"].tolist(), strict=True))),
        "samples": rows_batch("samples", smp),
        "events": rows_batch("events", list(zip(ev["ts_ns"].tolist(), ev["source"].tolist(), ev["kind"].tolist(),
                                                ev["value"].tolist(), ev["detail"].tolist(), strict=True))),
    })
    w.close()
    if w.last_error is not None:
        raise RuntimeError(f"convert: writing {run_path} into the store {root} failed") from w.last_error
    return str(w.dir)
