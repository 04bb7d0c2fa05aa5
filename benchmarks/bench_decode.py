"""Decode cost: aurora_core.decode at full size vs DCT-scaled (1/2, 1/4, 1/8) on the sample photos, with
bare simplejpeg (no limits, no header walk, no EXIF) as the baseline for our checks' overhead.

Run: python -m pytest benchmarks/bench_decode.py --benchmark-only --benchmark-columns=median,iqr,rounds
     (CI: --benchmark-disable as a smoke test). One group per photo; megapixels/s of the source image
     in extra_info. Huffman decoding is most of a JPEG decode, so 1/8 saves far less than 64x.
"""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

from aurora_core.decode import decode_ex, probe
from aurora_core.samples import sample_bytes

PHOTOS = ["0.3mp", "2.5mp", "10mp"]
PROVIDERS = ["simplejpeg", "aurora_s1", "aurora_s2", "aurora_s4", "aurora_s8"]


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

        def fn():
            return decode_ex(data, min_size=min_size).image
        expect = (*min_size, 3)
    out = benchmark(fn)
    assert out.shape == expect and out.dtype == np.uint8
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["mp_per_s"] = h * w / 1e6 / benchmark.stats.stats.median
