"""Where fast mode's error against exact mode comes from, per sample photo and DCT scale.

Fast mode decodes a JPEG at DCT scale 1/s and resamples the (H0 / s, W0 / s) extent; exact mode decodes
at full size. For each scale the table splits |fast - exact| (uint8 levels over the crop) into parts,
each measured with the same resampler and extent mapping (``preprocess(..., orig_size, scale)``):

* idct: the scaled decode against clip(box_s(rgb)), the s x s box average of the full-size unclipped
  RGB (JFIF conversion of PIL's YCbCr decode, chroma as the scaled decode sees it), clipped afterwards.
  How far libjpeg-turbo's reduced IDCT is from an ideal box decimation.
* clip: box_s(clip(rgb)) against clip(box_s(rgb)). A scaled decode converts YCbCr to RGB, and clips to
  0..255, after the reduction; a full decode clips every full-size pixel before anything averages them.
  The two differ wherever full-size pixels are out of gamut, which 4:2:0 chroma causes at a saturated
  step edge (the dark side gets the bright side's chroma).
* decimation: box_s(full decode) against exact mode: what resampling an s x s box average costs against
  resampling the full image (the filters differ), with the scaled decode taken out.

--gaps: the fidelity dial. For fast_gap 4 (default), 2 and 1, and for PIL ``draft("RGB", (resize, resize))``
followed by torchvision's transform on the drafted image (what a server adds in one line), mean and max
|x - exact| in uint8 levels over the crop, per shipped photo; with --time, the median thread CPU time of
each (decode + preprocess, one thread, round-robin in one run), plus exact mode with a whole decode (the
code before crop-region decode) and the naive PIL + torchvision path.

Run: python benchmarks/fast_mode_error.py [--resize 256] [--time] [--rounds 15] [--heatmap DIR] [--gaps]
(--time: load() per scale, timed round-robin on one thread; run it under flock /tmp/aurora-bench.lock.)
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import simplejpeg
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_preprocess import timed_medians  # noqa: E402

from aurora_core import decode as dec  # noqa: E402
from aurora_core.ops.preprocess import PreprocessSpec, fast_min_size, preprocess, resized_geometry
from aurora_core.samples import sample_bytes

SPEC = PreprocessSpec()
PHOTOS = ["retina_1.6mp", "2.5mp", "10mp"]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def levels(img: np.ndarray, orig: tuple[int, int], s: int) -> torch.Tensor:
    """preprocess() of a 1/s image standing for orig, in float64 uint8 levels [3, crop, crop]."""
    x = preprocess(np.ascontiguousarray(img), SPEC, orig_size=orig, scale=s)
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (SPEC.mean, SPEC.std))
    return (x.double() * std + mean) * 255


def box(img: np.ndarray, s: int) -> np.ndarray:
    """float64 s x s block means; a partial last block is padded by edge replication."""
    h, w = img.shape[:2]
    a = np.pad(img.astype(np.float64), ((0, ceil_div(h, s) * s - h), (0, ceil_div(w, s) * s - w), (0, 0)), "edge")
    return a.reshape(a.shape[0] // s, s, a.shape[1] // s, s, 3).mean(axis=(1, 3))


def u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def ycc(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """PIL's libjpeg decode to YCbCr (no colour conversion, no clip), at a DCT-scaled (w, h) if given."""
    im = Image.open(io.BytesIO(data))
    im.draft("YCbCr", size or im.size)
    assert im.mode == "YCbCr", im.mode
    return np.asarray(im).astype(np.float64)


def jfif_rgb(y: np.ndarray) -> np.ndarray:
    """Unclipped float RGB of a YCbCr array (the JFIF equations libjpeg-turbo uses)."""
    cb, cr = y[..., 1] - 128, y[..., 2] - 128
    return np.stack([y[..., 0] + 1.402 * cr, y[..., 0] - 0.344136 * cb - 0.714136 * cr, y[..., 0] + 1.772 * cb], -1)


def summary(a: torch.Tensor, b: torch.Tensor, orig: tuple[int, int]) -> str:
    d = (a - b).abs()
    c, y, x = np.unravel_index(d.argmax().item(), d.shape)
    nh, nw, top, left = resized_geometry(orig, SPEC)
    sy, sx = (y + top + 0.5) * orig[0] / nh, (x + left + 0.5) * orig[1] / nw
    return (f"mean {d.mean():.3f}  max {d.max():5.2f}  p99.9 {np.quantile(d.numpy(), 0.999):4.2f}  "
            f"worst: {'RGB'[c]} crop ({y},{x}) = source ({sy:.0f},{sx:.0f})")


