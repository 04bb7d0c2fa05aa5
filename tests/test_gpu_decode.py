"""GPU decode: routing, limits, typed errors and fallback run on the CPU; nvJPEG itself needs CUDA.

The CPU tests replace torchvision's nvJPEG call with a PIL decoder that, like nvJPEG, ignores EXIF:
they test the routing, orientation and fallback logic around the decoder, not nvJPEG.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from aurora_core import decode as cpu_decode
from aurora_core.errors import CorruptImage, ImageTooLarge, UnsupportedFormat
from aurora_core.gpu_decode import GpuDecoder, nvjpeg_available, route
from tests.conftest import requires_cuda


def _photo(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 4, xx * 3, (yy + xx) * 2], -1) + rng.integers(0, 20, (h, w, 3))
    return (base % 256).astype(np.uint8)


def _jpeg(arr=None, *, mode="RGB", orientation=None, **save):
    im = Image.fromarray(_photo() if arr is None else arr)
    if mode != "RGB":
        im = im.convert(mode)
    kw = dict(format="JPEG", quality=92, **save)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    b = io.BytesIO()
    im.save(b, **kw)
    return b.getvalue()


def _png():
    b = io.BytesIO()
    Image.fromarray(_photo()).save(b, format="PNG")
    return b.getvalue()


def _fake_nvjpeg(fail_on=()):
    """PIL decode to [3, H, W] (no EXIF, like nvJPEG); raises for inputs whose bytes are in fail_on."""

    def run(tensors, device):
        out = []
        for t in tensors:
            data = t.numpy().tobytes()
            if data in fail_on:
                raise RuntimeError("nvjpeg: unsupported (fake)")
            arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
        return out

    return run


def test_route_sends_plain_jpegs_to_gpu_and_the_rest_to_cpu():
    assert route(_jpeg())[0] == "gpu"
    assert route(_jpeg(progressive=True))[0] == "gpu"
    assert route(_jpeg(mode="L"))[0] == "gpu"
    assert route(_jpeg(mode="CMYK"))[0] == "cpu"
    assert route(_png())[0] == "cpu"
    data = _jpeg()
    assert route(data[: len(data) // 2])[0] == "cpu"  # no EOI: the strict CPU decoder judges it
    assert route(data + b"\0" * 100)[0] == "gpu"  # padding after EOI is fine


def test_route_applies_decode_limits_and_typed_errors():
    with pytest.raises(ImageTooLarge) as e:
        route(_jpeg(), max_pixels=100)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(ImageTooLarge):
        route(_jpeg(), max_bytes=10)
    with pytest.raises(UnsupportedFormat):
        route(b"GIF89a" + b"\0" * 64)
    with pytest.raises(CorruptImage):
        route(b"\xff\xd8\xff" + b"\0" * 10)


def test_batch_matches_cpu_decode_with_orientation_and_fallbacks():
    datas = [_jpeg(), _jpeg(orientation=6), _jpeg(mode="CMYK"), _png(), _jpeg(orientation=3), _jpeg(mode="L")]
    dec = GpuDecoder("cpu", nvjpeg=_fake_nvjpeg())
    res = dec.decode_batch(datas)
    assert [r.backend for r in res] == ["gpu", "gpu", "cpu", "cpu", "gpu", "gpu"]
    for data, r in zip(datas, res, strict=True):
        ref = cpu_decode.decode_ex(data)
        assert r.orig_size == tuple(ref.orig_size) and r.scale == 1
        got = r.image.numpy()
        assert got.shape == ref.image.shape
        # Same libjpeg underneath; a rotation bug would show as a large error.
        assert np.abs(got.astype(int) - ref.image.astype(int)).mean() < 1.0
    assert res[1].image.shape[:2] == (64, 48)  # orientation 6 swaps the sides
    assert dec.stats == {"gpu": 4, "cpu": 2, "gpu_rejected": 0}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_cpu_decode(orientation):
    data = _jpeg(orientation=orientation)
    got = GpuDecoder("cpu", nvjpeg=_fake_nvjpeg()).decode_batch([data])[0].image.numpy()
    ref = cpu_decode.decode(data)
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0


def test_an_image_nvjpeg_rejects_falls_back_without_failing_the_batch():
    bad = _jpeg(_photo(seed=3))
    datas = [_jpeg(), bad, _jpeg(orientation=8)]
    dec = GpuDecoder("cpu", nvjpeg=_fake_nvjpeg(fail_on={bad}))
    res = dec.decode_batch(datas)
    assert [r.backend for r in res] == ["gpu", "cpu", "gpu"]
    np.testing.assert_array_equal(res[1].image.numpy(), cpu_decode.decode(bad))
    assert dec.stats["gpu_rejected"] == 1


def test_corrupt_data_nvjpeg_rejects_raises_the_cpu_decoders_error():
    good = _jpeg()
    # Corrupt the entropy data but keep the header and the EOI: routed to the GPU, rejected there.
    sos = good.index(b"\xff\xda")
    corrupt = good[: sos + 20] + bytes([0xFF, 0xD0]) * 50 + good[-2:]
    assert route(corrupt)[0] == "gpu"
    with pytest.raises(CorruptImage):
        GpuDecoder("cpu", nvjpeg=_fake_nvjpeg(fail_on={corrupt})).decode_batch([corrupt])


def test_return_exceptions_fails_each_bad_input_alone():
    small = _jpeg(_photo(10, 10))
    sos = small.index(b"\xff\xda")
    corrupt = small[: sos + 20] + bytes([0xFF, 0xD0]) * 50 + small[-2:]  # passes routing, fails decoding
    datas = [_jpeg(), small[:300], corrupt, small, _png()]  # 48x64 images are over max_pixels
    res = GpuDecoder("cpu", nvjpeg=_fake_nvjpeg(fail_on={corrupt}), max_pixels=1000).decode_batch(
        datas, return_exceptions=True)
    assert [type(r).__name__ for r in res] == ["ImageTooLarge", "CorruptImage", "CorruptImage", "GpuDecoded",
                                               "ImageTooLarge"]
    assert res[1].reason == "truncated" and res[3].backend == "gpu"


def test_a_sticky_device_error_in_nvjpeg_is_not_an_image_to_fall_back_on():
    from aurora_core.runner import InjectedStickyError

    def broken(tensors, device):
        raise InjectedStickyError("CUDA error: an illegal memory access was encountered (injected)")

    for kw in ({}, {"return_exceptions": True}):
        with pytest.raises(InjectedStickyError):
            GpuDecoder("cpu", nvjpeg=broken).decode_batch([_jpeg(), _jpeg(_photo(seed=4))], **kw)


def test_wrong_size_from_the_gpu_decoder_is_not_trusted():
    def lying(tensors, device):
        return [torch.zeros(3, 7, 7, dtype=torch.uint8) for _ in tensors]

    data = _jpeg()
    res = GpuDecoder("cpu", nvjpeg=lying).decode_batch([data])
    assert res[0].backend == "cpu"
    np.testing.assert_array_equal(res[0].image.numpy(), cpu_decode.decode(data))


def test_limits_are_checked_before_any_decoding():
    calls = []

    def spy(tensors, device):
        calls.append(len(tensors))
        return _fake_nvjpeg()(tensors, device)

    with pytest.raises(ImageTooLarge):
        GpuDecoder("cpu", nvjpeg=spy, max_pixels=1000).decode_batch([_jpeg(_photo(10, 10)), _jpeg()])
    assert calls == []


def test_cpu_device_without_a_decoder_is_refused():
    with pytest.raises(ValueError, match="CUDA"):
        GpuDecoder("cpu")


@requires_cuda
def test_cuda_nvjpeg_matches_cpu_decode_on_sample_photos():
    from aurora_core.samples import SAMPLES, sample_bytes

    assert nvjpeg_available("cuda")
    datas = [sample_bytes(k) for k in SAMPLES] + [_jpeg(orientation=6), _jpeg(progressive=True)]
    dec = GpuDecoder("cuda")
    side = torch.cuda.Stream()
    res = dec.decode_batch(datas, consumer_stream=side)
    side.synchronize()
    assert dec.stats["gpu"] >= len(SAMPLES) - 1
    for data, r in zip(datas, res, strict=True):
        ref = cpu_decode.decode(data)
        got = r.image.cpu().numpy()
        assert r.image.is_cuda and got.shape == ref.shape
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two on edges;
        # a swapped channel or a wrong rotation costs tens of levels.
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3.0, data[:4]


# ---- in the Pipeline (gpu_decode=), with the PIL stand-in for nvJPEG ----------------------------

def _pipe(dec=None, **kw):
    from aurora_core.batching import BatchingConfig
    from aurora_core.ops.preprocess import PreprocessSpec
    from aurora_core.pipeline import Pipeline
    from tests.conftest import Tiny

    cfg = BatchingConfig(max_batch_size=8, max_queue_delay_us=200_000)  # one batch for a burst of 6
    return Pipeline(Tiny(), PreprocessSpec(resize=24, crop=16), cfg, device="cpu", num_workers=2, top_k=3,
                    fast_decode=False, gpu_decode=dec or "off", **kw)


def test_pipeline_decodes_each_batch_with_one_gpu_decoder_call(monkeypatch):
    import aurora_core.gpu_decode as gd

    parsed = []
    real_route = gd.route
    monkeypatch.setattr(gd, "route", lambda data, *a: (parsed.append(data), real_route(data, *a))[1])
    calls = []
    fake = _fake_nvjpeg()
    dec = GpuDecoder("cpu", nvjpeg=lambda ts, d: (calls.append(len(ts)), fake(ts, d))[1])
    truncated = _jpeg()[:300]
    datas = [_jpeg(seed_arr) for seed_arr in (_photo(40, 60, 1), _photo(50, 30, 2))] + [
        _jpeg(orientation=6), _png(), truncated, _jpeg(mode="L")]
    with _pipe(dec) as pipe, _pipe() as ref:
        futs = [pipe.submit(d) for d in datas]
        want = [ref.submit(d) for d in datas]
        for f, w in zip(futs, want, strict=True):
            if w.exception(20) is not None:
                assert type(f.exception(20)) is type(w.exception()) and f.exception().reason == w.exception().reason
                continue
            got, exp = f.result(20), w.result()
            assert [i for i, _ in got.top_k] == [i for i, _ in exp.top_k]
            assert np.allclose([p for _, p in got.top_k], [p for _, p in exp.top_k], atol=0.02)
        st = pipe.stats()
    # One batch: the four routable JPEGs in one nvJPEG call; the PNG and the truncated JPEG (which fails its
    # header check alone) on the CPU pool from admission, as without gpu_decode.
    assert calls == [4]
    assert dec.stats == {"gpu": 4, "cpu": 0, "gpu_rejected": 0}
    assert sorted(map(datas.index, parsed)) == [0, 1, 2, 3, 4, 5]  # each header parsed once, in all
    assert st["decoded"] == 6 and st["completed"] == 5 and st["errors"] == {"truncated": 1}


def test_pipeline_gpu_decode_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="gpu_decode='on' needs a CUDA device"):
        _pipe("on")
    with pytest.raises(ValueError, match="gpu_decode must be"):
        _pipe("sometimes")
    with _pipe("auto") as pipe:  # no CUDA here: "auto" decodes on the CPU pool
        assert not pipe.gpu_decode
        assert pipe.infer(_jpeg(), timeout=20).timings.status == "ok"


def test_sticky_error_in_the_gpu_decoder_fails_over_to_the_cpu():
    """A sticky CUDA error inside nvJPEG is the device failing, not a bad image: the pipeline falls back to
    the CPU, which decodes and serves that batch and every later one."""
    from aurora_core.runner import InjectedStickyError

    bad = _jpeg(_photo(30, 30, 9))
    fake = _fake_nvjpeg()

    def nvjpeg(ts, d):
        if any(t.numpy().tobytes() == bad for t in ts):
            raise InjectedStickyError("CUDA error: an illegal memory access was encountered (injected)")
        return fake(ts, d)

    dec = GpuDecoder("cpu", nvjpeg=nvjpeg)
    with _pipe(dec, cpu_fallback=True) as pipe:
        assert pipe.infer(_jpeg(), timeout=20).timings.status == "ok"
        futs = [pipe.submit(d) for d in (bad, _jpeg(_photo(20, 40, 3)))]
        assert [f.result(20).timings.status for f in futs] == ["ok", "ok"]
        assert pipe.ready and not pipe.gpu_decode
        assert pipe.infer(bad, timeout=20).timings.status == "ok"  # the CPU pool decodes it now
        assert dec.stats["gpu"] == 1


def test_sticky_error_in_the_gpu_decoder_without_fallback_fails_the_batch_and_shuts_down():
    from aurora_core.runner import InjectedStickyError

    def nvjpeg(ts, d):
        raise InjectedStickyError("CUDA error: an illegal memory access was encountered (injected)")

    with _pipe(GpuDecoder("cpu", nvjpeg=nvjpeg)) as pipe:
        futs = [pipe.submit(d) for d in (_jpeg(), _png())]
        assert [f.exception(20).reason for f in futs] == ["device_lost", "device_lost"]
        assert not pipe.ready
        assert pipe.submit(_jpeg()).exception(20).reason == "device_lost"


def test_a_gpu_decode_failure_that_is_not_one_image_decodes_the_batch_on_the_cpu():
    def nvjpeg(ts, d):
        raise AssertionError("a bug in the decoder, not in any image")

    dec = GpuDecoder("cpu", nvjpeg=nvjpeg)
    dec._decode = lambda *a: (_ for _ in ()).throw(MemoryError("pinned memory exhausted"))
    with _pipe(dec) as pipe:
        threads = []
        real = pipe._decode_safe
        pipe._decode_safe = lambda r, *a: (threads.append(threading.current_thread().name), real(r, *a))[1]
        futs = [pipe.submit(_jpeg(_photo(40, 60, i))) for i in range(4)]
        assert all(f.result(20).timings.status == "ok" for f in futs)
        assert pipe.ready and pipe.gpu_decode
    # The batch's CPU decodes run on the pool, in parallel, not one by one on the batch worker.
    assert len(threads) == 4 and all(t.startswith("aurora-decode") for t in threads), threads


@requires_cuda
def test_cuda_pipeline_with_gpu_decode_matches_cpu_decoding():
    """The real path: nvJPEG into the Triton kernel on the runner's staging stream. Needs triton too."""
    from aurora_core.batching import BatchingConfig
    from aurora_core.ops.preprocess import PreprocessSpec
    from aurora_core.pipeline import Pipeline
    from aurora_core.samples import SAMPLES, sample_bytes
    from tests.conftest import Tiny

    datas = [sample_bytes(k) for k in SAMPLES] + [_jpeg(orientation=6), _jpeg()[:300]]
    spec, cfg = PreprocessSpec(resize=64, crop=56), BatchingConfig(max_batch_size=16, max_queue_delay_us=100_000)
    kw = dict(device="cuda", top_k=3, fast_decode=False, cuda_graphs=False, device_preprocess="on")
    with Pipeline(Tiny(), spec, cfg, gpu_decode="on", **kw) as pipe, Pipeline(Tiny(), spec, cfg, **kw) as ref:
        futs, want = [pipe.submit(d) for d in datas], [ref.submit(d) for d in datas]
        for f, w in zip(futs, want, strict=True):
            if w.exception(60) is not None:
                assert f.exception(60).reason == w.exception().reason
                continue
            got, exp = f.result(60), w.result()
            assert np.allclose([p for _, p in got.top_k], [p for _, p in exp.top_k], atol=0.03)
        assert pipe._gpu_decoder.stats["gpu"] >= len(SAMPLES) - 1


def test_a_late_sticky_gpu_decode_error_after_the_fallback_does_not_shut_down():
    """Worker A falls back to the CPU on a device loss; worker B, still in nvJPEG with the decoder it read
    before, then gets its own sticky error. That is the same loss, already handled: the pipeline stays up
    on the CPU (before, B passed the new CPU runner as the lost one, and the pipeline shut down)."""
    from aurora_core.errors import DeviceLost
    from aurora_core.runner import InjectedStickyError

    with _pipe(GpuDecoder("cpu", nvjpeg=_fake_nvjpeg()), cpu_fallback=True) as pipe:
        lost = pipe.runner  # what B read before decoding
        pipe._on_device_lost(DeviceLost("device lost (test)"), lost)  # A's fallback
        assert pipe.ready and pipe.runner is not lost and not pipe.gpu_decode
        pipe._gpu_decode_failed(InjectedStickyError("CUDA error: an illegal memory access (injected)"), lost)
        assert pipe.ready and pipe.infer(_jpeg(), timeout=20).timings.status == "ok"
