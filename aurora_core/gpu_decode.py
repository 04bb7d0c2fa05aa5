"""JPEG decode on the GPU (nvJPEG through torchvision), with the CPU decoder as the fallback.

Policy:

* Every input first goes through ``aurora_core.decode``'s own header checks (``max_bytes``, magic
  bytes, header walk, ``max_pixels``, scan cap), so the limits and typed errors are the CPU path's,
  raised before nvJPEG allocates anything.
* nvJPEG gets 8-bit Huffman-coded JPEGs (baseline, extended, progressive) with 1 or 3 components that
  end in an EOI marker. CMYK/YCCK, arithmetic-coded JPEGs, PNG and files without a final EOI (likely
  truncated: nvJPEG may pad them silently where the CPU decoder is strict) go to ``decode_ex``. So does
  any image nvJPEG rejects: the CPU decoder then decodes it or raises the right ``CorruptImage``.
* EXIF orientation is the one ``aurora_core.decode`` reads, applied on the device with the same
  transposes and flips, so both paths return the same pixels' layout.
* Results are ``uint8 [H, W, 3]`` CUDA tensors. GPU-decoded ones are views of torchvision's
  ``[3, H, W]`` planes (the Triton preprocess kernel reads that layout without a copy); CPU-decoded
  ones are uploaded. nvJPEG does no DCT scaling: ``scale`` is always 1 for GPU-decoded images.
* Streams: decoding runs on the decoder's own stream. Before returning, the consumer stream (the
  caller's current stream, unless given) waits on an event recorded after the decode, and every
  output tensor is ``record_stream``-ed on it, so the caching allocator does not hand the memory to
  the decoder again while the consumer may still read it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from aurora_core import decode as _cpu

__all__ = ["GpuDecoded", "GpuDecoder", "route", "nvjpeg_available", "decode_gpu"]

# SOF markers nvJPEG decodes: baseline, extended and progressive Huffman. Arithmetic coding (C9, CA)
# is left to libjpeg-turbo.
_NVJPEG_SOF = {0xC0, 0xC1, 0xC2}


class GpuDecoded(NamedTuple):
    """image: uint8 [H, W, 3] on the device; orig_size: (H0, W0) after orientation; backend: gpu|cpu."""

    image: torch.Tensor
    orig_size: tuple[int, int]
    scale: int
    format: str
    backend: str


def _sof_marker(buf: memoryview) -> int | None:
    """The SOF marker byte of a JPEG whose header ``decode`` has already validated."""
    pos, n = 2, len(buf)
    while pos + 4 <= n:
        while pos < n and buf[pos] == 0xFF:
            pos += 1
        if pos + 3 > n:
            return None
        marker = buf[pos]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker == 0xDA:
            return None
        pos += 1 + ((buf[pos + 1] << 8) | buf[pos + 2])
    return None


def _ends_with_eoi(buf: memoryview) -> bool:
    # Trailing padding after EOI is common (cameras, some CDNs): look at the last 4 KiB, not the last 2 bytes.
    tail = bytes(buf[-4096:]).rstrip(b"\x00")
    return tail.endswith(b"\xff\xd9")


def route(data, max_pixels: int = 50_000_000, max_bytes: int = 32 << 20):
    """Check limits and pick a decoder: returns ("gpu" | "cpu", header). Raises decode's typed errors."""
    buf = _cpu._as_buffer("decode", data)
    hdr = _cpu._inspect("decode", buf, max_pixels, max_bytes)
    if hdr.format != "jpeg" or hdr.cmyk:
        return "cpu", hdr
    if _sof_marker(buf) not in _NVJPEG_SOF or not _ends_with_eoi(buf):
        return "cpu", hdr
    return "gpu", hdr


def _orient_chw(chw: torch.Tensor, orientation: int) -> torch.Tensor:
    """decode._orient for a [C, H, W] tensor: HWC axes 0/1 are CHW axes 1/2."""
    if orientation == 1:
        return chw
    t = chw.transpose(1, 2)
    out = {
        2: lambda: chw.flip(2),
        3: lambda: chw.flip(1, 2),
        4: lambda: chw.flip(1),
        5: lambda: t,
        6: lambda: t.flip(2),
        7: lambda: t.flip(1, 2),
        8: lambda: t.flip(1),
    }[orientation]()
    return out.contiguous()


def _torchvision_nvjpeg(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 marks its decoders deprecated
        try:
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except TypeError:  # torchvision < 0.19 decodes one image per call
            out = [decode_jpeg(t, mode=ImageReadMode.RGB, device=device) for t in tensors]
    return list(out)


_available: dict[str, bool] = {}
_available_lock = threading.Lock()


def nvjpeg_available(device="cuda") -> bool:
    """Whether torchvision can decode a JPEG on `device` here (tried once, then cached)."""
    key = str(device)
    with _available_lock:
        if key not in _available:
            ok = False
            if torch.cuda.is_available():
                try:
                    import io

                    from PIL import Image

                    b = io.BytesIO()
                    Image.new("RGB", (16, 8), (200, 10, 10)).save(b, format="JPEG")
                    t = torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8)
                    img = _torchvision_nvjpeg([t], torch.device(device))[0]
                    ok = tuple(img.shape) == (3, 8, 16) and img.is_cuda
                except Exception:
                    ok = False
            _available[key] = ok
        return _available[key]


