"""Bytes to uint8 RGB for untrusted input: format sniffing, header limits, DCT-scaled JPEG, PNG, EXIF.

Policy (what a caller can rely on):

* Input is ``bytes``, ``bytearray`` or ``memoryview``; the format is chosen by magic bytes only. JPEG
  (baseline, progressive, arithmetic; grey, YCbCr, RGB, CMYK, YCCK) and PNG (every colour type and bit
  depth, interlaced) are accepted; anything else raises ``UnsupportedFormat`` without being parsed.
* Order of checks, all before any pixel memory exists: ``max_bytes``; magic bytes; our own header walk
  (JPEG markers up to the first SOS, PNG chunks with their CRCs); zero width or height; ``max_pixels``
  (Python ints, so no overflow); for JPEG, libjpeg-turbo's own view of the header must agree with ours,
  so the size we checked is the size it allocates.
* Corrupt data raises ``CorruptImage``, never a grey-padded image: libjpeg-turbo runs with
  ``strict=True`` (warnings such as "premature end of data" are errors); every PNG chunk CRC is checked,
  and PNG pixels are decoded by libspng (from the pyspng wheel) with its own CRC and zlib Adler-32 checks
  on and no progressive decode, so an IDAT stream that is cut, one row short or fails Adler-32 is an
  error. Without libspng, Pillow decodes PNG, with ``LOAD_TRUNCATED_IMAGES`` off (it then accepts a
  complete zlib stream that is short of rows, filling them with zeros). Progressive JPEGs with more
  than ``MAX_SCANS`` scans are rejected before decoding.
* Alpha is dropped, as ``PIL.Image.convert("RGB")`` and torchvision's ``ImageReadMode.RGB`` do: the
  colour channels are returned as stored, not composited over a background.
* 16-bit PNG samples become 8 bits by keeping the high byte (``v >> 8``), for every colour type (Pillow
  does this for RGB/RGBA/LA but clips 16-bit grey at 255, which we do not copy).
* CMYK/YCCK JPEGs are decoded to CMYK by libjpeg-turbo and converted as Pillow does: Adobe polarity
  (stored values inverted) is assumed, then ``R = (255 - C) * (255 - K) / 255`` with Pillow's rounding.
  No ICC colour management is applied to any image.
* A JPEG decoded at DCT scale 1/s (``min_size``) has ceil(H0 / s) x ceil(W0 / s) pixels, and pixel (i, j)
  is the mean of the source block [s*i, s*i + s) x [s*j, s*j + s) up to the reduced IDCT's error (0.3 to
  0.6 levels on average on the sample photos; a block shifted by one source pixel is 2.4 to 10 times
  further): the image stands for the extent (H0 / s, W0 / s), with no half-pixel offset. libjpeg-turbo
  converts to RGB, clipping to 0..255, after the reduction, so where full-size pixels are out of gamut
  (a saturated step edge with 4:2:0 chroma) a scaled pixel is not the mean of the clipped full decode.
* ``crop_for=spec`` (what ``load`` and the ``Pipeline`` pass) decodes a JPEG only in the rows and columns that
  ``preprocess`` with that spec reads, with libjpeg-turbo's jpeg_skip_scanlines / jpeg_crop_scanline
  (``csrc/jpeg_region.cpp``, on the libjpeg-turbo the Pillow wheel ships). Those pixels equal the full
  decode's bit for bit; the others are left unwritten (``Decoded.valid`` says which are which). The whole
  entropy-coded stream is still read, so the same corrupt files fail.
* EXIF orientation 1..8 is read from the first APP1 ``Exif`` segment (JPEG) or the ``eXIf`` chunk (PNG)
  with a small bounds-checked TIFF parser and applied as ``PIL.ImageOps.exif_transpose`` does. Malformed
  EXIF is ignored (orientation 1). XMP orientation is not used.

Stable ``reason`` strings:

* ``UnsupportedFormat``: unsupported_format; unsupported_jpeg (lossless, hierarchical, 12-bit or
  2-component JPEG, or chroma sampling factors TurboJPEG cannot name, such as 3x1 or 4:4:1; Pillow would
  decode some of those, but only without strict corruption checks).
* ``ImageTooLarge``: too_many_bytes, too_many_pixels.
* ``CorruptImage``: truncated, bad_header, bad_checksum (PNG CRC), zero_size, too_many_scans,
  too_many_markers (header walks are bounded), decode_failed (the pixel decoder rejected the data).

Threads: everything here is re-entrant; libjpeg-turbo and libspng run with the GIL released.
"""

from __future__ import annotations

import ctypes
import io
import logging
import operator
import re
import struct
import sys
import types
import zlib
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image

from aurora_core.errors import CorruptImage, ImageTooLarge, UnsupportedFormat

__all__ = ["decode", "decode_ex", "probe", "Decoded", "ImageInfo", "MAX_SCANS"]

