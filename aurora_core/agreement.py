"""How far a lower-precision (or compiled) model agrees with the fp32 one, on the shipped photos.

``agreement_images`` makes at least 200 inputs from the sample photos (aurora_core/data): each photo
flipped or not, cropped to a random window of 40-100% of each side, and rescaled by 0.5-1.5x before
the usual resize + centre crop, under a fixed seed. ``agreement`` runs two top-k heads over them and
reports the top-1 agreement and the largest difference in top-1 probability. A mode other than fp32
is only used where ``passes``: top-1 agreement >= 99% on >= 200 images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

MIN_TOP1 = 0.99
MIN_IMAGES = 200


@dataclass(frozen=True)
class Agreement:
    top1: float           # fraction of images whose top-1 class is the same
    max_prob_diff: float  # largest |p_ref(top-1) - p_other(top-1)| over the images
    n: int

    def passes(self) -> bool:
        return self.n >= MIN_IMAGES and self.top1 >= MIN_TOP1

    def __str__(self) -> str:
        return f"top-1 agreement {100 * self.top1:.1f}% on {self.n} images, max top-1 prob diff {self.max_prob_diff:.2e}"


@functools.lru_cache(maxsize=2)
def agreement_images(crop: int = 224, n: int = MIN_IMAGES, seed: int = 0) -> torch.Tensor:
    """Tensor[n, 3, crop, crop] float32, ImageNet-normalised variants of the sample photos (cached: do not
    write to it)."""
    from PIL import Image

    from aurora_core.decode import decode
    from aurora_core.ops.preprocess import PreprocessSpec, preprocess
    from aurora_core.samples import SAMPLES, sample_bytes

    spec = PreprocessSpec(resize=max(crop, round(crop * 256 / 224)), crop=crop)
    photos = []
    for k in sorted(SAMPLES):
        # Shrunk once to a shorter side of 3x the crop (a DCT-scaled decode first): the variants never need
        # more, and 200 resizes of the 10 MP photo took seconds.
        img = Image.fromarray(decode(sample_bytes(k), min_size=(3 * crop, 3 * crop)))
        f = 3 * crop / min(img.size)
        if f < 1:
            img = img.resize((round(img.width * f), round(img.height * f)), Image.BILINEAR)
        photos.append(np.asarray(img))
    rng = np.random.default_rng(seed)
    out = torch.empty((n, 3, crop, crop))
    for j in range(n):
        img = photos[j % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        v = img[y: y + ch, x: x + cw]
        if rng.random() < 0.5:
            v = v[:, ::-1]
        s = rng.uniform(0.5, 1.5)
        v = np.asarray(Image.fromarray(np.ascontiguousarray(v)).resize(
            (max(1, round(cw * s)), max(1, round(ch * s))), Image.BILINEAR))
        out[j] = preprocess(np.ascontiguousarray(v), spec)
    return out


@torch.inference_mode()
def agreement(ref, other, x: torch.Tensor, batch: int = 16) -> Agreement:
    """ref, other: callables x[B, ...] -> (probs [B, k], indices [B, k]), sorted by probability (the
    runner's heads). x: the inputs (``agreement_images``)."""
    same, diff = 0, 0.0
    for i in range(0, len(x), batch):
        pa, ia = ref(x[i: i + batch])
        pb, ib = other(x[i: i + batch])
        same += int((ia[:, 0] == ib[:, 0]).sum())
        diff = max(diff, float((pa[:, 0].float() - pb[:, 0].float()).abs().max()))
    return Agreement(same / len(x), diff, len(x))
