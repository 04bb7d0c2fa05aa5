"""The one place that picks a backend for an op: "cpp", "triton" or "reference".

Order of precedence: the ``requested`` argument of the call, then the environment variable
``AURORA_BACKEND``, then the automatic choice (CUDA tensors and devices -> "triton", everything else ->
"cpp"). A backend named by the caller or by the environment that cannot be used raises; an
automatically chosen one that fails to load falls back ("triton" -> "cpp" -> "reference") with one log
line per cause.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

log = logging.getLogger("aurora_core")

BACKENDS = ("cpp", "triton", "reference")
ENV_VAR = "AURORA_BACKEND"


@functools.cache
def _load(name: str):
    """(module, None) or (None, reason) for backend ``name``; cached, so each cause logs once."""
    module = {"cpp": "aurora_core._C", "triton": "aurora_core.kernels.preprocess"}.get(name)
    if module is None:
        return None, None
    try:
        return importlib.import_module(module), None
    except Exception as e:  # ImportError, or a broken Triton/CUDA install failing at import
        return None, f"{type(e).__name__}: {e}"


def cpp_module():
    """The native extension ``aurora_core._C``, or None when it is not built."""
    return _load("cpp")[0]


def triton_module():
    """``aurora_core.kernels.preprocess`` (the Triton kernels), or None when it cannot be imported."""
    return _load("triton")[0]


def available(name: str) -> bool:
    return name == "reference" or _load(name)[0] is not None


def _is_cuda(obj) -> bool:
    if obj is None:
        return False
    if isinstance(obj, str):
        return obj.startswith("cuda")
    device = getattr(obj, "device", None)  # torch.Tensor
    if device is not None and not isinstance(obj, str):
        obj = device
    return getattr(obj, "type", None) == "cuda"


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend_for: expected {source} to be one of {BACKENDS}, got {name!r}.")
    return name


@functools.cache
def _fallback_note(wanted: str, got: str, reason: str) -> None:
    log.warning("aurora_core: backend %r unavailable (%s); using %r", wanted, reason, got)


def backend_for(obj_or_device=None, requested: str | None = None) -> str:
    """Backend for data living on ``obj_or_device`` (a tensor, ndarray, torch.device or device string).

    returns "cpp", "triton" or "reference". Raises RuntimeError when ``requested`` (or AURORA_BACKEND)
    names a backend that cannot be loaded, and ValueError for an unknown name.
    """
    source = "the backend argument"
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    if requested is not None:
        name = _check_name(requested, source)
        if not available(name):
            raise RuntimeError(
                f"backend_for: backend {name!r} was requested by {source} but cannot be loaded "
                f"({_load(name)[1]}). "
                + ("Build the extension with `pip install -e .`." if name == "cpp" else
                   "Install triton and use a CUDA device (or TRITON_INTERPRET=1).")
            )
        return name
    if _is_cuda(obj_or_device):
        if available("triton"):
            return "triton"
        _fallback_note("triton", "cpp" if available("cpp") else "reference", _load("triton")[1])
    if available("cpp"):
        return "cpp"
    _fallback_note("cpp", "reference", _load("cpp")[1])
    return "reference"
