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
# A Pipeline compiles its model on a side thread by default: ~1 min of CPU per cold compile. Tests that
# compile ask for it (tests/test_aot.py).
os.environ.setdefault("AURORA_COMPILE", "off")


def devices() -> list[str]:
    """Devices to parametrize over: cpu, plus cuda when present."""
    return ["cpu", "cuda"] if _HAS_CUDA else ["cpu"]


has_cuda = _HAS_CUDA
requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device")


class Tiny(torch.nn.Module):
    """conv -> pool -> linear: a seeded 10-class classifier small enough for every pipeline/runner test.

    ``gate`` (an object with ``pass_through()``) blocks forward until a test opens it; ``rows_seen``
    records each batch's padded size."""

    def __init__(self, gate=None, classes: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.gate = gate
        self.rows_seen: list[int] = []

    def forward(self, x):
        self.rows_seen.append(x.shape[0])
        if self.gate is not None:
            self.gate.pass_through()
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Faulty(Tiny):
    """Tiny that, once ``mode`` is set, raises ("raise") or returns a single row ("one_row")."""

    mode = None

    def forward(self, x):
        y = super().forward(x)
        if self.mode == "raise":
            raise ValueError("boom in forward")
        return y[:1] if self.mode == "one_row" else y
