"""A matrix of bad arguments for every entry point of aurora_core._C: each is a ValueError or TypeError
naming the op, never a crash, and the module keeps working afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

_C = pytest.importorskip("aurora_core._C", reason="aurora_core._C is not built")

SPEC = dict(resize=16, crop=8, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
GOOD = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)


def good_out(n=None, dtype=np.float32):
    return np.zeros((3, 8, 8) if n is None else (n, 3, 8, 8), dtype)


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


BAD_IMAGES = {
    "none": (None, TypeError),
    "list": ([[1, 2, 3]], TypeError),
    "str": ("abc", TypeError),
    "int": (3, TypeError),
    "torch_tensor": (torch.zeros((4, 4, 3), dtype=torch.uint8), TypeError),  # no buffer protocol
    "bytes_1d": (b"\x00" * 12, ValueError),
    "float32": (np.zeros((4, 4, 3), np.float32), TypeError),
    "float64": (np.zeros((4, 4, 3)), TypeError),
    "int8": (np.zeros((4, 4, 3), np.int8), TypeError),
    "uint16": (np.zeros((4, 4, 3), np.uint16), TypeError),
    "bool": (np.zeros((4, 4, 3), bool), TypeError),
    "ndim2": (np.zeros((4, 4), np.uint8), ValueError),
    "ndim4": (np.zeros((1, 4, 4, 3), np.uint8), ValueError),
    "ndim1": (np.zeros(12, np.uint8), ValueError),
    "ndim0": (np.zeros((), np.uint8), ValueError),
    "channels1": (np.zeros((4, 4, 1), np.uint8), ValueError),
    "channels4": (np.zeros((4, 4, 4), np.uint8), ValueError),
    "zero_h": (np.zeros((0, 4, 3), np.uint8), ValueError),
    "zero_w": (np.zeros((4, 0, 3), np.uint8), ValueError),
    "non_contiguous": (GOOD[:, ::2], ValueError),
    "negative_stride_rows": (GOOD[::-1], ValueError),
    "negative_stride_cols": (GOOD[:, ::-1], ValueError),
    "fortran": (np.asfortranarray(GOOD), ValueError),
    "channel_view": (np.zeros((4, 4, 6), np.uint8)[:, :, :3], ValueError),
}

BAD_OUTS = {
    "none": (None, TypeError),
    "list": ([0.0] * 192, TypeError),
    "float64": (np.zeros((3, 8, 8)), TypeError),
    "float16_for_float32": (np.zeros((3, 8, 8), np.float16), TypeError),
    "int32": (np.zeros((3, 8, 8), np.int32), TypeError),
    "shape_hwc": (np.zeros((8, 8, 3), np.float32), ValueError),
    "shape_small": (np.zeros((3, 8, 7), np.float32), ValueError),
    "shape_ndim2": (np.zeros((24, 8), np.float32), ValueError),
    "readonly": (readonly(np.zeros((3, 8, 8), np.float32)), ValueError),
    "non_contiguous": (np.zeros((3, 8, 16), np.float32)[:, :, ::2], ValueError),
    "negative_stride": (np.zeros((3, 8, 8), np.float32)[::-1], ValueError),
    "bytes": (bytes(3 * 8 * 8 * 4), ValueError),  # read-only buffer
}


def assert_rejected(fn, exc, op):
    with pytest.raises(exc) as info:
        fn()
    assert op in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_preprocess_bad_img(case):
    bad, exc = BAD_IMAGES[case]
    assert_rejected(lambda: _C.preprocess(bad, good_out(), **SPEC), exc, "preprocess")


@pytest.mark.parametrize("case", sorted(BAD_OUTS))
def test_preprocess_bad_out(case):
    bad, exc = BAD_OUTS[case]
    assert_rejected(lambda: _C.preprocess(GOOD, bad, **SPEC), exc, "preprocess")


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_batch_bad_img(case):
    bad, exc = BAD_IMAGES[case]
    assert_rejected(lambda: _C.preprocess_batch([GOOD, bad], good_out(2), **SPEC), exc, "preprocess_batch")


@pytest.mark.parametrize("case", sorted(BAD_OUTS))
def test_batch_bad_out(case):
    bad, exc = BAD_OUTS[case]
    if isinstance(bad, np.ndarray) and bad.ndim == 3:
        bad = bad[None]  # same defect, batch shape
    assert_rejected(lambda: _C.preprocess_batch([GOOD], bad, **SPEC), exc, "preprocess_batch")


@pytest.mark.parametrize("dtype, out, exc", [
    ("bfloat16", np.zeros((3, 8, 8), np.float32), TypeError),
    ("bfloat16", np.zeros((3, 8, 8), np.float16), TypeError),  # float16 bits are not bfloat16
    ("float16", np.zeros((3, 8, 8), np.float32), TypeError),
    ("float64", np.zeros((3, 8, 8), np.float64), ValueError),
    ("int8", np.zeros((3, 8, 8), np.int8), ValueError),
])
def test_dtype_out_mismatch(dtype, out, exc):
    assert_rejected(lambda: _C.preprocess(GOOD, out, **{**SPEC, "dtype": dtype}), exc, "preprocess")


@pytest.mark.parametrize("kwargs", [
    dict(crop=17), dict(resize=0), dict(crop=0), dict(resize=-3), dict(resize=1 << 20, crop=8),
    dict(mean=[0.5, 0.5]), dict(std=[0.1, 0.1, 0.1, 0.1]), dict(std=[0.1, 0.0, 0.1]),
    dict(std=[0.1, -0.2, 0.1]), dict(std=[0.1, float("nan"), 0.1]), dict(mean=[0.0, float("inf"), 0.0]),
])
def test_bad_spec(kwargs):
    args = {**SPEC, **kwargs}
    assert_rejected(lambda: _C.preprocess(GOOD, good_out(), **args), ValueError, "preprocess")
    assert_rejected(lambda: _C.preprocess_batch([GOOD], good_out(1), **args), ValueError, "preprocess_batch")


def test_bad_spec_types():
    with pytest.raises(TypeError):
        _C.preprocess(GOOD, good_out(), **{**SPEC, "resize": "256"})
    with pytest.raises(TypeError):
        _C.preprocess(GOOD, good_out(), **{**SPEC, "mean": None})


@pytest.mark.parametrize("orig_size, scale, exc", [
    ((40, 60), 1, ValueError),       # image is 20x30, not 40x60
    ((40, 60), 3, ValueError),       # ceil(40/3) = 14 != 20
    ((39, 59), 2, None),             # ceil(39/2) = 20, ceil(59/2) = 30: valid
    ((20, 30), 0, ValueError),
    ((20, 30), -2, ValueError),
    ((20, 30), 65, ValueError),
    ((0, 30), 1, ValueError),
    ((-20, 30), 1, ValueError),
    ((1 << 40, 30), 1, ValueError),
    ("20x30", 1, TypeError),
    ((20,), 1, TypeError),
    ((20, 30, 3), 1, TypeError),
])
def test_orig_size_and_scale(orig_size, scale, exc):
    call = lambda: _C.preprocess(GOOD, good_out(), orig_size=orig_size, scale=scale, **SPEC)  # noqa: E731
    if exc is None:
        call()
    else:
        assert_rejected(call, exc, "preprocess")


@pytest.mark.parametrize("imgs, kwargs, exc", [
    ([], {}, ValueError),
    (np.zeros((2, 20, 30, 3), np.uint8), {}, TypeError),   # an array, not a list
    (GOOD, {}, TypeError),
    (None, {}, TypeError),
    ([GOOD, GOOD], {"orig_sizes": [(20, 30)]}, ValueError),
    ([GOOD, GOOD], {"orig_sizes": (20, 30)}, TypeError),   # one pair, not one per image
    ([GOOD, GOOD], {"orig_sizes": 5}, ValueError),
    ([GOOD, GOOD], {"scales": [1]}, ValueError),
    ([GOOD, GOOD], {"scales": [1, "2"]}, TypeError),
    ([GOOD, GOOD], {"scales": [1, 2]}, ValueError),     # 20x30 at scale 2 needs orig_sizes
    ([GOOD, GOOD], {"orig_sizes": [(20, 30), "20x30"]}, TypeError),
])
def test_batch_arguments(imgs, kwargs, exc):
    n = 2 if isinstance(imgs, list) and imgs else 1
    assert_rejected(lambda: _C.preprocess_batch(imgs, good_out(n), **SPEC, **kwargs), exc, "preprocess_batch")


def test_batch_out_count_mismatch():
    assert_rejected(lambda: _C.preprocess_batch([GOOD, GOOD], good_out(3), **SPEC), ValueError, "preprocess_batch")


@pytest.mark.parametrize("args", [(0, 5, 1, 16, 8), (5, 5, 0, 16, 8), (5, 5, 1, 8, 16), (5, 5, 1, 0, 0),
                                  (-1, 5, 1, 16, 8), (1 << 40, 5, 1, 16, 8)])
def test_geometry_rejects(args):
    assert_rejected(lambda: _C.geometry(*args), ValueError, "geometry")


def test_still_works_after_rejections_and_accepts_int16_views():
    out = good_out()
    assert _C.preprocess(GOOD, out, **SPEC) is out
    assert np.isfinite(out).all()
    b16 = np.zeros((3, 8, 8), np.int16)
    _C.preprocess(GOOD, b16, dtype="bfloat16", **SPEC)
    as_bf16 = torch.from_numpy(b16).view(torch.bfloat16)
    assert torch.equal(as_bf16, torch.from_numpy(out).to(torch.bfloat16))
    batch = good_out(3)
    _C.preprocess_batch([GOOD] * 3, batch, num_threads=8, **SPEC)
    assert all(np.array_equal(batch[i], out) for i in range(3))
