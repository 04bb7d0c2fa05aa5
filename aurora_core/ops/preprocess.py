"""Public preprocessing ops: decoded uint8 RGB image -> normalized, cropped CHW tensor for the model.

``preprocess`` / ``preprocess_batch`` run the fused C++ kernel (``aurora_core._C``) on the CPU, the
Triton kernel on CUDA, or ``preprocess_ref`` when neither is available; ``aurora_core._dispatch``
picks. ``preprocess_ref`` is torchvision's ImageNet eval transform written with PIL and PyTorch: the
oracle of every backend, the CPU fallback and the benchmark baseline.

Images decoded at a reduced JPEG DCT scale 1/s have ceil(H0 / s) x ceil(W0 / s) pixels but stand for
the continuous extent (H0 / s, W0 / s); pass ``orig_size=(H0, W0)`` and ``scale=s`` (as returned by
``aurora_core.decode.decode_ex``) and every backend maps the output onto that extent. The output size
is computed from (H0, W0) exactly as torchvision computes it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from aurora_core import _dispatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# The reference resizes the whole image, as torchvision does, unless that image would exceed this many
# pixels (a 1x4000 strip resizes to 256x1,024,000 = 786 MB); then it resizes only the crop's box,
# which PIL computes with the same coefficients up to the last bits of the box coordinates.
_REF_FULL_RESIZE_MAX_PIXELS = 1 << 24


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects: shorter side ``resize``, center ``crop`` x ``crop``, RGB ``mean``/``std``
    (of pixel values in [0, 1]) and the output ``dtype`` (float32, float16 or bfloat16). Hashable."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 < v <= 65536:
                raise ValueError(f"PreprocessSpec: expected {name} as an int in 1..65536, got {v!r}.")
            object.__setattr__(self, name, int(v))
        if self.crop > self.resize:
            raise ValueError(
                f"PreprocessSpec: expected crop <= resize, got crop={self.crop}, resize={self.resize}. "
                "The crop is taken from the image resized to `resize` on its shorter side."
            )
        for name in ("mean", "std"):
            v = getattr(self, name)
            try:
                t = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"PreprocessSpec: expected {name} as 3 floats (R, G, B), got {v!r}.") from None
            if len(t) != 3 or not all(math.isfinite(x) for x in t):
                raise ValueError(f"PreprocessSpec: expected {name} as 3 finite floats (R, G, B), got {v!r}.")
            object.__setattr__(self, name, t)
        if not all(s > 0 for s in self.std):
            raise ValueError(f"PreprocessSpec: expected std > 0 for every channel, got {self.std}.")
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"PreprocessSpec: expected dtype float32, float16 or bfloat16, got {self.dtype!r}."
            )


def resized_geometry(orig_size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): torchvision's Resize(spec.resize) size and CenterCrop(spec.crop) origin
    for an original (H0, W0) image (the longer side is truncated: int(resize * long / short))."""
    h, w = orig_size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.resize, int(spec.resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w, int(round((new_h - spec.crop) / 2.0)), int(round((new_w - spec.crop) / 2.0))


def source_rect(orig_size: tuple[int, int], scale: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the rows [top, bottom) and columns [left, right) of a 1/scale image
    standing for an (H0, W0) original that ``preprocess(..., spec)`` reads, i.e. the union of the crop's
    filter windows (PIL's precompute_coeffs bounds, as every backend computes them), widened by one pixel
    for backends that compute the bounds in float32. Decoding only these is what crop-region decode does."""
    new_h, new_w, top, left = resized_geometry(orig_size, spec)
    rect = []
    for orig, new, off in ((orig_size[0], new_h, top), (orig_size[1], new_w, left)):
        size = -(-orig // scale)
        f = orig / scale / new
        support = max(f, 1.0)
        lo = int((off + 0.5) * f - support + 0.5) - 1
        hi = int((off + spec.crop - 0.5) * f + support + 0.5) + 1
        rect += [max(lo, 0), min(hi, size)]
    return rect[0], rect[1], rect[2], rect[3]


def fast_min_size(orig_size: tuple[int, int], spec: PreprocessSpec = PreprocessSpec(),
                  gap: float = 4) -> tuple[int, int]:
    """``min_size=(h, w)`` that fast mode passes to decode for an original (H0, W0) image.

    ``gap`` has Pillow's ``reducing_gap`` meaning: the DCT-scaled decode keeps at least ``gap`` times the
    resized size (2 and 1 decode at smaller scales, faster and further from exact mode; the errors per
    setting are in benchmarks/RESULTS.md, issue 20). The default 4 keeps the antialiased resampler
    downscaling a DCT-scaled decode 4x or more: then fast mode stays within mean 0.6 and max 8 uint8 levels of exact
    mode on the 1.6, 2.5 and 10 MP sample photos, at the default spec and at the rule's tightest spec for
    each scale (tests/test_preprocess.py; worst measured mean 0.35, max 6.6). At 2x, the block mean the
    scaled IDCT takes before the resampler, and libjpeg-turbo's colour clip after the reduction at
    saturated edges, cost up to mean 1.16 and max 19. See benchmarks/fast_mode_error.py.
    """
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 1 <= gap <= 64:
        raise ValueError(f"fast_min_size: expected gap as a number in 1..64 (the DCT-scaled decode keeps gap x "
                         f"the resized size), got {gap!r}.")
    new_h, new_w, _, _ = resized_geometry(orig_size, spec)
    return math.ceil(gap * new_h), math.ceil(gap * new_w)


def _describe(x) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        dtype = str(x.dtype).replace("torch.", "")
        return f"{dtype} {list(x.shape)}"
    return type(x).__name__


def _as_image(img, op: str) -> np.ndarray:
    """uint8 [H, W, 3] C-contiguous numpy view of ``img`` (numpy or CPU torch; zero-copy when contiguous,
    one copy otherwise)."""
    if type(img) is np.ndarray and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 \
            and img.shape[0] and img.shape[1] and img.flags.c_contiguous:
        return img  # the common call (a decoded image), checked first: this runs per image
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8:
            raise TypeError(f"{op}: expected a uint8 image [H, W, 3], got {_describe(img)}. "
                            "Decode with aurora_core.decode() first.")
        arr = img.detach().cpu().contiguous().numpy()
    elif isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise TypeError(f"{op}: expected a uint8 image [H, W, 3], got {_describe(img)}. "
                            "Decode with aurora_core.decode() first.")
        arr = img
    else:
        raise TypeError(f"{op}: expected a uint8 numpy array or torch tensor [H, W, 3], got "
                        f"{_describe(img)}. Decode with aurora_core.decode() first.")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{op}: expected a uint8 image [H, W, 3] (RGB), got {_describe(img)}. "
                         "aurora_core.decode() returns RGB; convert grey or RGBA images first.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{op}: expected a non-empty image, got {_describe(img)}.")
    return np.ascontiguousarray(arr)


def _origin(arr: np.ndarray, orig_size, scale, op: str) -> tuple[tuple[int, int], int]:
    """Checked ((H0, W0), scale): the image must have ceil(H0 / scale) x ceil(W0 / scale) pixels."""
    h, w = arr.shape[:2]
    if type(scale) is int:  # the common calls, checked without the conversions below (per image, per batch)
        if orig_size is None and scale == 1:
            return (h, w), 1
        if (type(orig_size) is tuple and len(orig_size) == 2 and type(orig_size[0]) is int
                and type(orig_size[1]) is int and 1 <= scale <= 64 and orig_size[0] > 0 and orig_size[1] > 0
                and -(-orig_size[0] // scale) == h and -(-orig_size[1] // scale) == w):
            return orig_size, scale
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or not 1 <= scale <= 64:
        raise ValueError(f"{op}: expected scale as an int in 1..64 (the DCT denominator), got {scale!r}.")
    if orig_size is None:
        orig_size = (h * scale, w * scale) if scale == 1 else None
        if orig_size is None:
            raise ValueError(f"{op}: scale={scale} needs orig_size=(H0, W0); pass decode_ex()'s orig_size.")
    try:
        oh, ow = (int(v) for v in orig_size)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: expected orig_size as (H0, W0) ints, got {orig_size!r}.") from None
    if oh <= 0 or ow <= 0 or -(-oh // scale) != h or -(-ow // scale) != w:
        raise ValueError(f"{op}: image of {h}x{w} does not match orig_size {oh}x{ow} at scale 1/{scale} "
                         "(expected ceil(orig / scale)). Pass decode_ex()'s orig_size and scale.")
    return (oh, ow), int(scale)


def _check_out(out, shape: tuple[int, ...], spec: PreprocessSpec, op: str) -> torch.Tensor:
    """``out`` as a writable, contiguous tensor of ``shape`` and ``spec.dtype`` (allocated when None)."""
    if out is None:
        return torch.empty(shape, dtype=spec.dtype)
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise ValueError(f"{op}: out is read-only; pass a writable array or tensor.")
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: expected out as a torch.Tensor {list(shape)} {spec.dtype}, got {_describe(out)}.")
    if out.dtype != spec.dtype:
        raise TypeError(f"{op}: expected out of dtype {spec.dtype} (spec.dtype), got {_describe(out)}.")
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: expected out of shape {list(shape)}, got {_describe(out)}.")
    if not out.is_contiguous():
        raise ValueError(f"{op}: expected a contiguous out (a slot buf[i] of a contiguous buffer is fine), "
                         f"got strides {out.stride()}.")
    if out.requires_grad:
        raise ValueError(f"{op}: out requires grad; pass a tensor created under torch.no_grad() or detached.")
    return out


def _numpy_out(out: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view the kernel writes through; bfloat16 as its int16 bit pattern."""
    return (out.view(torch.int16) if out.dtype == torch.bfloat16 else out).numpy()


@functools.lru_cache(maxsize=64)
def _spec_kwargs(spec: PreprocessSpec) -> dict:
    return dict(resize=spec.resize, crop=spec.crop, mean=list(spec.mean), std=list(spec.std),
                dtype=_DTYPE_NAMES[spec.dtype])


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def preprocess(img, spec: PreprocessSpec = PreprocessSpec(), out=None, *, orig_size=None, scale: int = 1,
               backend: str | None = None) -> torch.Tensor:
    """Resize (shorter side to spec.resize, bilinear antialiased), center-crop, normalize, to CHW.

    img: uint8 [H, W, 3] RGB numpy array or torch tensor (read zero-copy when C-contiguous).
    out: optional Tensor[3, crop, crop] of spec.dtype, e.g. a slot ``buf[i]`` of a batch buffer; written
    in place and returned. orig_size, scale: see the module docstring (DCT-scaled decodes).
    returns Tensor[3, crop, crop] of spec.dtype, within one uint8 level of ``preprocess_ref``.
    """
    op = "preprocess"
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"{op}: expected spec as a PreprocessSpec, got {type(spec).__name__}.")
    on_cuda = isinstance(img, torch.Tensor) and img.is_cuda
    name = _dispatch.backend_for(img, backend)
    if name == "triton":
        batch_out = None if out is None else out.unsqueeze(0)
        res = _dispatch.triton_module().preprocess_batch_triton(
            [img], spec, out=batch_out, orig_sizes=None if orig_size is None else [orig_size], scales=[scale])
        return out if out is not None else res[0]
    arr = _as_image(img, op)
    (oh, ow), scale = _origin(arr, orig_size, scale, op)
    shape = (3, spec.crop, spec.crop)
    dst = _check_out(out, shape, spec, op)
    host = torch.empty(shape, dtype=spec.dtype) if dst.is_cuda else dst
    if name == "cpp":
        _dispatch.cpp_module().preprocess(arr, _numpy_out(host), orig_size=(oh, ow), scale=scale,
                                          **_spec_kwargs(spec))
    else:
        host.copy_(preprocess_ref(arr, spec, orig_size=(oh, ow), scale=scale))
    if host is not dst:  # a CUDA out served by a CPU backend
        dst.copy_(host)
    return dst.to(img.device) if on_cuda and out is None else dst


def preprocess_batch(imgs, spec: PreprocessSpec = PreprocessSpec(), out=None, *, orig_sizes=None, scales=None,
                     backend: str | None = None, device=None, num_threads: int | None = None) -> torch.Tensor:
    """``preprocess`` over a batch, written into one buffer.

    imgs: list of uint8 [H_i, W_i, 3] (numpy or torch), or a uint8 [N, H, W, 3] array/tensor.
    out: optional Tensor[N, 3, crop, crop] of spec.dtype (pinned or not), written in place.
    orig_sizes, scales: per-image (H0, W0) and DCT scale, or None for full-size images.
    device: where the result should live (CUDA selects the Triton backend); the CPU backend computes
    on the host and copies. num_threads: CPU threads for the C++ backend (default: one per usable core);
    images are spread over them with the GIL released.
    returns Tensor[N, 3, crop, crop] of spec.dtype.
    """
    op = "preprocess_batch"
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"{op}: expected spec as a PreprocessSpec, got {type(spec).__name__}.")
    if isinstance(imgs, (np.ndarray, torch.Tensor)) and imgs.ndim == 4:
        imgs = list(imgs)
    if not isinstance(imgs, Sequence) or isinstance(imgs, (str, bytes)):
        raise TypeError(f"{op}: expected imgs as a list of uint8 images [H, W, 3], got {_describe(imgs)}.")
    n = len(imgs)
    for name_, seq in (("orig_sizes", orig_sizes), ("scales", scales)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{op}: expected {name_} with one entry per image ({n}), got {len(seq)}.")
    where = device if device is not None else (out if out is not None else (imgs[0] if n else None))
    name = _dispatch.backend_for(where, backend)
    if name == "triton":
        return _dispatch.triton_module().preprocess_batch_triton(
            list(imgs), spec, out=out, orig_sizes=orig_sizes, scales=scales, device=device)
    shape = (n, 3, spec.crop, spec.crop)
    dst = _check_out(out, shape, spec, op)
    host = torch.empty(shape, dtype=spec.dtype) if dst.is_cuda else dst
    arrs, origins, scl = [], [], []
    for i, img in enumerate(imgs):
        arr = _as_image(img, f"{op}: imgs[{i}]")
        o, s = _origin(arr, None if orig_sizes is None else orig_sizes[i], 1 if scales is None else scales[i],
                       f"{op}: imgs[{i}]")
        arrs.append(arr)
        origins.append(o)
        scl.append(s)
    if n and name == "cpp":
        threads = _default_threads() if num_threads is None else int(num_threads)
        _dispatch.cpp_module().preprocess_batch(arrs, _numpy_out(host), orig_sizes=origins, scales=scl,
                                                num_threads=threads, **_spec_kwargs(spec))
    elif n:
        for i, arr in enumerate(arrs):
            host[i].copy_(preprocess_ref(arr, spec, orig_size=origins[i], scale=scl[i]))
    if host is not dst:  # a CUDA out served by a CPU backend
        dst.copy_(host)
    if out is None and device is not None and torch.device(device).type != "cpu":
        return dst.to(device)
    return dst


def preprocess_ref(img, spec: PreprocessSpec = PreprocessSpec(), *, orig_size=None, scale: int = 1) -> torch.Tensor:
    """Plain PIL + PyTorch path, the oracle for every backend. img: uint8 [H, W, 3].

    Exactly torchvision's ``Compose([Resize(resize), CenterCrop(crop), ToTensor(), Normalize(mean, std)])``
    on ``Image.fromarray(img)`` for a full-size image. For a DCT-scaled image, PIL resamples the box
    (0, 0, W0 / scale, H0 / scale) of its pixels. returns Tensor[3, crop, crop] of spec.dtype.
    """
    arr = _as_image(img, "preprocess_ref")
    (oh, ow), scale = _origin(arr, orig_size, scale, "preprocess_ref")
    new_h, new_w, top, left = resized_geometry((oh, ow), spec)
    c = spec.crop
    pil = Image.fromarray(arr)
    ext_w, ext_h = ow / scale, oh / scale
    if new_h * new_w <= _REF_FULL_RESIZE_MAX_PIXELS:
        if scale == 1:
            resized = pil if (new_w, new_h) == pil.size else pil.resize((new_w, new_h), Image.BILINEAR)
        else:
            resized = pil.resize((new_w, new_h), Image.BILINEAR, box=(0, 0, ext_w, ext_h))
        cropped = resized.crop((left, top, left + c, top + c))
    else:
        sx, sy = ext_w / new_w, ext_h / new_h
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        cropped = pil.resize((c, c), Image.BILINEAR, box=box)
    x = torch.from_numpy(np.array(cropped, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    x = x.sub(torch.tensor(spec.mean, dtype=torch.float32)[:, None, None])
    x = x.div(torch.tensor(spec.std, dtype=torch.float32)[:, None, None])
    return x.to(spec.dtype)


def load(data, spec: PreprocessSpec = PreprocessSpec(), fast: bool = True, fast_gap: float = 4,
         **decode_limits) -> torch.Tensor:
    """Decode ``data`` (JPEG/PNG bytes) and preprocess it: returns Tensor[3, crop, crop] of spec.dtype.

    fast=True lets decode use a JPEG DCT scale (1/2, 1/4, 1/8) that keeps at least fast_gap x the resized
    size (``fast_min_size``); the resampler then maps onto the exact fractional extent. fast=False decodes
    at full size (exact mode: within one uint8 level of torchvision's transform). Either way a JPEG is
    decoded only where the crop's filter windows read (``source_rect``).
    decode_limits: max_pixels, max_bytes, passed to aurora_core.decode.decode_ex.
    """
    from aurora_core import decode as dec

    min_size = None
    if fast:
        info = dec.probe(data, **decode_limits)
        min_size = fast_min_size((info.height, info.width), spec, fast_gap)
    d = dec.decode_ex(data, min_size=min_size, crop_for=spec, **decode_limits)
    return preprocess(d.image, spec, orig_size=d.orig_size, scale=d.scale)
