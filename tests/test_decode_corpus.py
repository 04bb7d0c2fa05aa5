"""A corpus of bad and unusual inputs for aurora_core.decode, generated here: each input either decodes
to what Pillow (or an independent computation) says, or raises the right typed error."""

from __future__ import annotations

import functools
import gc
import io
import resource
import struct
import zlib

import numpy as np
import psutil
import pytest
import simplejpeg
from PIL import Image, ImageOps

from aurora_core import decode as dec
from aurora_core.decode import MAX_SCANS, decode, decode_ex, probe
from aurora_core.errors import CorruptImage, ImageError, ImageTooLarge, UnsupportedFormat
from aurora_core.samples import sample_bytes


@functools.lru_cache(maxsize=1)
def _rocket() -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample_bytes("rocket_0.3mp"))).convert("RGB"))


def photo(h: int = 48, w: int = 64) -> np.ndarray:
    return np.ascontiguousarray(_rocket()[100:100 + h, 200:200 + w])


def encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr, mode).save(b, fmt, **kw)
    return b.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def ihdr_png(w: int, h: int, depth: int = 8, color: int = 0, idat: bytes = b"") -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def zeros_png(h: int, w: int, rows_per_block: int) -> bytes:
    """A valid 8-bit grey PNG of zeros built with zlib in milliseconds, whatever its size: after a full
    flush deflate keeps no history, so every later block of identical rows compresses to the same bytes."""
    assert h % rows_per_block == 0
    block = bytes(w + 1) * rows_per_block  # each row: filter byte 0, then w zero samples
    c = zlib.compressobj(9)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    rest = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    adler = ((h * (w + 1)) % 65521) << 16 | 1  # Adler-32 of n zero bytes: a = 1, b = n mod 65521
    z = first + rest * (h // rows_per_block - 1) + b"\x03\x00" + struct.pack(">I", adler)  # empty final block
    return ihdr_png(w, h, idat=z)


def sof_offset(data: bytes) -> int:
    """Offset of the SOF marker's payload (precision byte)."""
    for m in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(m)
        if i > 0:
            return i + 4
    raise AssertionError("no SOF")


def patch_sof(data: bytes, *, marker=None, precision=None, h=None, w=None) -> bytes:
    i = sof_offset(data)
    b = bytearray(data)
    if marker is not None:
        b[i - 3] = marker
    if precision is not None:
        b[i] = precision
    if h is not None:
        b[i + 1:i + 3] = struct.pack(">H", h)
    if w is not None:
        b[i + 3:i + 5] = struct.pack(">H", w)
    return bytes(b)


@pytest.fixture
def no_decoder(monkeypatch):
    """Any call into a pixel decoder fails the test: limits must be enforced from our own header parse."""
    def boom(*a, **k):
        raise AssertionError("a decoder was called")

    for name in ("decode_jpeg", "decode_jpeg_header"):
        monkeypatch.setattr(simplejpeg, name, boom)
    monkeypatch.setattr(Image, "open", boom)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


BASE = encode(photo(), quality=85)
PROG = encode(photo(), quality=85, progressive=True)
PNG_RGB = encode(photo(30, 40), "PNG")


# ---------------------------------------------------------------------------------------------------
# Valid but unusual inputs decode to the right pixels


def test_cmyk_jpeg():
    data = encode(photo()[..., [0, 1, 2, 1]].copy(), mode="CMYK", quality=90)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    np.testing.assert_array_equal(decode(data), pillow_rgb(data))


def test_grey_jpeg():
    data = encode(photo()[..., 0].copy(), quality=90)
    np.testing.assert_array_equal(decode(data), np.repeat(pillow_rgb(data)[..., :1], 3, axis=2))


def test_16bit_grey_png_keeps_the_high_byte():
    a = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21 % 65536).astype(np.uint16)
    a[0, :4] = [0, 255, 256, 65535]
    data = encode(a, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode(data)
    np.testing.assert_array_equal(out, np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert list(out[0, :4, 0]) == [0, 0, 1, 255]  # Pillow's own convert("RGB") would clip 256 and 65535 to 255


def test_palette_png():
    im = Image.fromarray(photo()).quantize(colors=50)
    b = io.BytesIO()
    im.save(b, "PNG")
    data = b.getvalue()
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(decode(data), np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo(37, 53), quality=90, exif=exif.tobytes())
    r = decode_ex(data)
    np.testing.assert_array_equal(r.image, pillow_rgb(data))
    assert r.orig_size == r.image.shape[:2] == ((53, 37) if orientation >= 5 else (37, 53))


def test_zeros_png_builder_is_valid():
    data = zeros_png(300, 200, rows_per_block=30)
    assert zlib.decompress(data[41:-12 - 4]) == bytes(300 * 201)  # the single IDAT's payload
    np.testing.assert_array_equal(decode(data), np.zeros((300, 200, 3), np.uint8))


def test_trailer_with_many_sos_pairs_after_eoi_still_decodes():
    # A Motion Photo appends an MP4 after EOI; random data holds 0xFF 0xDA pairs, which are no scans.
    rng = np.random.default_rng(5)
    trailer = b"".join(b"\xff\xda" + rng.bytes(30) for _ in range(3 * MAX_SCANS))
    np.testing.assert_array_equal(decode(PROG + trailer), decode(PROG))


# ---------------------------------------------------------------------------------------------------
# Not JPEG or PNG: UnsupportedFormat, without being parsed


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"])
def test_other_formats_named_jpg_are_unsupported(tmp_path, fmt, no_decoder):
    path = tmp_path / "photo.jpg"
    b = io.BytesIO()
    Image.fromarray(photo()).save(b, fmt)
    path.write_bytes(b.getvalue())
    with pytest.raises(UnsupportedFormat) as e:
        decode(path.read_bytes())
    assert e.value.reason == "unsupported_format"


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(1000), b"\xff\xd8", b"\x89PNG\r\n\x1a", b"\xff" * 64,
                                  b"\0\0\0\x1cftypheic" + bytes(40), b"RIFF\0\0\0\0WEBPVP8 ", b"<svg/>"])
