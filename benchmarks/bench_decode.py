"""Decode cost: aurora_core.decode at full size vs DCT-scaled (1/2, 1/4, 1/8) on the sample photos, with
bare simplejpeg (no limits, no header walk, no EXIF) as the baseline for our checks' overhead.

Run: python -m pytest benchmarks/bench_decode.py --benchmark-only --benchmark-columns=median,iqr,rounds
     (CI: --benchmark-disable as a smoke test). One group per photo; megapixels/s of the source image
     in extra_info. Huffman decoding is most of a JPEG decode, so 1/8 saves far less than 64x.
     test_decode_png: aurora (libspng) against its Pillow fallback, both after the same header checks,
     on the coffee PNG (8-bit RGB) and the same picture as an 8-bit palette PNG.
     aurora_crop_sN: the same decode with crop_for=PreprocessSpec() (only the rows and columns the 224 crop
     of the 256 resize reads).

Ratio of crop-region to full decode, timed round-robin in one process (the figure to quote):
     python benchmarks/bench_decode.py [--rounds 31] [--photos 10mp,2.5mp]
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from aurora_core import decode as dec
from aurora_core.decode import decode, decode_ex, probe
from aurora_core.ops.preprocess import PreprocessSpec
from aurora_core.samples import sample_bytes

PHOTOS = ["0.3mp", "2.5mp", "10mp"]
PROVIDERS = ["simplejpeg", "aurora_s1", "aurora_s2", "aurora_s4", "aurora_s8", "aurora_crop_s1", "aurora_crop_s2"]
SPEC = PreprocessSpec()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("photo", PHOTOS)
def test_decode(benchmark, photo, provider):
    data = sample_bytes(photo)
    _, h, w = probe(data)
    benchmark.group = f"decode {photo} ({w}x{h})"
    if provider == "simplejpeg":
        def fn():
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        expect = (h, w, 3)
    else:
        s = int(provider[-1])
        min_size = (-(-h // s), -(-w // s))  # exactly the 1/s size: decode picks scale s
        crop_for = SPEC if "crop" in provider else None

        def fn():
            return decode_ex(data, min_size=min_size, crop_for=crop_for).image
        expect = (*min_size, 3)
    out = benchmark(fn)
    assert out.shape == expect and out.dtype == np.uint8
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["mp_per_s"] = h * w / 1e6 / benchmark.stats.stats.median


@functools.cache
def png_kind(kind: str) -> bytes:
    data = sample_bytes("coffee_png")
    if kind == "palette":
        b = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").quantize(256).save(b, "PNG")
        data = b.getvalue()
    return data


def pillow_png(data: bytes) -> np.ndarray:
    """The Pillow fallback path, after the same header checks as decode."""
    mv = memoryview(data)
    return dec._decode_png_pillow(mv, dec._inspect("decode", mv, 50_000_000, 32 << 20))


@pytest.mark.parametrize("provider", ["pillow", "aurora"])
@pytest.mark.parametrize("kind", ["rgb", "palette"])
def test_decode_png(benchmark, kind, provider):
    data = png_kind(kind)
    _, h, w = probe(data)
    benchmark.group = f"decode png {kind} ({w}x{h})"
    fn = pillow_png if provider == "pillow" else decode
    out = benchmark(fn, data)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    if benchmark.stats is not None:
        benchmark.extra_info["mp_per_s"] = h * w / 1e6 / benchmark.stats.stats.median


def ratios(photos: list[str], rounds: int) -> None:
    """Crop-region decode / full decode per DCT scale, medians of round-robin rounds in this one process."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_preprocess import timed_medians

    print(f"decode_ex median ms, {rounds} round-robin rounds (wall and thread CPU time); "
          f"load average {os.getloadavg()}")
    for photo in photos:
        data = sample_bytes(photo)
        _, h, w = probe(data)
        for s in (1, 2):
            ms = None if s == 1 else (-(-h // s), -(-w // s))
            med = timed_medians({"full": lambda ms=ms, data=data: decode_ex(data, min_size=ms),
                                 "crop": lambda ms=ms, data=data: decode_ex(data, min_size=ms, crop_for=SPEC)}, rounds)
            wall, cpu = med["wall"], med["cpu"]
            print(f"  {photo:6s} 1/{s}: wall full {wall['full'] * 1e3:6.2f} crop {wall['crop'] * 1e3:6.2f} "
                  f"ratio {wall['crop'] / wall['full']:.2f} | thread CPU full {cpu['full'] * 1e3:6.2f} "
                  f"crop {cpu['crop'] * 1e3:6.2f} ratio {cpu['crop'] / cpu['full']:.2f}")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="crop-region / full decode time ratio")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--photos", default="10mp,2.5mp")
    a = ap.parse_args()
    ratios(a.photos.split(","), a.rounds)
