"""Crop-region JPEG decode (decode_ex(..., crop_for=spec)): the decoded pixels are the full decode's, bit for
bit, and preprocess reads nothing outside them, on the shipped photos, awkward sizes, every EXIF orientation,
every DCT scale, CMYK, grey, progressive and 4:2:2/4:4:4 files. The undefined pixels are poisoned (0 and 255)
so that a read outside the decoded region changes the output."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from aurora_core import decode as dec
from aurora_core.decode import decode_ex, probe
from aurora_core.errors import CorruptImage
from aurora_core.ops.preprocess import (
    PreprocessSpec,
    fast_min_size,
    load,
    preprocess,
    preprocess_ref,
    source_rect,
)
from aurora_core.samples import sample_bytes

pytestmark = pytest.mark.skipif(dec._region_decoder() is None, reason="no libjpeg-turbo for region decode")

SPEC = PreprocessSpec()
SMALL = PreprocessSpec(resize=24, crop=20)
PHOTOS = ["0.3mp", "rocket_0.3mp", "retina_1.6mp", "2.5mp", "10mp"]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rocket(h: int, w: int) -> np.ndarray:
    src = np.asarray(Image.open(io.BytesIO(sample_bytes("rocket_0.3mp"))).convert("RGB"))
    return np.ascontiguousarray(np.tile(src, (ceil_div(h, src.shape[0]), ceil_div(w, src.shape[1]), 1))[:h, :w])


def jpeg(arr: np.ndarray, orientation: int | None = None, mode: str | None = None, **kw) -> bytes:
    kw.setdefault("quality", 90)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    b = io.BytesIO()
    Image.fromarray(arr, mode).save(b, "JPEG", **kw)
    return b.getvalue()


def poisoned(value: int):
    return lambda shape, dtype: np.full(shape, value, dtype)


def check(data: bytes, spec: PreprocessSpec, s: int, monkeypatch) -> None:
    """Region decode at scale 1/s: same pixels inside `valid`, same preprocess output whatever lies outside."""
    info = probe(data)
    min_size = None if s == 1 else (ceil_div(info.height, s), ceil_div(info.width, s))
    full = decode_ex(data, min_size=min_size)
    want = preprocess(full.image, spec, orig_size=full.orig_size, scale=full.scale)
    for value in (0, 255):
        monkeypatch.setattr(dec, "_alloc", poisoned(value))
        r = decode_ex(data, min_size=min_size, crop_for=spec)
        assert (r.orig_size, r.scale, r.image.shape) == (full.orig_size, full.scale, full.image.shape)
        t, b, left, right = r.valid
        assert r.valid == source_rect(r.orig_size, r.scale, spec)
        np.testing.assert_array_equal(r.image[t:b, left:right], full.image[t:b, left:right])
        got = preprocess(r.image, spec, orig_size=r.orig_size, scale=r.scale)
        assert torch.equal(got, want), (value, (got - want).abs().max())
        got_ref = preprocess_ref(r.image, spec, orig_size=r.orig_size, scale=r.scale)
        want_ref = preprocess_ref(full.image, spec, orig_size=full.orig_size, scale=full.scale)
        assert torch.equal(got_ref, want_ref)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("s", [1, 2, 8])
def test_shipped_photos_match_the_full_decode(name, s, monkeypatch):
    check(sample_bytes(name), SPEC, s, monkeypatch)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("s", [1, 2, 4])
def test_every_orientation_crops_the_right_axis(orientation, s, monkeypatch):
    data = jpeg(rocket(300, 520), orientation)  # 3:2-ish: rotated images crop the other axis
    r = decode_ex(data, crop_for=SMALL)
    t, b, left, right = r.valid
    rows, cols = (b - t) / r.image.shape[0], (right - left) / r.image.shape[1]
    assert (rows < 0.7 < cols) if orientation >= 5 else (cols < 0.7 < rows)  # portrait: the crop cuts rows
    check(data, SMALL, s, monkeypatch)


@pytest.mark.parametrize("h0, w0", [(1, 1), (7, 9), (17, 33), (3, 1001), (250, 13), (129, 127), (16, 4000)])
@pytest.mark.parametrize("orientation", [1, 6])
def test_awkward_sizes(h0, w0, orientation, monkeypatch):
    data = jpeg(rocket(h0, w0), orientation)
    for s in (1, 2, 8):
        check(data, SMALL, s, monkeypatch)


@pytest.mark.parametrize("kind", ["cmyk", "grey", "progressive", "444", "422", "restarts"])
def test_jpeg_variants(kind, monkeypatch):
    img = rocket(180, 330)
    data = {"cmyk": lambda: jpeg(img[..., [0, 1, 2, 1]].copy(), mode="CMYK"),
            "grey": lambda: jpeg(img[..., 0].copy()),
            "progressive": lambda: jpeg(img, progressive=True),
            "444": lambda: jpeg(img, subsampling=0),
            "422": lambda: jpeg(img, subsampling=1),
            "restarts": lambda: jpeg(img, restart_marker_blocks=3)}[kind]()
    for s in (1, 2):
        check(data, SMALL, s, monkeypatch)


@pytest.mark.parametrize("name", ["retina_1.6mp", "10mp"])
def test_exact_load_within_one_level_of_preprocess_ref(name):
    data = sample_bytes(name)
    got = load(data, SPEC, fast=False)
    want = preprocess_ref(dec.decode(data), SPEC)
    std = torch.tensor(SPEC.std)[:, None, None]
    assert ((got - want) * std * 255).abs().max() <= 1.0


def test_region_is_smaller_than_the_image():
    r = decode_ex(sample_bytes("10mp"), crop_for=SPEC)
    t, b, left, right = r.valid
    assert (b - t) * (right - left) < 0.6 * r.image.shape[0] * r.image.shape[1]


@pytest.mark.parametrize("cut", [0.5, 0.97, 0.999])
def test_corruption_below_the_region_is_still_an_error(cut):
    """Rows below the crop are entropy-decoded, not cut off: a truncated file fails as in a full decode."""
    data = sample_bytes("2.5mp")
    with pytest.raises(CorruptImage) as e:
        decode_ex(data[:int(len(data) * cut)], crop_for=SPEC)
    assert e.value.reason == "decode_failed"


def test_crop_for_must_be_a_spec():
    with pytest.raises(TypeError, match="crop_for must be None or a PreprocessSpec"):
        decode_ex(sample_bytes("0.3mp"), crop_for=(224, 224))


def test_png_and_missing_library_decode_whole(monkeypatch):
    png = io.BytesIO()
    Image.fromarray(rocket(40, 60)).save(png, "PNG")
    assert decode_ex(png.getvalue(), crop_for=SMALL).valid is None
    monkeypatch.setattr(dec, "_REGION", False)
    data = sample_bytes("0.3mp")
    r = decode_ex(data, crop_for=SPEC)
    assert r.valid is None
    np.testing.assert_array_equal(r.image, dec.decode(data))


def test_fast_gap_picks_the_dct_scale():
    data = sample_bytes("10mp")  # 3872x2592: resized 382x256
    orig = (2592, 3872)
    assert fast_min_size(orig, SPEC) == (1024, 1528)
    assert [decode_ex(data, min_size=fast_min_size(orig, SPEC, g)).scale for g in (4, 2, 1)] == [2, 4, 8]
    for bad in (0.5, 0, "2", True, 100):
        with pytest.raises(ValueError, match="fast_min_size: expected gap"):
            fast_min_size(orig, SPEC, bad)
    # load() with each gap decodes at that scale and maps it onto the exact geometry
    d = decode_ex(data, min_size=fast_min_size(orig, SPEC, 1), crop_for=SPEC)
    assert torch.equal(load(data, SPEC, fast_gap=1), preprocess(d.image, SPEC, orig_size=d.orig_size, scale=d.scale))


def test_mutated_files_raise_only_typed_errors():
    from aurora_core.errors import ImageError

    base = jpeg(rocket(120, 200))
    rng = np.random.default_rng(20)
    for _ in range(300):
        b = bytearray(base)
        for pos in rng.integers(2, len(b), size=int(rng.integers(1, 4))):
            b[pos] = int(rng.integers(0, 256))
        try:
            r = decode_ex(bytes(b), crop_for=SMALL)
        except ImageError:
            continue
        preprocess(r.image, SMALL, orig_size=r.orig_size, scale=r.scale)


def test_pipeline_rejects_a_bad_fast_gap_before_loading_the_model():
    from aurora_core.pipeline import Pipeline

    with pytest.raises(ValueError, match="fast_min_size: expected gap"):
        Pipeline(model="no-such-model", device="cpu", fast_gap=0.5)


@pytest.mark.parametrize("kw", [{"fast_decode": False}, {"fast_gap": 1}, {}])
def test_pipeline_decodes_as_load_does(kw, monkeypatch):
    """The Pipeline's decode is load()'s: crop-region, at the DCT scale its fast_gap picks (exact when
    fast_decode=False). Undefined pixels are poisoned, so a pipeline reading them would differ."""
    from aurora_core.batching import BatchingConfig
    from aurora_core.pipeline import Pipeline
    from tests.conftest import Tiny

    monkeypatch.setattr(dec, "_alloc", poisoned(255))
    spec = PreprocessSpec(resize=64, crop=56)
    data = sample_bytes("2.5mp")  # 1920x1280: fast_gap 4 -> 1/4, fast_gap 1 -> 1/8
    model = Tiny()
    load_kw = {"fast": kw.get("fast_decode", True), "fast_gap": kw.get("fast_gap", 4)}
    with torch.no_grad():
        want = model(load(data, spec, **load_kw)[None]).softmax(1)[0]
    # the settings give different inputs, so the comparison below tells them apart
    assert not torch.equal(load(data, spec, fast=False), load(data, spec, fast_gap=1))
    assert not torch.equal(load(data, spec), load(data, spec, fast_gap=1))
    with Pipeline(model, spec, BatchingConfig(max_batch_size=1), device="cpu", jit_freeze=False, **kw) as p:
        pred = p.infer(data, timeout=20)
    got = dict(pred.top_k)
    for cls, prob in got.items():
        assert abs(prob - want[cls].item()) < 1e-5


@pytest.mark.parametrize("orientation", [1, 6])
def test_triton_kernel_reads_only_the_region(orientation, monkeypatch):
    """The Triton kernel (interpreted on the CPU, on the GPU when present) computes its windows in float32:
    the region's one-pixel margin covers that. Poisoned outside, its output equals the full decode's."""
    from tests.conftest import has_cuda

    kernels = pytest.importorskip("aurora_core.kernels.preprocess")
    spec = PreprocessSpec(resize=12, crop=10)
    data = jpeg(rocket(70, 130), orientation)
    device = "cuda" if has_cuda else "cpu"
    for s in (1, 2):
        min_size = None if s == 1 else (ceil_div(70, s), ceil_div(130, s))
        full = decode_ex(data, min_size=min_size)
        want = kernels.preprocess_batch_triton([full.image], spec, orig_sizes=[full.orig_size], scales=[full.scale],
                                               device=device)
        for value in (0, 255):
            monkeypatch.setattr(dec, "_alloc", poisoned(value))
            r = decode_ex(data, min_size=min_size, crop_for=spec)
            assert r.valid is not None and r.scale == full.scale
            got = kernels.preprocess_batch_triton([r.image], spec, orig_sizes=[r.orig_size], scales=[r.scale],
                                                  device=device)
            assert torch.equal(got, want)


def test_serve_passes_fast_gap_and_exact_to_the_pipeline(monkeypatch, capsys):
    import argparse

    from aurora_core import pipeline as pipeline_mod
    from aurora_core.server import EXIT_STARTUP, add_arguments, run

    seen = {}

    class Stop(Exception):
        pass

    def fake_pipeline(*a, **kw):  # records what serve asks for, then stops the start-up
        seen.update(kw)
        raise Stop("stop here")

    monkeypatch.setattr(pipeline_mod, "Pipeline", fake_pipeline)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv, want in ((["--exact"], (False, 4.0)), (["--fast-gap", "2"], (True, 2.0)), ([], (True, 4.0))):
        seen.clear()
        assert run(parser.parse_args([*argv, "--port", "0", "--log-level", "error"])) == EXIT_STARTUP
        assert (seen["fast_decode"], seen["fast_gap"]) == want
    assert "cannot start: stop here" in capsys.readouterr().err


def test_an_unusable_library_is_refused_once_and_jpegs_decode_whole(tmp_path):
    """A path that is not a libjpeg-turbo (AURORA_LIBJPEG) or one that decodes wrongly (the self-test)
    disables region decode with one warning; it never turns every JPEG into a 'corrupt' error."""
    import os
    import subprocess
    import sys

    bogus = tmp_path / "libjpeg.so"
    bogus.write_bytes(b"not a library")
    code = ("from aurora_core import decode as d; from aurora_core.ops.preprocess import PreprocessSpec;"
            "from aurora_core.samples import sample_bytes;"
            "assert d._region_decoder() is None;"
            "assert d.decode_ex(sample_bytes('0.3mp'), crop_for=PreprocessSpec()).valid is None")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, AURORA_LIBJPEG=str(bogus)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cannot use" in r.stderr and "JPEGs are decoded whole" in r.stderr

    class Wrong:  # loads, but writes nothing: the self-test sees pixels differ
        @staticmethod
        def jpeg_decode_region(data, out, **kw):
            return 0, 0, out.shape[1], ""

    assert "pixels differ" in dec._region_self_test(Wrong)
    assert dec._region_self_test(dec._region_decoder()) == ""
