"""Public ops (preprocessing); each op dispatches through aurora_core._dispatch."""

from aurora_core.ops.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessSpec,
    fast_min_size,
    load,
    preprocess,
    preprocess_batch,
    preprocess_ref,
    resized_geometry,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessSpec",
    "fast_min_size",
    "load",
    "preprocess",
    "preprocess_batch",
    "preprocess_ref",
    "resized_geometry",
]