def scales_for(orig: tuple[int, int]) -> list[int]:
    """DCT scales whose decode still covers the resized size (fast mode takes the largest keeping 4x: fast_min_size)."""
    nh, nw, _, _ = resized_geometry(orig, SPEC)
    return [s for s in (2, 4, 8) if ceil_div(orig[0], s) >= nh and ceil_div(orig[1], s) >= nw]


def errors(name: str, heatmap_dir: str | None) -> None:
    data = sample_bytes(name)
    info = dec.probe(data)
    orig = (info.height, info.width)
    nh, nw, _, _ = resized_geometry(orig, SPEC)
    chosen = dec.decode_ex(data, min_size=fast_min_size(orig, SPEC)).scale
    _, _, _, sub = simplejpeg.decode_jpeg_header(data)
    full = simplejpeg.decode_jpeg(data)
    exact = levels(full, orig, 1)
    yf = ycc(data)
    print(f"\n{name}: {orig[1]}x{orig[0]}, chroma {sub}, resized {nw}x{nh}, fast mode picks 1/{chosen}")
    for s in scales_for(orig):
        h, w = ceil_div(orig[0], s), ceil_div(orig[1], s)
        scaled = simplejpeg.decode_jpeg(data, min_height=h, min_width=w)
        fast = levels(scaled, orig, s)
        # Full-size luma with the scaled decode's own chroma, replicated: what its reduced IDCT reduces.
        chroma = np.repeat(np.repeat(ycc(data, (w, h))[..., 1:], s, 0), s, 1)[: orig[0], : orig[1]]
        rgb = jfif_rgb(np.concatenate([yf[..., :1], chroma], -1))
        ideal = levels(u8(box(rgb, s)), orig, s)
        ratio = min(h / nh, w / nw)
        print(f"  1/{s} ({w}x{h}, {ratio:.2f}x the resized size)")
        print(f"    fast vs exact   {summary(fast, exact, orig)}")
        print(f"    idct            {summary(fast, ideal, orig)}")
        print(f"    clip            {summary(levels(u8(box(np.clip(rgb, 0, 255), s)), orig, s), ideal, orig)}")
        print(f"    decimation      {summary(levels(u8(box(full, s)), orig, s), exact, orig)}")
        if heatmap_dir:
            d = (fast - exact).abs().amax(0).numpy()
            img = np.stack([np.clip(d * 255 / 8, 0, 255)] * 3, -1).astype(np.uint8)  # white = 8 levels
            img[d > 8] = (255, 0, 0)
            path = os.path.join(heatmap_dir, f"fast_error_{name}_s{s}.png")
            Image.fromarray(img).resize((3 * SPEC.crop, 3 * SPEC.crop), Image.NEAREST).save(path)
            print(f"    heat map: {path} (max over channels; white = 8 levels, red above)")


def load_at(data: bytes, s: int) -> torch.Tensor:
    """load(data) with the DCT scale forced to 1/s: probe, decode_ex, preprocess, as load() runs them."""
    info = dec.probe(data)
    min_size = None if s == 1 else (ceil_div(info.height, s), ceil_div(info.width, s))
    d = dec.decode_ex(data, min_size=min_size)
    assert d.scale == s
    return preprocess(d.image, SPEC, orig_size=d.orig_size, scale=d.scale)


def timings(rounds: int) -> None:
    """Median load() time per DCT scale (probe + decode_ex + preprocess), timed round-robin on 1 thread."""
    torch.set_num_threads(1)
    print(f"\nload() wall time, median of {rounds} round-robin rounds, load average {os.getloadavg()[0]:.2f}")
    for name in PHOTOS[1:]:
        data = sample_bytes(name)
        info = dec.probe(data)
        scales = [1, *scales_for((info.height, info.width))]
        wall = timed_medians({s: (lambda s=s, data=data: load_at(data, s)) for s in scales}, rounds)["wall"]
        for s, med in wall.items():
            print(f"  {name:6s} 1/{s}: {med * 1e3:7.2f} ms  ({med / wall[1]:.2f}x exact)")


GAP_PHOTOS = ["0.3mp", "rocket_0.3mp", "retina_1.6mp", "2.5mp", "10mp"]


def as_levels(x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (SPEC.mean, SPEC.std))
    return (x.double() * std + mean) * 255


