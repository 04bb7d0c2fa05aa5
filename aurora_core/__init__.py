"""aurora_core: fused image preprocessing, dynamic batching, telemetry and latency diagnosis.

Public names are imported lazily (PEP 562) so that ``import aurora_core`` stays cheap and a command
that never touches torch (``aurora diagnose`` on a laptop) does not pay for it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "decode": "aurora_core.decode",
    "decode_ex": "aurora_core.decode",
    "probe": "aurora_core.decode",
    "PreprocessSpec": "aurora_core.ops.preprocess",
    "IMAGENET_MEAN": "aurora_core.ops.preprocess",
    "IMAGENET_STD": "aurora_core.ops.preprocess",
    "preprocess": "aurora_core.ops.preprocess",
    "preprocess_batch": "aurora_core.ops.preprocess",
    "preprocess_ref": "aurora_core.ops.preprocess",
    "load": "aurora_core.ops.preprocess",
    "BatchingConfig": "aurora_core.batching",
    "Pipeline": "aurora_core.pipeline",
    "Prediction": "aurora_core.pipeline",
    "Recorder": "aurora_core.recorder",
    "load_run": "aurora_core.recorder",
    "RequestRecord": "aurora_core.records",
    "errors": "aurora_core.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aurora_core' has no attribute {name!r}")
    mod = importlib.import_module(module)
    # `aurora_core.decode` is both the submodule and (being callable) the decode function: the import
    # system binds the submodule under that name anyway, so resolve to it rather than fight it.
    value = mod if module == f"aurora_core.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