#: Progressive JPEG scan cap. Encoders write 1-4 (baseline) or about 10 (libjpeg's default
#: progression, mozjpeg's optimized ones); every scan is a pass over the whole coefficient buffer,
#: so a file with thousands of tiny scans is a CPU bomb (libjpeg-turbo documents the same guard as
#: TJPARAM_SCANLIMIT).
MAX_SCANS = 100
#: Marker segments before the first scan (APPn, DQT, DHT, COM...). Real files have fewer than 30;
#: the cap bounds our Python header walk on a 32 MB file of empty segments.
MAX_JPEG_SEGMENTS = 1024

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# SOF markers libjpeg-turbo decodes through the 8-bit DCT path: baseline, extended, progressive,
# and their arithmetic-coded forms. Lossless (C3, CB) and hierarchical (C5-C7, CD-CF) are refused.
_SOF_DCT = {0xC0, 0xC1, 0xC2, 0xC9, 0xCA}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xCB, 0xCD, 0xCE, 0xCF}
# A marker inside entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a restart
# marker (D0-D7) or another fill byte.
_MARKER_RE = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_SOS_RE = re.compile(rb"\xff\xda")
# tjGetScalingFactors() below 1/1, smallest first: the order simplejpeg searches for min_height/width.
_TJ_FACTORS = ((1, 8), (1, 4), (3, 8), (1, 2), (5, 8), (3, 4), (7, 8))
# PNG colour type -> allowed bit depths.
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


class Decoded(NamedTuple):
    """image: uint8 [ceil(H0/scale), ceil(W0/scale), 3] RGB; orig_size: (H0, W0) after orientation.

    valid: None when every pixel was decoded; after a crop-region decode (``crop_for``), the rows
    [top, bottom) and columns [left, right) that hold decoded pixels. Pixels outside it are undefined
    (the memory was never written): only ``preprocess`` with the same spec, orig_size and scale, which
    reads nothing else, may use such an image.
    """

    image: np.ndarray
    orig_size: tuple[int, int]
    scale: int
    format: str  # "jpeg" or "png"
    valid: tuple[int, int, int, int] | None = None


class ImageInfo(NamedTuple):
    """Header facts; height and width are after EXIF orientation (the size ``decode`` returns)."""

    format: str
    height: int
    width: int


class _Header(NamedTuple):
    format: str
    height: int  # as stored, before orientation
    width: int
    orientation: int  # 1..8
    cmyk: bool


def decode(data, max_pixels: int = 50_000_000, max_bytes: int = 32 << 20, min_size=None) -> np.ndarray:
    """Decode JPEG or PNG bytes to a C-contiguous uint8 [H, W, 3] RGB array, EXIF orientation applied.

    min_size=(h, w), in oriented pixels, lets a JPEG decode at the largest DCT scale 1/2, 1/4 or 1/8
    whose result is still at least (h, w); use ``decode_ex`` to learn the scale and full size.
    """
    return decode_ex(data, max_pixels=max_pixels, max_bytes=max_bytes, min_size=min_size).image


def decode_ex(data, max_pixels: int = 50_000_000, max_bytes: int = 32 << 20, min_size=None,
              crop_for=None) -> Decoded:
    """``decode`` plus what the resampler needs: Decoded(image, orig_size=(H0, W0), scale, format, valid).

    image.shape[:2] == (ceil(H0 / scale), ceil(W0 / scale)); scale is 1, 2, 4 or 8 (always 1 for PNG).
    crop_for: a PreprocessSpec; a JPEG is then decoded only in the rows and columns that
    ``preprocess(image, crop_for, orig_size=..., scale=...)`` reads (``source_rect``), and ``valid`` says
    which; the rest of ``image`` is undefined. The decoded pixels are the full decode's, bit for bit.
    Without libjpeg-turbo's classic API (found in the Pillow wheel) or the native extension, the whole
    image is decoded and valid is None.
    """
    buf = _as_buffer("decode", data)
    min_hw = _check_min_size(min_size)
    if crop_for is not None and type(crop_for).__name__ != "PreprocessSpec":
        raise TypeError(f"decode: crop_for must be None or a PreprocessSpec, got {type(crop_for).__name__}")
    hdr = _inspect("decode", buf, max_pixels, max_bytes)
    swap = hdr.orientation >= 5  # orientations 5..8 transpose the image
    orig = (hdr.width, hdr.height) if swap else (hdr.height, hdr.width)
    if hdr.format == "jpeg":
        want = None if min_hw is None else (min_hw[::-1] if swap else min_hw)
        scale = _pick_scale(hdr.height, hdr.width, want)
        if crop_for is not None and _region_decoder() is not None:
            img, valid = _decode_jpeg_region(buf, hdr, scale, orig, crop_for)
            return Decoded(img, orig, scale, "jpeg", valid)
        img = _decode_jpeg(buf, hdr, scale)
    else:
        scale = 1
        img = _decode_png(buf, hdr)
    return Decoded(_orient(img, hdr.orientation), orig, scale, hdr.format)