def test_empty_and_foreign_bytes(data, no_decoder):
    with pytest.raises(UnsupportedFormat):
        decode(data)


def test_random_bytes():
    rng = np.random.default_rng(11)
    for n in (1, 3, 8, 100, 5000):
        for _ in range(20):
            data = rng.bytes(n)
            if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n":
                continue
            with pytest.raises(UnsupportedFormat):
                decode(data)


@pytest.mark.parametrize("magic", [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"])
def test_random_bytes_after_magic(magic):
    rng = np.random.default_rng(12)
    for n in (0, 1, 10, 300, 5000):
        for _ in range(30):
            with pytest.raises(CorruptImage):
                decode(magic + rng.bytes(n))


# ---------------------------------------------------------------------------------------------------
# Oversized, zero-sized and unsupported headers


def test_jpeg_header_declaring_65535_squared(no_decoder):
    data = patch_sof(BASE, h=65535, w=65535)
    before = peak_rss_mb()
    for fn in (decode, probe):
        with pytest.raises(ImageTooLarge) as e:
            fn(data)
        assert e.value.reason == "too_many_pixels"
    assert peak_rss_mb() - before < 50  # 65535^2 RGB would be 12.9 GB


def test_png_bomb_30000_squared_zeros(no_decoder):
    gc.collect()
    before = peak_rss_mb()
    data = zeros_png(30000, 30000, rows_per_block=200)
    assert len(data) < 2 << 20  # 900 MB of samples in under 2 MB
    with pytest.raises(ImageTooLarge) as e:
        decode(data)
    assert e.value.reason == "too_many_pixels"
    assert peak_rss_mb() - before < 50  # decoding would need 900 MB, plus 2.7 GB for RGB


def test_big_but_allowed_header_is_still_checked_against_max_pixels():
    with pytest.raises(ImageTooLarge):
        decode(zeros_png(3000, 3000, rows_per_block=100), max_pixels=3000 * 3000 - 1)
    assert decode(zeros_png(600, 500, rows_per_block=100), max_pixels=600 * 500).shape == (600, 500, 3)


@pytest.mark.parametrize("h, w", [(0, 64), (48, 0), (0, 0)])
def test_zero_sized_headers(h, w, no_decoder):
    for data in (patch_sof(BASE, h=h, w=w), ihdr_png(w, h)):
        with pytest.raises(CorruptImage) as e:
            decode(data)
        assert e.value.reason == "zero_size"


def test_png_dimensions_beyond_the_spec():
    with pytest.raises(CorruptImage) as e:
        decode(ihdr_png(2**31, 1))
    assert e.value.reason == "bad_header"


@pytest.mark.parametrize("kw", [{"precision": 12}, {"precision": 16}, {"marker": 0xC3}, {"marker": 0xC5}])
def test_unsupported_jpeg_variants(kw):
    with pytest.raises(UnsupportedFormat) as e:
        decode(patch_sof(BASE, **kw))
    assert e.value.reason == "unsupported_jpeg"


@pytest.mark.parametrize("factors", [(0x31, 0x31, 0x13), (0x14, 0x11, 0x11), (0x33, 0x11, 0x11)])
def test_unusual_chroma_subsampling_is_unsupported_not_a_crash(factors):
    b = bytearray(encode(photo(), quality=85, subsampling=0))
    i = sof_offset(bytes(b))
    b[i + 7], b[i + 10], b[i + 13] = factors  # the three components' sampling factors
    with pytest.raises(UnsupportedFormat) as e:
        decode(bytes(b))
    assert e.value.reason == "unsupported_jpeg"


def test_sof_and_libjpeg_header_must_agree():
    # A second SOF after the first is a structure error, never a second size to allocate.
    i = sof_offset(BASE) - 4
    n = struct.unpack(">H", BASE[i + 2:i + 4])[0]
    data = BASE[:i] + BASE[i:i + 2 + n] + BASE[i:]
    with pytest.raises(CorruptImage) as e:
        decode(data)
    assert e.value.reason == "bad_header"


def test_png_without_palette_or_idat():
    plain = ihdr_png(4, 4, depth=8, color=3, idat=zlib.compress(bytes(5 * 4)))
    with pytest.raises(CorruptImage, match="PLTE"):
        decode(plain)
    no_idat = plain.replace(png_chunk(b"IDAT", zlib.compress(bytes(20))), b"")
    with pytest.raises(CorruptImage, match="IDAT"):
        decode(no_idat)


# ---------------------------------------------------------------------------------------------------
# Progressive scan bomb


def scan_bomb(extra: int, com: bytes = b"") -> bytes:
    last = PROG.rindex(b"\xff\xda")
    assert PROG.endswith(b"\xff\xd9")
    return PROG[:last] + com + PROG[last:-2] * (extra + 1) + b"\xff\xd9"


def test_too_many_scans_rejected_before_decoding(monkeypatch):
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: pytest.fail("decoded a scan bomb"))
    with pytest.raises(CorruptImage) as e:
        decode(scan_bomb(MAX_SCANS))
    assert e.value.reason == "too_many_scans"
    # A comment holding a fake EOI does not hide the scans after it.
    with pytest.raises(CorruptImage) as e:
        decode(scan_bomb(MAX_SCANS, com=b"\xff\xfe\x00\x06\xff\xd9\xff\xd9"))
    assert e.value.reason == "too_many_scans"


def test_extra_scans_in_a_single_scan_baseline_jpeg_stop_libjpeg():
    # Not counted (libjpeg-turbo refuses a second scan when the first held every component) ...
    last = BASE.rindex(b"\xff\xda")
    bomb = BASE[:last] + BASE[last:-2] * (2 * MAX_SCANS) + b"\xff\xd9"
    with pytest.raises(CorruptImage) as e:
        decode(bomb)
    assert e.value.reason == "decode_failed" and "more than one scan" in str(e.value)
    # ... but a sequential JPEG whose first scan holds fewer components may have more scans: counted.
    assert bomb[last + 2:last + 5] == b"\x00\x0c\x03"  # SOS of 3 components
    one = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"  # SOS of component 1 alone
    with pytest.raises(CorruptImage) as e:
        decode(bomb[:last] + one + bomb[last + 14:])
    assert e.value.reason == "too_many_scans"


def test_scan_count_under_the_cap_is_decoded_strictly():
    # Repeating the last refinement scan is a bogus progression: libjpeg-turbo warns, strict mode fails.
    with pytest.raises(CorruptImage):
        decode(scan_bomb(5))


# ---------------------------------------------------------------------------------------------------
# Truncation and bit flips


@pytest.mark.parametrize("name", ["BASE", "PROG", "PNG_RGB"])
def test_every_truncation_is_an_error(name):
    data = globals()[name]
    magic = 3 if data[:1] == b"\xff" else 8
    for cut in range(len(data)):
        with pytest.raises(UnsupportedFormat if cut < magic else CorruptImage):
            decode(data[:cut])


def test_every_png_bit_flip_is_an_error():
    for k in range(len(PNG_RGB) * 8):
        b = bytearray(PNG_RGB)
        b[k // 8] ^= 1 << (k % 8)
        with pytest.raises(ImageError):  # the CRC catches every flip after the signature
            decode(bytes(b))


def png_rgb_idat(h: int = 30, w: int = 40) -> tuple[bytes, bytes]:
    """(the raw filtered scanlines, their zlib stream) of an 8-bit RGB PNG of a photo crop."""
    raw = b"".join(b"\0" + row.tobytes() for row in photo(h, w))
    return raw, zlib.compress(raw)


def rgb_png(idat: bytes, h: int = 30, w: int = 40, extra: bytes = b"") -> bytes:
    png = ihdr_png(w, h, color=2, idat=idat)
    return png[:33] + extra + png[33:]  # extra chunks go right after the IHDR (8 + 25 bytes)


def pillow_png_path(data: bytes):
    """The Pillow PNG path's result: an array, or the ImageError it raises."""
    try:
        return dec._decode_png_pillow(memoryview(data), dec._inspect("test", memoryview(data), 50_000_000, 32 << 20))
    except ImageError as e:
        return e


def test_png_adler32_mismatch_is_an_error():
    # Valid chunk CRCs around a zlib stream whose Adler-32 is wrong: the pixels may be wrong, so refuse
    # them (Pillow does; pyspng.load() does not, it turns off libspng's CRC and Adler-32 checks).
    _, z = png_rgb_idat()
    assert not isinstance(pillow_png_path(rgb_png(z)), Exception)
    bad = rgb_png(z[:-4] + bytes(4))
    assert isinstance(pillow_png_path(bad), CorruptImage)
    with pytest.raises(CorruptImage) as e:
        decode(bad)
    assert e.value.reason == "decode_failed"


@pytest.mark.parametrize("cut", ["row", "byte", "stream_end"])
def test_png_short_or_cut_deflate_stream_is_an_error(cut):
    raw, z = png_rgb_idat()
    # A complete zlib stream one row short: the Pillow path returns an image with a black last row;
    # libspng refuses it ("IDAT stream too short"), which is the contract (never a padded image).
    idat = {"row": zlib.compress(raw[:-121]), "byte": zlib.compress(raw[:-1]), "stream_end": z[: len(z) // 2]}[cut]
    with pytest.raises(CorruptImage) as e:
        decode(rgb_png(idat))
    assert e.value.reason == "decode_failed"


def test_png_idat_mutations_under_valid_crcs_raise_or_decode_like_pillow():
    # The mutated stream gets fresh chunk CRCs, so only zlib (inflate, Adler-32) and the PNG filter
    # decoding can notice. Whatever libspng accepts, Pillow must accept with the same pixels.
    rng = np.random.default_rng(5)
    _, z = png_rgb_idat(20, 24)
    rejected = 0
    for _ in range(300):
        b = bytearray(z)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        data = rgb_png(bytes(b), 20, 24)
        try:
            out = decode(data)
        except CorruptImage as e:
            assert e.reason == "decode_failed"
            rejected += 1
            continue
        ref = pillow_png_path(data)
        assert not isinstance(ref, Exception), f"libspng decoded an IDAT that Pillow rejects: {ref}"
        np.testing.assert_array_equal(out, ref)
    assert rejected > 250


def test_png_text_bomb_is_refused_and_ordinary_text_is_not():
    _, z = png_rgb_idat()
    bomb = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(200 << 20), 9))
    with pytest.raises(CorruptImage):
        decode(rgb_png(z, extra=bomb))
    text = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(900 << 10))) + png_chunk(b"tEXt", b"k\0" + b"v" * 5000)
    np.testing.assert_array_equal(decode(rgb_png(z, extra=text)), photo(30, 40))