class GpuDecoder:
    """Batched JPEG decode on a CUDA device with a CPU fallback; thread-safe.

    decoder = GpuDecoder("cuda")
    results = decoder.decode_batch([bytes, ...])   # list of GpuDecoded, or the typed error raised
    """

    def __init__(
        self,
        device="cuda",
        *,
        max_pixels: int = 50_000_000,
        max_bytes: int = 32 << 20,
        nvjpeg: Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]] | None = None,
    ):
        self.device = torch.device(device)
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        # `nvjpeg` replaces torchvision's decoder in CPU tests of the routing and fallback logic.
        self._nvjpeg = nvjpeg or _torchvision_nvjpeg
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("GpuDecoder: expected a CUDA device, but CUDA is not available here")
            self.stream = torch.cuda.Stream(self.device)
        elif nvjpeg is None:
            raise ValueError(f"GpuDecoder: expected a CUDA device, got {self.device}; use aurora_core.decode")
        else:
            self.stream = None
        self.stats = {"gpu": 0, "cpu": 0, "gpu_rejected": 0}
        self._lock = threading.Lock()

    def route(self, data):
        """``route(data)`` under this decoder's limits: ("gpu" | "cpu", header), or None when the header
        fails a check (the CPU decoder then raises the same typed error). Pass it back to decode_batch."""
        try:
            return route(data, self.max_pixels, self.max_bytes)
        except Exception:
            return None

    def decode_batch(
        self, datas: Sequence, *, consumer_stream: torch.cuda.Stream | None = None, return_exceptions: bool = False,
        routes: Sequence | None = None,
    ) -> list[GpuDecoded]:
        """Decode every input; raises the first input's typed error (checked before any decoding), or with
        ``return_exceptions`` puts each bad input's error in its place and decodes the others. A sticky
        CUDA error always raises.

        consumer_stream: the stream that will read the images (default: the caller's current stream).
        routes: ``self.route(d)`` of each input, when the caller already has them (each header is then
        parsed once); a None entry is routed again.
        """
        routed = []
        for i, d in enumerate(datas):
            if routes is not None and routes[i] is not None:
                routed.append(routes[i])
                continue
            try:
                routed.append(route(d, self.max_pixels, self.max_bytes))
            except Exception as e:
                if not return_exceptions:
                    raise
                routed.append(("error", e))
        if self.stream is None:
            return self._decode(datas, routed, return_exceptions)
        consumer = consumer_stream or torch.cuda.current_stream(self.device)
        with self._lock, torch.cuda.stream(self.stream):
            # Everything that touches decoder output (orientation, uploads) runs on the decoder stream.
            results = self._decode(datas, routed, return_exceptions)
            done = torch.cuda.Event()
            done.record(self.stream)
        consumer.wait_event(done)
        for r in results:
            if isinstance(r, GpuDecoded):
                r.image.record_stream(consumer)
        return results

    def _decode(self, datas, routed, return_exceptions: bool) -> list:
        results: list = [e if r == "error" else None for r, e in routed]
        gpu_idx = [i for i, (r, _) in enumerate(routed) if r == "gpu"]
        rejected: list[int] = []
        if gpu_idx:
            tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in gpu_idx]
            decoded = self._run_nvjpeg(tensors, gpu_idx, rejected)
            ok = 0
            for i, chw in decoded.items():
                hdr = routed[i][1]
                if tuple(chw.shape) != (3, hdr.height, hdr.width):
                    rejected.append(i)  # never hand out pixels of a size the limits were not checked on
                    continue
                chw = _orient_chw(chw, hdr.orientation)
                results[i] = GpuDecoded(chw.permute(1, 2, 0), (chw.shape[1], chw.shape[2]), 1, "jpeg", "gpu")
                ok += 1
            self.stats["gpu"] += ok
            self.stats["gpu_rejected"] += len(rejected)

        for i in sorted([i for i, (r, _) in enumerate(routed) if r == "cpu"] + rejected):
            try:
                d = _cpu.decode_ex(datas[i], max_pixels=self.max_pixels, max_bytes=self.max_bytes)
            except Exception as e:
                if not return_exceptions:
                    raise
                results[i] = e
                continue
            img = torch.from_numpy(d.image)
            if self.device.type == "cuda":
                img = img.pin_memory().to(self.device, non_blocking=True)
            results[i] = GpuDecoded(img, tuple(d.orig_size), d.scale, d.format, "cpu")
            self.stats["cpu"] += 1
        return results  # type: ignore[return-value]

    def _run_nvjpeg(self, tensors, idx, rejected) -> dict[int, torch.Tensor]:
        # A sticky CUDA error is the device failing, not nvJPEG rejecting an image: it propagates, so that
        # the caller fails over instead of decoding on the CPU for a device that can no longer take the pixels.
        from aurora_core.runner import is_sticky

        try:
            return dict(zip(idx, self._nvjpeg(tensors, self.device), strict=True))
        except Exception as e:
            if is_sticky(e):
                raise
            # one bad image fails the whole batch: find it one by one
        out = {}
        for i, t in zip(idx, tensors, strict=True):
            try:
                out[i] = self._nvjpeg([t], self.device)[0]
            except Exception as e:
                if is_sticky(e):
                    raise
                rejected.append(i)
        return out


def decode_gpu(datas: Sequence, device="cuda", **limits) -> list[np.ndarray | torch.Tensor]:
    """Convenience: decode a batch on `device` and return the uint8 [H, W, 3] images."""
    return [r.image for r in GpuDecoder(device, **limits).decode_batch(datas)]