def probe(data, max_pixels: int = 50_000_000, max_bytes: int = 32 << 20) -> ImageInfo:
    """Format and oriented (height, width) from the headers alone, after the same checks as decode.

    Allocates no pixel memory; a PNG's chunk CRCs and a JPEG's scan count are checked too.
    """
    hdr = _inspect("probe", _as_buffer("probe", data), max_pixels, max_bytes)
    if hdr.orientation >= 5:
        return ImageInfo(hdr.format, hdr.width, hdr.height)
    return ImageInfo(hdr.format, hdr.height, hdr.width)


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _as_buffer(op: str, data) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{op}: expected bytes, bytearray or memoryview, got {type(data).__name__}")
    mv = memoryview(data)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv if (mv.format == "B" and mv.ndim == 1) else mv.cast("B")


def _check_min_size(min_size) -> tuple[int, int] | None:
    if min_size is None:
        return None
    try:
        h, w = (operator.index(v) for v in min_size)
    except (TypeError, ValueError) as e:
        raise TypeError(f"decode: min_size must be None or a pair of ints (h, w), got {min_size!r}") from e
    if h < 1 or w < 1:
        raise ValueError(f"decode: min_size must be positive, got {(h, w)}")
    return h, w


def _check_limit(op: str, name: str, value) -> int:
    try:
        v = operator.index(value)
    except TypeError as e:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}") from e
    if v < 1:
        raise ValueError(f"{op}: {name} must be positive, got {v}")
    return v


def _inspect(op: str, buf: memoryview, max_pixels, max_bytes) -> _Header:
    max_pixels = _check_limit(op, "max_pixels", max_pixels)
    max_bytes = _check_limit(op, "max_bytes", max_bytes)
    if buf.nbytes > max_bytes:
        raise ImageTooLarge(f"{op}: {buf.nbytes} bytes exceed max_bytes={max_bytes}", reason="too_many_bytes")
    if buf[:3] == _JPEG_MAGIC:
        hdr = _jpeg_header(op, buf, max_pixels)
    elif buf[:8] == _PNG_MAGIC:
        hdr = _png_header(op, buf, max_pixels)
    else:
        head = bytes(buf[:8]).hex(" ") or "nothing"
        raise UnsupportedFormat(f"{op}: not a JPEG or PNG (first bytes: {head}); convert it to JPEG or PNG")
    return hdr


def _check_size(op: str, fmt: str, h: int, w: int, max_pixels: int) -> None:
    if h == 0 or w == 0:
        raise CorruptImage(f"{op}: {fmt} header declares a {h}x{w} image", reason="zero_size")
    if h * w > max_pixels:
        raise ImageTooLarge(
            f"{op}: {fmt} header declares {w}x{h} = {h * w} pixels, more than max_pixels={max_pixels}",
            reason="too_many_pixels",
        )


# ---------------------------------------------------------------------------------------------------
# JPEG


def _jpeg_header(op: str, buf: memoryview, max_pixels: int) -> _Header:
    n = len(buf)
    pos = 2
    sof = None
    orientation = None
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos >= n:
            raise CorruptImage(f"{op}: JPEG ends before its first scan", reason="truncated")
        if buf[pos] != 0xFF:
            raise CorruptImage(f"{op}: JPEG: no marker at byte {pos} (0x{buf[pos]:02x})", reason="bad_header")
        while pos < n and buf[pos] == 0xFF:  # fill bytes may precede any marker
            pos += 1
        if pos + 3 > n:
            raise CorruptImage(f"{op}: JPEG ends before its first scan", reason="truncated")
        marker = buf[pos]
        if marker == 0x01:  # TEM: no length field
            pos += 1
            continue
        if marker == 0x00 or 0xD0 <= marker <= 0xD9:
            raise CorruptImage(f"{op}: JPEG: unexpected marker 0xff{marker:02x} before the first scan",
                               reason="bad_header")
        length = (buf[pos + 1] << 8) | buf[pos + 2]
        seg, end = pos + 3, pos + 1 + length
        if length < 2:
            raise CorruptImage(f"{op}: JPEG: marker 0xff{marker:02x} has length {length}", reason="bad_header")
        if end > n:
            raise CorruptImage(f"{op}: JPEG ends inside marker 0xff{marker:02x}", reason="truncated")
        if marker in _SOF_DCT or marker in _SOF_OTHER:
            if sof is not None or length < 8 or length < 8 + 3 * buf[seg + 5]:
                raise CorruptImage(f"{op}: JPEG: malformed or repeated SOF marker", reason="bad_header")
            sof = (marker, buf[seg], (buf[seg + 1] << 8) | buf[seg + 2], (buf[seg + 3] << 8) | buf[seg + 4],
                   buf[seg + 5])
        elif marker == 0xE1 and orientation is None and buf[seg:seg + 6] == b"Exif\0\0":
            orientation = _exif_orientation(buf, seg + 6, end)
        elif marker == 0xDA:
            if sof is None:
                raise CorruptImage(f"{op}: JPEG: scan before any SOF marker", reason="bad_header")
            # A sequential JPEG whose first scan holds every component is single-scan: libjpeg-turbo
            # stops at a second SOS ("Didn't expect more than one scan"), so only others need counting.
            single = sof[0] in (0xC0, 0xC1, 0xC9) and length >= 3 and buf[seg] == sof[4]
            return _jpeg_finish(op, buf, sof, orientation or 1, None if single else pos - 1, max_pixels)
        pos = end
    raise CorruptImage(f"{op}: JPEG has more than {MAX_JPEG_SEGMENTS} marker segments before its first scan",
                       reason="too_many_markers")


