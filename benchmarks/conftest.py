"""Shared benchmark fixtures. Benchmarks are not timed tests: they report numbers and check outputs."""

from __future__ import annotations

import os

# A Pipeline compiles its model in the background by default (runner.default_compile); the benchmark
# smoke runs measure nothing, and a compile would only hold both cores. A real --benchmark-only run can
# set AURORA_COMPILE itself.
os.environ.setdefault("AURORA_COMPILE", "off")
# Triton kernels run under the interpreter on CPU-only machines. It must be set before any benchmark
# file imports triton: bench_triton_preprocess sets it too, but another file may import triton first, and
# then the kernels' @triton.jit helpers cannot be called from an interpreted kernel.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

import pytest

# Scripts that start servers and run for minutes: run them directly, not in the benchmark smoke.
collect_ignore = ["bench_peers.py"]


@pytest.fixture
def one_thread():
    """Run the benchmark body on one thread in torch and OpenCV (single-image numbers)."""
    import torch

    try:
        import cv2
    except ImportError:  # OpenCV is a dev extra; only its providers need it
        cv2 = None
    prev_torch = torch.get_num_threads()
    prev_cv = cv2.getNumThreads() if cv2 else None
    torch.set_num_threads(1)
    if cv2:
        cv2.setNumThreads(1)
    yield
    torch.set_num_threads(prev_torch)
    if cv2:
        cv2.setNumThreads(prev_cv)