def draft_transform(data: bytes) -> torch.Tensor:
    """The naive server plus one line: PIL draft() to the smallest DCT scale covering resize x resize, then
    torchvision's Resize/CenterCrop/ToTensor/Normalize on the drafted image."""
    from torchvision import transforms as T

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (SPEC.resize, SPEC.resize))
    tf = T.Compose([T.Resize(SPEC.resize), T.CenterCrop(SPEC.crop), T.ToTensor(),
                    T.Normalize(SPEC.mean, SPEC.std)])
    return tf(im.convert("RGB"))


def naive_transform(data: bytes) -> torch.Tensor:
    """The naive server's path: PIL full decode, then torchvision's transform."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(SPEC.resize), T.CenterCrop(SPEC.crop), T.ToTensor(), T.Normalize(SPEC.mean, SPEC.std)])
    return tf(Image.open(io.BytesIO(data)).convert("RGB"))


def gap_table(time_it: bool, rounds: int) -> None:
    from aurora_core.ops.preprocess import load

    gaps = (4, 2, 1)
    torch.set_num_threads(1)
    print(f"\n|x - exact| in uint8 levels over the {SPEC.crop}x{SPEC.crop} crop (mean / max), spec {SPEC.resize}/"
          f"{SPEC.crop}; DCT scale in brackets")
    print(f"{'photo':14s} " + " ".join(f"{'fast_gap ' + str(g):>20s}" for g in gaps) + f" {'PIL draft()':>20s}")
    totals = {k: [] for k in [*gaps, "draft"]}
    timings = {}
    for name in GAP_PHOTOS:
        data = sample_bytes(name)
        info = dec.probe(data)
        orig = (info.height, info.width)
        exact = as_levels(load(data, SPEC, fast=False))
        fns = {"exact, whole decode": lambda data=data: preprocess(dec.decode(data), SPEC),
               "exact": lambda data=data: load(data, SPEC, fast=False)}
        cells = []
        for g in gaps:
            d = as_levels(load(data, SPEC, fast_gap=g)) - exact
            s = dec.decode_ex(data, min_size=fast_min_size(orig, SPEC, g)).scale
            totals[g].append((d.abs().mean().item(), d.abs().max().item()))
            cells.append(f"{d.abs().mean():.2f} / {d.abs().max():5.1f} [1/{s}]")
            fns[f"fast_gap {g}"] = lambda data=data, g=g: load(data, SPEC, fast_gap=g)
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (SPEC.resize, SPEC.resize))
        d = as_levels(draft_transform(data)) - exact
        totals["draft"].append((d.abs().mean().item(), d.abs().max().item()))
        cells.append(f"{d.abs().mean():.2f} / {d.abs().max():5.1f} [1/{info.width // im.size[0]}]")
        fns["PIL draft()"] = lambda data=data: draft_transform(data)
        fns["PIL full"] = lambda data=data: naive_transform(data)
        print(f"{name:14s} " + " ".join(f"{c:>20s}" for c in cells))
        if time_it:
            timings[name] = timed_medians(fns, rounds)["cpu"]
    print(f"{'mean / max':14s} " + " ".join(
        f"{np.mean([m for m, _ in v]):.2f} / {max(x for _, x in v):5.1f}".rjust(20) for v in totals.values()))
    if time_it:
        cols = list(next(iter(timings.values())))
        print(f"\ndecode + preprocess, median thread CPU ms of {rounds} round-robin rounds (one thread); "
              f"load average {os.getloadavg()}")
        print(f"{'photo':14s} " + " ".join(f"{c:>20s}" for c in cols))
        for name, t in timings.items():
            print(f"{name:14s} " + " ".join(f"{t[c] * 1e3:20.2f}" for c in cols))
        print(f"{'mean':14s} " + " ".join(f"{np.mean([t[c] for t in timings.values()]) * 1e3:20.2f}" for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", action="store_true", help="also time load() at each scale")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--heatmap", metavar="DIR", help="write |fast - exact| heat maps (PNG) here")
    ap.add_argument("--resize", type=int, default=256, help="spec.resize (crop = 7/8 of it); default 256/224")
    ap.add_argument("--gaps", action="store_true", help="only the fast_gap / PIL draft() error table")
    args = ap.parse_args()
    global SPEC
    SPEC = PreprocessSpec(resize=args.resize, crop=args.resize * 7 // 8)
    if args.gaps:
        gap_table(args.time, args.rounds)
        return
    for name in PHOTOS:
        errors(name, args.heatmap)
    if args.time:
        timings(args.rounds)


if __name__ == "__main__":
    main()