def _jpeg_finish(op, buf, sof, orientation, sos, max_pixels) -> _Header:
    kind, precision, h, w, ncomp = sof
    if kind not in _SOF_DCT or precision != 8 or ncomp not in (1, 3, 4):
        raise UnsupportedFormat(
            f"{op}: JPEG variant not supported (SOF 0x{kind:02x}, {precision}-bit, {ncomp} components); "
            "only 8-bit DCT JPEGs with 1, 3 or 4 components are", reason="unsupported_jpeg")
    _check_size(op, "JPEG", h, w, max_pixels)
    try:
        lh, lw, colorspace, _ = simplejpeg.decode_jpeg_header(buf, strict=True)
    except (ValueError, KeyError) as e:
        # TurboJPEG refuses chroma subsampling it cannot name (e.g. 3x1 factors); simplejpeg 1.9 raises
        # KeyError on 4:4:1, which libjpeg-turbo 3 names but simplejpeg does not.
        if isinstance(e, KeyError) or "subsampling" in str(e):
            raise UnsupportedFormat(f"{op}: JPEG chroma subsampling not supported by libjpeg-turbo's "
                                    f"TurboJPEG API ({e!r})", reason="unsupported_jpeg") from e
        raise CorruptImage(f"{op}: JPEG header rejected by libjpeg-turbo: {e}", reason="bad_header") from e
    if (lh, lw) != (h, w):
        # Never let the decoder allocate a size other than the one the limits were checked on.
        raise CorruptImage(f"{op}: JPEG: SOF says {w}x{h}, libjpeg-turbo reads {lw}x{lh}", reason="bad_header")
    if sos is not None:
        _check_scans(op, buf, sos)
    return _Header("jpeg", h, w, orientation, colorspace in ("CMYK", "YCCK"))


def _check_scans(op: str, buf: memoryview, sos: int) -> None:
    # Fast path: every real SOS is a 0xFF 0xDA pair (0xFF in entropy data is stuffed), so the pair count
    # from the first scan on is an upper bound. It can overcount on trailers after EOI (a Motion Photo's
    # MP4 holds ~150 random pairs per 10 MB), so above the cap walk the markers properly.
    for count, _ in enumerate(_SOS_RE.finditer(buf, sos), 1):
        if count > MAX_SCANS:
            break
    else:
        return
    n = len(buf)
    pos, scans = sos, 0
    for _ in range(8 * MAX_SCANS):  # a real scan brings at most a few DHT/DQT/DRI/COM segments
        m = _MARKER_RE.search(buf, pos)
        if m is None:
            return  # no EOI: the strict decoder reports the truncation
        marker = buf[m.start() + 1]
        if marker == 0xD9:
            return
        if marker == 0xDA:
            scans += 1
            if scans > MAX_SCANS:
                raise CorruptImage(f"{op}: progressive JPEG has more than {MAX_SCANS} scans",
                                   reason="too_many_scans")
        if marker in (0x01, 0xD8):  # TEM and SOI carry no length
            pos = m.end()
            continue
        if m.end() + 2 > n:
            return
        pos = m.end() + ((buf[m.end()] << 8) | buf[m.end() + 1])  # skip the segment, entropy data follows
    raise CorruptImage(f"{op}: JPEG has more than {8 * MAX_SCANS} markers after its first scan",
                       reason="too_many_markers")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pick_scale(h: int, w: int, want: tuple[int, int] | None) -> int:
    """Largest s in (8, 4, 2) with ceil(h/s) >= want[0] and ceil(w/s) >= want[1], else 1 (stored coords)."""
    if want is None:
        return 1
    for s in (8, 4, 2):
        th, tw = _ceil_div(h, s), _ceil_div(w, s)
        if th >= want[0] and tw >= want[1]:
            # simplejpeg takes the first factor, smallest first, reaching (th, tw). For images of a few
            # pixels 3/8 can round to the same size as 1/2; decode those at full size rather than at 3/8.
            num, den = next(f for f in _TJ_FACTORS
                            if _ceil_div(h * f[0], f[1]) >= th and _ceil_div(w * f[0], f[1]) >= tw)
            return s if (num, den) == (1, s) else 1
    return 1


