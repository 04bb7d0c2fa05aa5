"""The GPU suite's report logic (benchmarks/gpu_suite.py), checked on the CPU before its one GPU run:
issue 16's target lines read the right figures and say met / NOT met / n/a honestly."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("_gpu_suite", os.path.join(ROOT, "benchmarks", "gpu_suite.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def _e2e(label, rate, offline, naive=None, pre=True, dec=False):
    js = {"aurora_rate": rate, "aurora_offline": offline, "naive_rate": naive, "preprocess_on_gpu": pre}
    return {label: {"rc": 0, "files": {"e2e.json": {**js, "decode_on_gpu": dec}}}}


def _results():
    kernels = {
        "rows": [
            {"case": "0.3MP", "batch": 64, "triton_ms": 0.02, "pct_copy_bw": 72.0, "speedup_vs_eager": 3.5},
            {"case": "10MP", "batch": 256, "triton_ms": 1.0, "pct_copy_bw": 80.0, "speedup_vs_eager": 9.0},
            # batch 1 does not count for the bandwidth target, but does for "3x eager at every size"
            {"case": "0.3MP", "batch": 1, "triton_ms": 0.01, "pct_copy_bw": 5.0, "speedup_vs_eager": 2.5},
        ]
    }
    e2e = {
        **_e2e("gpu_preprocess", 900.0, 1000.0, naive=100.0),
        **_e2e("gpu_decode", 950.0, 1100.0, dec=True),
        **_e2e("cpu_preprocess", 500.0, 1000.0, pre=False),
    }
    sampler = {
        "combined": {"pct_of_one_core": 0.8, "sources": ["cpu", "gpu0"]},
        "throughput": {"change_pct": -0.5, "noise_pct": 2.0, "within_noise": True},
    }
    return {"sections": {"kernels": kernels, "e2e": e2e, "sampler": sampler}}


def test_targets_read_each_figure_and_judge_it():
    rows = {r["target"].split(",")[0][:24]: r for r in S.target_rows(_results())}
    assert [r["met"] for r in rows.values()] == ["met", "NOT met", "met", "met", "met"], rows
    bw, eager, e2e, samp, thr = rows.values()
    assert bw["measured"] == "min 72.0%, max 80.0%"  # batch 1 left out of the bandwidth target
    assert "2.5x (0.3MP x1)" in eager["measured"]
    assert e2e["measured"].startswith("Triton + nvJPEG: 950/s, 9.5x naive")  # the naive rate of the first run


def test_missing_sections_are_not_a_pass():
    rows = S.target_rows({"sections": {}})
    assert len(rows) == 5 and all(r["met"] == "n/a" for r in rows)
    # A sampler run that saw no GPU cannot meet the CPU + NVML target, however cheap it was.
    res = _results()
    res["sections"]["sampler"]["combined"]["sources"] = ["cpu"]
    samp = [r for r in S.target_rows(res) if r["target"].startswith("sampler")][0]
    assert samp["met"] == "NOT met" and "WITHOUT" in samp["measured"]


def test_report_renders_the_e2e_variants_and_targets():
    md = S.render_markdown(_results())
    assert "| Triton + nvJPEG | True | True | 950 |" in md
    assert "## Issue 16 targets" in md and "NOT met" in md
