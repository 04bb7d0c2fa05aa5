"""Sample photographs shipped with the package (see aurora_core/data/LICENSE.md).

The default input of ``aurora bench`` and of the benchmarks: seven small photos to one large, the mix
used for the end-to-end comparisons.
"""

from __future__ import annotations

import functools
import os

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")

#: name -> file. Sizes: 0.26 MP, 0.27 MP, 1.6 MP, 2.5 MP (1920x1280), 10 MP (3872x2592), 0.24 MP PNG.
SAMPLES = {
    "0.3mp": "photo_0.3mp.jpg",
    "rocket_0.3mp": "photo_rocket_0.3mp.jpg",
    "retina_1.6mp": "photo_retina_1.6mp.jpg",
    "2.5mp": "photo_2.5mp.jpg",
    "10mp": "photo_10mp.jpg",
    "coffee_png": "photo_coffee.png",
}


@functools.cache
def sample_bytes(name: str) -> bytes:
    """Encoded bytes of one sample, by its key in SAMPLES."""
    if name not in SAMPLES:
        raise KeyError(f"samples: no sample {name!r}; choose from {sorted(SAMPLES)}")
    with open(os.path.join(DATA_DIR, SAMPLES[name]), "rb") as f:
        return f.read()


def default_mix() -> list[bytes]:
    """The request mix of the end-to-end benchmarks: seven ~0.3 MP photos and one 2.5 MP photo."""
    small = [sample_bytes("0.3mp"), sample_bytes("rocket_0.3mp"), sample_bytes("coffee_png")]
    return [small[i % 3] for i in range(7)] + [sample_bytes("2.5mp")]