def _decode_jpeg(buf: memoryview, hdr: _Header, scale: int) -> np.ndarray:
    h, w = _ceil_div(hdr.height, scale), _ceil_div(hdr.width, scale)
    kwargs = {} if scale == 1 else {"min_height": h, "min_width": w}
    # The accurate integer IDCT and fancy upsampling (simplejpeg's defaults), stated so they stay: fast
    # mode's error bound (tests/test_preprocess.py) holds for the accurate IDCT, which fastdct trades away,
    # and full decodes must match Pillow's. fastupsample would not speed up a 1/2..1/8 decode of 4:2:0: there
    # libjpeg-turbo scales chroma with a larger IDCT instead of upsampling (the output is bit-identical).
    try:
        img = simplejpeg.decode_jpeg(buf, colorspace="CMYK" if hdr.cmyk else "RGB", fastdct=False,
                                     fastupsample=False, strict=True, **kwargs)
    except ValueError as e:
        raise CorruptImage(f"decode: JPEG data is corrupt: {e}", reason="decode_failed") from e
    if img.shape[:2] != (h, w):
        raise RuntimeError(f"decode: internal error: libjpeg-turbo returned {img.shape} for a "
                           f"{hdr.width}x{hdr.height} JPEG at scale 1/{scale}, expected ({h}, {w})")
    return _cmyk_to_rgb(img) if hdr.cmyk else img


# Pixels decoded beyond the crop's filter windows on each side: libjpeg-turbo's fancy upsampling treats
# the first and last column of a cropped scanline as an image edge, so those differ from a full decode
# (by up to a few levels on 4:2:0 photos); everything further in is bit-identical (tests/test_decode_region.py).
_REGION_MARGIN = 2


def _region_decoder():
    """aurora_core._C with a libjpeg-turbo loaded for region decode, or None (then decodes are whole).

    The library is the libjpeg-turbo the Pillow wheel bundles (pillow.libs/libjpeg-*.so*), the one
    Pillow itself decodes with; the environment variable AURORA_LIBJPEG names another (libjpeg 6.2 ABI).
    """
    global _REGION
    if _REGION is None:
        _REGION = _load_region_decoder() or False
    return _REGION or None


_REGION = None
_alloc = np.empty  # tests poison the undefined pixels through this


def _load_region_decoder():
    import glob
    import os

    log = logging.getLogger("aurora_core")
    try:
        from aurora_core import _C
    except ImportError as e:
        log.info("decode: native extension unavailable (%r); JPEGs are decoded whole", e)
        return None
    import PIL

    path = os.environ.get("AURORA_LIBJPEG")
    if not path:
        here = os.path.dirname(PIL.__file__)  # Linux wheels: pillow.libs beside PIL; macOS: PIL/.dylibs
        found = sorted(glob.glob(os.path.join(here, os.pardir, "pillow.libs", "libjpeg*.so*"))
                       + glob.glob(os.path.join(here, ".dylibs", "libjpeg*.dylib")))
        path = found[0] if found else None
    if path is None:
        log.info("decode: no libjpeg-turbo found beside Pillow; JPEGs are decoded whole")
        return None
    ok, why = _C.jpeg_region_load(path)
    if ok:
        why = _region_self_test(_C)
    if why:
        log.warning("decode: cannot use %s for region decode (%s); JPEGs are decoded whole", path, why)
        return None
    return _C


def _region_self_test(lib) -> str:
    """'' when the loaded library decodes a small 4:2:0 JPEG, whole and cropped at 1/2, exactly as simplejpeg
    does; else why not. A library with another ABI fails here once, instead of on every image as 'corrupt'."""
    rng = np.random.default_rng(0)
    src = np.repeat(np.repeat(rng.integers(0, 256, (6, 10, 3), np.uint8), 8, 0), 8, 1)
    data = simplejpeg.encode_jpeg(src, quality=90, colorsubsampling="420")
    for scale, rect in ((1, (0, 48, 0, 80)), (2, (5, 20, 17, 30))):
        h, w = _ceil_div(48, scale), _ceil_div(80, scale)
        want = simplejpeg.decode_jpeg(data, min_height=h, min_width=w, fastdct=False, fastupsample=False)
        out = np.zeros((h, w, 3), np.uint8)
        rc, _, _, why = lib.jpeg_decode_region(data, out, scale=scale, top=rect[0], bottom=rect[1], left=rect[2],
                                               right=rect[3])
        t, b = rect[0], rect[1]
        l0, r0 = rect[2] + _REGION_MARGIN, rect[3] - _REGION_MARGIN
        if rc or want.shape != out.shape or not np.array_equal(out[t:b, l0:r0], want[t:b, l0:r0]):
            return f"self-test at 1/{scale}: rc {rc} {why or 'pixels differ from simplejpeg'}"
    return ""


