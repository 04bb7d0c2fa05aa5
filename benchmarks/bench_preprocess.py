"""Preprocess cost: aurora's fused kernel against the pipelines teams use today.

Groups (one per photo): ``prep`` is resize + crop + normalize + CHW on an already decoded image; ``e2e``
is JPEG bytes to the normalized tensor. ``batch64`` is 64 decoded images through ``preprocess_batch``
on 1 and 2 threads. Single-image providers run on one thread (torch, OpenCV and aurora alike).

Run: python -m pytest benchmarks/bench_preprocess.py --benchmark-only --benchmark-columns=median,iqr,rounds
     (CI: --benchmark-disable as a smoke test; each provider's output is checked against the oracle).
Ratios measured in one run: python benchmarks/preprocess_ratios.py
"""

from __future__ import annotations

import io
import statistics
import time

import cv2
import numpy as np
import pytest
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from aurora_core.decode import decode
from aurora_core.ops.preprocess import PreprocessSpec, load, preprocess, preprocess_batch, resized_geometry
from aurora_core.samples import default_mix, sample_bytes

SPEC = PreprocessSpec()
PHOTOS = ["0.3mp", "2.5mp", "10mp"]
_MEAN255 = np.array(SPEC.mean, np.float32) * 255
_INV = 1.0 / (np.array(SPEC.std, np.float32) * 255)
_TMEAN = torch.from_numpy(_MEAN255)[:, None, None]
_TINV = torch.from_numpy(_INV)[:, None, None]


def _geometry(h, w):
    new_h, new_w, top, left = resized_geometry((h, w), SPEC)
    c = SPEC.crop
    return (new_w, new_h), (left, top, left + c, top + c)


def _np_normalize(hwc: np.ndarray) -> torch.Tensor:
    """numpy normalize + HWC -> CHW, as a classic pipeline does it (ToTensor/Normalize in numpy)."""
    chw = ((hwc.astype(np.float32) - _MEAN255) * _INV).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))


def pil_prep(img: np.ndarray) -> torch.Tensor:
    size, box = _geometry(*img.shape[:2])
    return _np_normalize(np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR).crop(box)))


def cv2_prep(img: np.ndarray) -> torch.Tensor:
    # INTER_AREA is OpenCV's antialiased downscale (INTER_LINEAR aliases); it is not PIL's filter, so
    # this pipeline is fast but not exact.
    (new_w, new_h), (x0, y0, x1, y1) = _geometry(*img.shape[:2])
    interp = cv2.INTER_AREA if new_h < img.shape[0] else cv2.INTER_LINEAR
    return _np_normalize(cv2.resize(img, (new_w, new_h), interpolation=interp)[y0:y1, x0:x1])


def torch_prep(img: np.ndarray) -> torch.Tensor:
    """torch's uint8 antialiased bilinear interpolate (channels-last fast path) + fused normalize."""
    (new_w, new_h), (x0, y0, x1, y1) = _geometry(*img.shape[:2])
    t = torch.from_numpy(img).permute(2, 0, 1)[None]  # channels-last view, no copy
    r = F.interpolate(t, size=(new_h, new_w), mode="bilinear", antialias=True)[0, :, y0:y1, x0:x1]
    return torch.sub(r, _TMEAN).mul_(_TINV)


def aurora_prep(img: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    return preprocess(img, SPEC, out=out)


def classic_e2e(data: bytes) -> torch.Tensor:
    return pil_prep(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def cv2_e2e(data: bytes) -> torch.Tensor:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2_prep(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def simplejpeg_torch_e2e(data: bytes) -> torch.Tensor:
    return torch_prep(simplejpeg.decode_jpeg(data, colorspace="RGB"))


def decode_only(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


#: name -> (kind, function). kind "prep" takes a decoded image, "e2e" takes bytes.
PROVIDERS = {
    "prep": {
        "aurora": None,  # needs an out buffer; built in make()
        "torch_uint8_aa": torch_prep,
        "pil": pil_prep,
        "opencv_area": cv2_prep,
    },
    "e2e": {
        "aurora_exact": lambda d: load(d, SPEC, fast=False),
        "aurora_fast": lambda d: load(d, SPEC, fast=True),
        "classic_pil": classic_e2e,
        "opencv": cv2_e2e,
        "simplejpeg_torch": simplejpeg_torch_e2e,
        "simplejpeg_decode_only": decode_only,
    },
}


def make(kind: str, provider: str, photo: str):
    """A zero-argument callable running ``provider`` once on ``photo``."""
    data = sample_bytes(photo)
    if kind == "prep":
        img = decode(data)
        if provider == "aurora":
            out = torch.empty((3, SPEC.crop, SPEC.crop))
            return lambda: aurora_prep(img, out)
        fn = PROVIDERS[kind][provider]
        return lambda: fn(img)
    fn = PROVIDERS[kind][provider]
    return lambda: fn(data)


def batch_images(n: int = 64) -> list[np.ndarray]:
    """n decoded images of the default request mix (seven ~0.3 MP photos to one 2.5 MP)."""
    mix = [decode(b) for b in default_mix()]
    return [mix[i % len(mix)] for i in range(n)]


def timed_medians(fns: dict, rounds: int, warmup: int = 2) -> dict[str, dict]:
    """{"wall": name -> median s, "cpu": name -> median thread CPU s}: each fn warmed up, then timed
    round-robin (one call of each per round), so drift on a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    return {"wall": {n: statistics.median(t) for n, t in wall.items()},
            "cpu": {n: statistics.median(t) for n, t in cpu.items()}}


def _check(result, photo: str, provider: str):
    """Every provider computes the same picture: within 1 level of aurora exact, or 8 for inexact ones."""
    if provider == "simplejpeg_decode_only":
        return
    want = load(sample_bytes(photo), SPEC, fast=False)
    diff = (result.float() - want).abs() * torch.tensor(SPEC.std)[:, None, None] * 255
    exact = provider in ("aurora", "aurora_exact", "pil", "classic_pil", "torch_uint8_aa", "simplejpeg_torch")
    # PIL and torch round to uint8 between passes (up to 1 level each side). OpenCV's INTER_AREA is a
    # box filter, not PIL's triangle (max differences of ~40 levels at edges), and aurora fast mode uses
    # libjpeg-turbo's reduced IDCT: only their mean is checked.
    if exact:
        assert diff.max().item() <= 2.0, (provider, diff.max().item())
    assert diff.mean().item() < (0.6 if exact else 3.0), (provider, diff.mean().item())


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("provider", list(PROVIDERS["prep"]))
def test_prep(benchmark, one_thread, provider, photo):
    fn = make("prep", provider, photo)
    benchmark.group = f"prep {photo}"
    result = benchmark(fn)
    _check(result, photo, provider)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = 1.0 / benchmark.stats.stats.median


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("provider", list(PROVIDERS["e2e"]))
def test_e2e(benchmark, one_thread, provider, photo):
    fn = make("e2e", provider, photo)
    benchmark.group = f"e2e {photo}"
    result = benchmark(fn)
    _check(result, photo, provider)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = 1.0 / benchmark.stats.stats.median


@pytest.mark.parametrize("threads", [1, 2])
def test_batch64(benchmark, threads):
    imgs = batch_images(64)
    out = torch.empty((64, 3, SPEC.crop, SPEC.crop))
    benchmark.group = "batch64 (default mix)"
    result = benchmark(lambda: preprocess_batch(imgs, SPEC, out=out, num_threads=threads))
    assert torch.equal(result[7], preprocess(imgs[7], SPEC))
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = 64 / benchmark.stats.stats.median
