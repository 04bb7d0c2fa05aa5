"""Triton kernels, installed as ``aurora_core.kernels`` (see pyproject's package-dir)."""