def _to_stored(o: int, y: int, x: int, h: int, w: int) -> tuple[int, int]:
    """Stored pixel behind oriented pixel (y, x) of orientation o; (h, w) is the stored image's size."""
    return {1: (y, x), 2: (y, w - 1 - x), 3: (h - 1 - y, w - 1 - x), 4: (h - 1 - y, x), 5: (x, y),
            6: (h - 1 - x, y), 7: (h - 1 - x, w - 1 - y), 8: (x, w - 1 - y)}[o]


def _map_rect(o: int, rect: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int]:
    """An oriented (top, bottom, left, right) rect to stored coordinates (stored image h x w)."""
    (y0, x0), (y1, x1) = _to_stored(o, rect[0], rect[2], h, w), _to_stored(o, rect[1] - 1, rect[3] - 1, h, w)
    return min(y0, y1), max(y0, y1) + 1, min(x0, x1), max(x0, x1) + 1


def _decode_jpeg_region(buf: memoryview, hdr: _Header, scale: int, orig: tuple[int, int], spec):
    """(image, valid): the oriented 1/scale image, decoded only inside source_rect(orig, scale, spec)."""
    from aurora_core.ops.preprocess import source_rect

    o = hdr.orientation
    h, w = _ceil_div(hdr.height, scale), _ceil_div(hdr.width, scale)  # stored, scaled
    valid = source_rect(orig, scale, spec)
    oh, ow = (w, h) if o >= 5 else (h, w)
    m = _REGION_MARGIN
    want = (max(valid[0] - m, 0), min(valid[1] + m, oh), max(valid[2] - m, 0), min(valid[3] + m, ow))
    top, bottom, left, right = _map_rect(o, want, h, w)
    stored = _alloc((h, w, 4 if hdr.cmyk else 3), np.uint8)  # only the region's pages are ever touched
    rc, _, _, why = _REGION.jpeg_decode_region(buf, stored, scale=scale, top=top, bottom=bottom,
                                               left=left, right=right)
    if rc == -1:
        raise CorruptImage(f"decode: JPEG data is corrupt: {why}", reason="decode_failed")
    if rc:
        raise RuntimeError(f"decode: internal error: {why} (a {hdr.width}x{hdr.height} JPEG)")
    if o == 1 and not hdr.cmyk:
        return stored, valid
    part = stored[top:bottom, left:right]
    part = _orient(_cmyk_to_rgb(part) if hdr.cmyk else part, o)
    # Stored (top, left) lands at the oriented corner the inverse orientation maps it to.
    inv = {6: 8, 8: 6}.get(o, o)
    y, _, x, _ = _map_rect(inv, (top, bottom, left, right), oh, ow)
    img = _alloc((oh, ow, 3), np.uint8)
    img[y:y + part.shape[0], x:x + part.shape[1]] = part
    return img, valid


