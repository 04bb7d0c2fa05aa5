"""Shared test fixtures. Tests run on the CPU first; CUDA variants are skipped, not faked, without a GPU."""

from __future__ import annotations

import os

import pytest

# Triton kernels run under the interpreter on CPU-only machines (CI); must be set before triton loads.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def devices() -> list[str]:
    """Devices to parametrize over: cpu, plus cuda when present."""
    return ["cpu", "cuda"] if _HAS_CUDA else ["cpu"]


has_cuda = _HAS_CUDA
requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device")