@pytest.mark.parametrize("name", ["BASE", "PROG"])
def test_jpeg_bit_flips_decode_like_pillow_or_raise(name):
    data = globals()[name]
    rng = np.random.default_rng(7)
    decoded = 0
    for k in rng.choice(len(data) * 8, 600, replace=False):
        b = bytearray(data)
        b[k // 8] ^= 1 << (k % 8)
        try:
            out = decode(bytes(b), max_pixels=1 << 20)
        except ImageError:
            continue
        decoded += 1
        # strict libjpeg-turbo reported no warning, so non-strict Pillow must give the same pixels
        np.testing.assert_array_equal(out, pillow_rgb(bytes(b)))
    assert decoded > 0  # flips in entropy data decode to other (valid) pixels


# ---------------------------------------------------------------------------------------------------
# Fuzz: seeded mutations; only typed errors come out, and a decoded image is consistent with probe


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op, i = int(rng.integers(6)), int(rng.integers(len(b)))
        if op == 0:
            b[i] ^= 1 << int(rng.integers(8))
        elif op == 1:
            b[i] = int(rng.integers(256))
        elif op == 2:
            b[i:i] = rng.bytes(int(rng.integers(1, 8)))
        elif op == 3:
            del b[i:i + int(rng.integers(1, 16))]
        elif op == 4:
            b[i:i] = b"\xff" + bytes([int(rng.integers(0xC0, 0x100))]) + rng.bytes(int(rng.integers(0, 6)))
        else:
            j = int(rng.integers(len(b)))
            b[i:i] = b[j:j + int(rng.integers(1, 64))]
    return bytes(b)


def test_fuzz_mutations_raise_only_typed_errors():
    cmyk = encode(photo()[..., [0, 1, 2, 1]].copy(), mode="CMYK", quality=80)
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [BASE, PROG, cmyk, encode(photo(), quality=80, exif=exif.tobytes()), PNG_RGB,
             encode(photo()[..., 0].copy(), "PNG")]
    rng = np.random.default_rng(2024)
    outcomes = {"ok": 0, "error": 0}
    for i in range(3000):
        data = mutate(seeds[i % len(seeds)], rng)
        min_size = None if i % 3 else (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        try:
            r = decode_ex(data, max_pixels=1 << 20, min_size=min_size)
        except ImageError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        info = probe(data, max_pixels=1 << 20)
        assert r.orig_size == (info.height, info.width)
        assert r.image.dtype == np.uint8 and r.image.ndim == 3 and r.image.shape[2] == 3
        assert r.image.shape[:2] == (-(-info.height // r.scale), -(-info.width // r.scale))
        assert r.image.flags.c_contiguous
    assert outcomes["ok"] > 100 and outcomes["error"] > 100, outcomes


@pytest.mark.parametrize("seed", ["BASE", "PROG", "PNG_RGB"])
def test_fuzz_header_bytes_raise_only_typed_errors(seed):
    # Header fields (SOF sampling factors, component counts, DHT/DQT tables, IHDR) decide which code
    # paths run; random values there must still give a typed error or a consistent image.
    data = globals()[seed]
    png = seed == "PNG_RGB"
    start, end = (16, 29) if png else (2, data.index(b"\xff\xda") + 14)  # PNG: the IHDR fields
    rng = np.random.default_rng(77)
    for _ in range(1500):
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 3))):
            b[int(rng.integers(start, end))] = int(rng.integers(256))
        if png:  # a valid CRC, so the fields themselves are judged
            b[29:33] = struct.pack(">I", zlib.crc32(b[12:29]))
        try:
            out = decode(bytes(b), max_pixels=1 << 20)
        except ImageError:
            continue
        assert out.shape[:2] == probe(bytes(b), max_pixels=1 << 20)[1:] and out.dtype == np.uint8


# ---------------------------------------------------------------------------------------------------
# Memory: failed decodes leak nothing


def corrupt_inputs() -> list[bytes]:
    rng = np.random.default_rng(99)
    out = [BASE[:n] for n in (200, 400, 600, len(BASE) - 2)] + [PROG[:n] for n in (300, 600, len(PROG) - 2)]
    out += [PNG_RGB[:n] for n in (40, 200, len(PNG_RGB) - 5)]
    # PNG with valid CRCs around broken deflate data: fails inside Pillow
    raw = zlib.compress(bytes(31 * 30))
    out.append(ihdr_png(30, 30, idat=raw[:2] + bytes(len(raw) - 2)))
    # JPEG flips that libjpeg-turbo rejects mid-decode (after its output array was allocated)
    while len(out) < 40:
        b = bytearray(PROG)
        b[int(rng.integers(700, len(b) - 2))] ^= 0x10
        try:
            decode(bytes(b))
        except CorruptImage as e:
            if e.reason == "decode_failed":
                out.append(bytes(b))
    out += [scan_bomb(MAX_SCANS), patch_sof(BASE, h=65535, w=65535), b"GIF89a" + bytes(50)]
    return out


def test_ten_thousand_corrupt_decodes_do_not_grow_rss():
    inputs = corrupt_inputs()
    proc = psutil.Process()

    def run(n: int) -> None:
        for i in range(n):
            try:
                decode(inputs[i % len(inputs)])
            except ImageError:
                pass
            else:
                raise AssertionError("a corrupt input decoded")

    run(1000)  # warm-up: allocator pools, caches, lazy imports
    gc.collect()
    before = proc.memory_info().rss
    run(10_000)
    gc.collect()
    grown = (proc.memory_info().rss - before) / 2**20
    assert grown < 10, f"RSS grew by {grown:.1f} MB over 10,000 corrupt decodes"