def _cmyk_to_rgb(stored: np.ndarray) -> np.ndarray:
    """stored: uint8 [H, W, 4] as in the file. Pillow's rule: Adobe polarity (inverted) is assumed,
    then R = nk - muldiv255(C, nk) with nk = 255 - K, rounded as Pillow's Convert.c does."""
    nk = stored[..., 3:].astype(np.uint16)  # 255 - K, since the stored K is inverted
    t = (255 - stored[..., :3]).astype(np.uint16) * nk + 128  # at most 65153: fits uint16
    return (nk - ((t + (t >> 8)) >> 8)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# PNG


def _png_header(op: str, buf: memoryview, max_pixels: int) -> _Header:
    n = len(buf)
    pos = 8
    size = None
    orientation = None
    palette = idat = False
    # Bounds our Python chunk loop; encoders write IDAT chunks of 8 KiB or more.
    max_chunks = max(4096, n // 1024)
    for _ in range(max_chunks):
        if pos + 12 > n:
            raise CorruptImage(f"{op}: PNG ends before its IEND chunk", reason="truncated")
        length, ctype = struct.unpack_from(">I4s", buf, pos)
        end = pos + 8 + length
        if length > 0x7FFFFFFF:
            raise CorruptImage(f"{op}: PNG chunk length {length} out of range", reason="bad_header")
        if end + 4 > n:
            raise CorruptImage(f"{op}: PNG ends inside its {ctype!r} chunk", reason="truncated")
        if zlib.crc32(buf[pos + 4:end]) != struct.unpack_from(">I", buf, end)[0]:
            raise CorruptImage(f"{op}: PNG {ctype!r} chunk fails its CRC", reason="bad_checksum")
        if size is None:
            if ctype != b"IHDR" or length != 13:
                raise CorruptImage(f"{op}: PNG does not start with an IHDR chunk", reason="bad_header")
            w, h, depth, color, comp, filt, interlace = struct.unpack_from(">IIBBBBB", buf, pos + 8)
            if depth not in _PNG_DEPTHS.get(color, ()) or comp or filt or interlace > 1 or max(w, h) > 2**31 - 1:
                raise CorruptImage(f"{op}: PNG IHDR is invalid (colour type {color}, depth {depth})",
                                   reason="bad_header")
            _check_size(op, "PNG", h, w, max_pixels)  # before walking the rest of a possibly huge file
            size = (h, w)
        elif ctype == b"PLTE":
            palette = True
        elif ctype == b"IDAT":
            if color == 3 and not palette:
                raise CorruptImage(f"{op}: palette PNG without a PLTE chunk", reason="bad_header")
            idat = True
        elif ctype == b"eXIf" and orientation is None:
            skip = 6 if buf[pos + 8:pos + 14] == b"Exif\0\0" else 0
            orientation = _exif_orientation(buf, pos + 8 + skip, end)
        elif ctype == b"IEND":
            if not idat:
                raise CorruptImage(f"{op}: PNG has no IDAT chunk", reason="bad_header")
            return _Header("png", size[0], size[1], orientation or 1, False)
        pos = end + 4
    raise CorruptImage(f"{op}: PNG has more than {max_chunks} chunks", reason="too_many_markers")


def _decode_png(buf: memoryview, hdr: _Header) -> np.ndarray:
    return _decode_png_pillow(buf, hdr) if _SPNG is None else _decode_png_spng(buf, hdr)


def _load_spng():
    """libspng's C API, from the library the pyspng wheel ships, or None (Pillow is used then).

    Not ``pyspng.load``: it sets SPNG_CRC_USE, which also skips zlib's Adler-32 check, so an IDAT altered
    under valid chunk CRCs decodes to wrong pixels (2484 of 3000 mutations of 1-3 bit flips did; Pillow
    and libspng's defaults rejected all but 7, which decoded to Pillow's pixels), and it holds the GIL
    while decoding; ctypes calls release it.
    """
    try:
        from pyspng import _pyspng_c

        lib = ctypes.CDLL(_pyspng_c.__file__)
        ptr, size = ctypes.c_void_p, ctypes.c_size_t
        sigs = {"spng_ctx_new": ([ctypes.c_int], ptr), "spng_ctx_free": ([ptr], None),
                "spng_set_chunk_limits": ([ptr, size, size], ctypes.c_int),
                "spng_set_png_buffer": ([ptr, ptr, size], ctypes.c_int),
                "spng_decoded_image_size": ([ptr, ctypes.c_int, ctypes.POINTER(size)], ctypes.c_int),
                "spng_decode_image": ([ptr, ptr, size, ctypes.c_int, ctypes.c_int], ctypes.c_int),
                "spng_strerror": ([ctypes.c_int], ctypes.c_char_p)}
        for name, (args, res) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        return lib
    except (ImportError, OSError, AttributeError) as e:
        logging.getLogger("aurora_core").info("decode: libspng unavailable (%r); decoding PNG with Pillow", e)
        return None


_SPNG = _load_spng()
_SPNG_FMT_RGB8 = 4  # enum spng_format; alpha and tRNS are dropped, 16-bit samples keep the high byte
_SPNG_EMEM = 2
# Ancillary chunks libspng inflates and keeps (zTXt, iTXt, iCCP): at most 8 MB each, 64 MB in all, as
# Pillow's MAX_TEXT_MEMORY, so a 200 MB zTXt bomb is refused (tests/test_decode_corpus.py) before
# libspng inflates it whole. (Pillow stops at 1 MB per chunk; libspng's limit counts its buffers too, so
# at 1 MB it already refused a 0.9 MB zTXt that Pillow reads: the same test reads one.)
_SPNG_CHUNK_LIMIT, _SPNG_CACHE_LIMIT = 8 << 20, 64 << 20


def _decode_png_spng(buf: memoryview, hdr: _Header) -> np.ndarray:
    """libspng with its defaults (chunk CRCs and Adler-32 checked, no gamma, no progressive/partial decode).

    Same pixels as ``_decode_png_pillow`` for every colour type, bit depth, tRNS and interlacing
    (tests/test_decode.py), in less time: 5.8 against 14.8 ms on the 600x400 RGB coffee sample, 3.07
    against 3.62 ms on it as a palette PNG (``benchmarks/bench_decode.py -k png``; benchmarks/RESULTS.md).
    """
    lib = _SPNG
    src = np.frombuffer(buf, np.uint8)  # no copy; buf stays alive for the call
    out = np.empty((hdr.height, hdr.width, 3), np.uint8)  # the size the limits were checked on
    n = ctypes.c_size_t()
    ctx = lib.spng_ctx_new(0)
    if not ctx:
        raise MemoryError("decode: libspng could not allocate a decoder context")
    try:
        err = (lib.spng_set_chunk_limits(ctx, _SPNG_CHUNK_LIMIT, _SPNG_CACHE_LIMIT)
               or lib.spng_set_png_buffer(ctx, src.ctypes.data, src.nbytes)
               or lib.spng_decoded_image_size(ctx, _SPNG_FMT_RGB8, ctypes.byref(n)))
        if not err and n.value != out.nbytes:
            raise CorruptImage(f"decode: PNG: libspng would decode {n.value} bytes, IHDR says "
                               f"{hdr.width}x{hdr.height}x3", reason="bad_header")
        err = err or lib.spng_decode_image(ctx, out.ctypes.data, out.nbytes, _SPNG_FMT_RGB8, 0)
    finally:
        lib.spng_ctx_free(ctx)
    if err == _SPNG_EMEM:
        raise MemoryError("decode: libspng ran out of memory decoding a PNG")
    if err:
        raise CorruptImage(f"decode: PNG data is corrupt: libspng: {lib.spng_strerror(err).decode()}",
                           reason="decode_failed")
    return out


def _decode_png_pillow(buf: memoryview, hdr: _Header) -> np.ndarray:
    """The fallback when libspng is missing, and the oracle the libspng path is tested against."""
    try:
        with Image.open(io.BytesIO(buf), formats=["PNG"]) as im:
            im.load()
            if im.size != (hdr.width, hdr.height):
                raise CorruptImage(f"decode: PNG: Pillow reads {im.size}, IHDR says {(hdr.width, hdr.height)}",
                                   reason="bad_header")
            if im.mode.startswith("I"):  # 16-bit grey ("I;16", "I;16B", "I"): keep the high byte
                a = np.asarray(im)
                if a.dtype != np.uint16:
                    a = a.clip(0, 65535).astype(np.uint16)
                return np.repeat((a >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
            im.info.pop("transparency", None)  # alpha is dropped anyway; avoids Pillow's palette warning
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            return np.array(rgb)  # a writable copy (np.asarray of a PIL image is read-only)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"decode: PNG exceeds Pillow's MAX_IMAGE_PIXELS: {e}", reason="too_many_pixels") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise CorruptImage(f"decode: PNG data is corrupt: {e}", reason="decode_failed") from e


# ---------------------------------------------------------------------------------------------------
# EXIF orientation


def _exif_orientation(buf: memoryview, start: int, end: int) -> int:
    """Orientation tag (0x0112) of IFD0 in the TIFF stream buf[start:end]; 1 when absent or malformed."""
    if end - start < 8:
        return 1
    order = bytes(buf[start:start + 2])
    if order not in (b"II", b"MM"):
        return 1
    e = "<" if order == b"II" else ">"
    magic, ifd = struct.unpack_from(e + "HI", buf, start + 2)
    p = start + ifd
    if magic != 42 or ifd < 8 or p + 2 > end:
        return 1
    (count,) = struct.unpack_from(e + "H", buf, p)
    for q in range(p + 2, min(p + 2 + 12 * count, end - 11), 12):
        tag, typ, n = struct.unpack_from(e + "HHI", buf, q)
        if tag != 0x0112:
            continue
        if n != 1 or typ not in (3, 4):  # SHORT (the standard) or LONG, one value
            return 1
        value = struct.unpack_from(e + ("H" if typ == 3 else "I"), buf, q + 8)[0]
        return value if 1 <= value <= 8 else 1
    return 1


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation like PIL.ImageOps.exif_transpose; returns a C-contiguous array."""
    if orientation == 1:
        return img
    t = img.transpose(1, 0, 2)
    view = {
        2: img[:, ::-1],  # FLIP_LEFT_RIGHT
        3: img[::-1, ::-1],  # ROTATE_180
        4: img[::-1],  # FLIP_TOP_BOTTOM
        5: t,  # TRANSPOSE
        6: t[:, ::-1],  # ROTATE_270 (90 degrees clockwise)
        7: t[::-1, ::-1],  # TRANSVERSE
        8: t[::-1],  # ROTATE_90 (counter-clockwise)
    }[orientation]
    return np.ascontiguousarray(view)


class _CallableModule(types.ModuleType):
    """``aurora_core.decode`` is both this module and the public function (DESIGN.md: ``ac.decode(data)``).

    Importing a submodule binds it on the package, so ``ac.decode`` is this module whenever anything has
    imported ``aurora_core.decode``; making the module callable keeps ``ac.decode(data)`` and
    ``ac.decode.decode_ex(...)`` both working, whichever import happened first.
    """

    def __call__(self, data, max_pixels: int = 50_000_000, max_bytes: int = 32 << 20, min_size=None):
        return decode(data, max_pixels=max_pixels, max_bytes=max_bytes, min_size=min_size)


sys.modules[__name__].__class__ = _CallableModule
