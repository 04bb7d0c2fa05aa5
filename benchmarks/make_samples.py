"""Rebuild the sample photographs in aurora_core/data/ from scikit-image's bundled photos.

scikit-image ships only small photos, so the 2.5 MP and 10 MP samples are mosaics of real photographs
at their native resolution (no upscaling, which would lower the entropy a decoder sees), flipped to
vary the content. Run: python benchmarks/make_samples.py (needs the dev extra).
"""

from __future__ import annotations

import io
import os

import numpy as np
import skimage.data as sd
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "aurora_core", "data")
PHOTOS = ["retina", "hubble_deep_field", "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"]


def _photos() -> list[np.ndarray]:
    ims = [getattr(sd, n)()[..., :3] for n in PHOTOS]
    folder = os.path.dirname(sd.__file__)
    for f in ("motorcycle_left.png", "motorcycle_right.png", "color.png"):
        ims.append(np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")))
    return ims


def mosaic(h: int, w: int, seed: int) -> np.ndarray:
    """Shelf-pack photos (random flips) into an h x w canvas until it is full."""
    rng = np.random.default_rng(seed)
    ims = _photos()
    canvas = np.zeros((h, w, 3), np.uint8)
    y = 0
    while y < h:
        x, shelf = 0, 0
        while x < w:
            im = ims[rng.integers(len(ims))]
            if rng.random() < 0.5:
                im = im[:, ::-1]
            if rng.random() < 0.3:
                im = im[::-1]
            ph, pw = min(im.shape[0], h - y), min(im.shape[1], w - x)
            canvas[y : y + ph, x : x + pw] = im[:ph, :pw]
            x += pw
            shelf = max(shelf, ph)
        y += shelf
    return canvas


def save(img: np.ndarray, name: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(buf.getvalue())
    print(name, img.shape, len(buf.getvalue()), "bytes")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    save(sd.astronaut(), "photo_0.3mp.jpg")                  # 512 x 512
    save(sd.rocket(), "photo_rocket_0.3mp.jpg")              # 427 x 640
    save(sd.retina()[:1280, :1280], "photo_retina_1.6mp.jpg")
    save(mosaic(1280, 1920, seed=1), "photo_2.5mp.jpg")
    save(mosaic(2592, 3872, seed=2), "photo_10mp.jpg")
    Image.fromarray(sd.coffee()).save(os.path.join(OUT, "photo_coffee.png"))
