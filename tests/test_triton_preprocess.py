"""The Triton preprocessing kernel against the torchvision/PIL eval transform, within one uint8 level.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest) with a small spec so the interpreter stays
fast; the CUDA tests use the real 256/224 spec. Every test runs once per implementation (banded and
dense, selected through AURORA_TRITON_IMPL as a user would), so both stay held to the same bounds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import has_cuda, requires_cuda

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _import_kernel():
    try:
        return importlib.import_module("aurora_core.kernels.preprocess")
    except ImportError:
        # Source checkout without `pip install -e .`: map kernels/ to aurora_core.kernels as setup does.
        import aurora_core

        root = os.path.dirname(os.path.dirname(os.path.abspath(aurora_core.__file__)))
        for name, path in (
            ("aurora_core.kernels", os.path.join(root, "kernels", "__init__.py")),
            ("aurora_core.kernels.preprocess", os.path.join(root, "kernels", "preprocess.py")),
        ):
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        return sys.modules["aurora_core.kernels.preprocess"]


K = _import_kernel()
pytestmark = pytest.mark.skipif(
    not has_cuda and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or TRITON_INTERPRET=1"
)


@pytest.fixture(autouse=True, params=["banded", "dense"])
def impl(request, monkeypatch):
    monkeypatch.setenv("AURORA_TRITON_IMPL", request.param)
    return request.param


class Spec:
    """Duck-typed PreprocessSpec so these tests do not depend on aurora_core.ops landing first."""

    def __init__(self, resize=16, crop=12, dtype=torch.float32):
        self.resize, self.crop, self.mean, self.std, self.dtype = resize, crop, MEAN, STD, dtype


def _spec(resize=16, crop=12, dtype=torch.float32):
    try:
        from aurora_core.ops.preprocess import PreprocessSpec

        return PreprocessSpec(resize=resize, crop=crop, mean=MEAN, std=STD, dtype=dtype)
    except Exception:
        return Spec(resize, crop, dtype)


def _local_oracle(img, spec, orig_size=None, scale=1):
    """uint8 [crop, crop, 3]: torchvision's Resize+CenterCrop on PIL; PIL's box for scaled extents."""
    import torchvision.transforms as T

    pil = Image.fromarray(img)
    if scale == 1 and orig_size is None:
        return np.asarray(T.CenterCrop(spec.crop)(T.Resize(spec.resize)(pil)))
    h0, w0 = orig_size
    rh, rw = K.resized_size(h0, w0, spec.resize)
    pil = pil.resize((rw, rh), Image.BILINEAR, box=(0, 0, w0 / scale, h0 / scale))
    return np.asarray(T.CenterCrop(spec.crop)(pil))


def _oracle_u8(img, spec, orig_size=None, scale=1):
    """Reference as unnormalized float [crop, crop, 3] (0..255): preprocess_ref when it exists."""
    try:
        from aurora_core.ops.preprocess import preprocess_ref
    except ImportError:
        return _local_oracle(img, spec, orig_size, scale).astype(np.float64)
    kw = {} if orig_size is None else {"orig_size": orig_size, "scale": scale}
    ref = preprocess_ref(img, spec, **kw).double().numpy().transpose(1, 2, 0)
    return ref * (np.array(spec.std) * 255) + np.array(spec.mean) * 255


def _unnormalize(t, spec):
    return (
        t.detach().double().cpu().numpy().transpose(1, 2, 0) * (np.array(spec.std) * 255)
        + np.array(spec.mean) * 255
    )


def _rand_images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        # Smooth gradient plus noise: like a photo, with edges for the filter to get wrong.
        yy, xx = np.mgrid[0:h, 0:w]
        base = (yy * 7 + xx * 3)[..., None] + np.array([0, 80, 160])
        out.append(((base + rng.integers(0, 60, (h, w, 3))) % 256).astype(np.uint8))
    return out


def _bf16_half_ulp_levels(t, spec):
    """[crop, crop, 3] per element of a bf16 output [3, crop, crop]: half a bf16 ulp of its value in
    uint8 levels, the most the round-to-nearest cast can move it. bf16 keeps 8 significant bits, so for
    |x| in [2^e, 2^(e+1)) that is 2^(e-8); at |x| >= 2 (levels below ~7 or above ~240) it is
    2^-7 * std * 255 = 0.456 level (red). A value that rounded up into a binade came from a smaller one."""
    x = t.detach().float().cpu().abs().clamp_min(2.0**-126)
    half = torch.exp2(torch.floor(torch.log2(x)) - 8).double().numpy().transpose(1, 2, 0)
    return half * (np.array(spec.std) * 255)


def _check_bf16_batch(imgs, spec, out, out_fp32):
    """bf16 results against the float32 oracle: within one level plus the bf16 cast's own rounding, and
    bit for bit the float32 kernel result cast to nearest (so the cast is the only bf16 error)."""
    spec32 = _spec(spec.resize, spec.crop, torch.float32)
    torch.testing.assert_close(out.float(), out_fp32.to(torch.bfloat16).float(), rtol=0, atol=0)
    for i, img in enumerate(imgs):
        # The oracle in float32: preprocess_ref with a bf16 spec rounds to bf16 as well, and two
        # independent bf16 roundings of values one level apart differ by up to 1 + 2 * 0.456 levels.
        ref = _oracle_u8(img, spec32)
        err = np.abs(_unnormalize(out[i].float(), spec) - ref)
        excess = err - (1.0 + _bf16_half_ulp_levels(out[i], spec))
        assert excess.max() <= 1e-3, f"{img.shape}: {err.max()} levels, {excess.max()} over the bound"
        err32 = np.abs(_unnormalize(out_fp32[i], spec32) - ref)
        assert err32.max() <= 1.0 + 1e-3, f"{img.shape}: float32 {err32.max()}"


def _device():
    return "cuda" if has_cuda else "cpu"


AWKWARD = [(1, 1), (3, 5), (1, 40), (40, 1), (17, 23), (64, 48), (100, 37), (7, 9), (12, 12), (33, 200)]


def test_mixed_awkward_batch_within_one_level():
    spec = _spec()
    imgs = _rand_images(AWKWARD)
    out = K.preprocess_batch_triton(imgs, spec, device=_device())
    assert out.shape == (len(imgs), 3, 12, 12) and out.dtype == torch.float32
    for i, img in enumerate(imgs):
        got = _unnormalize(out[i], spec)
        ref = _oracle_u8(img, spec)
        err = np.abs(got - ref)
        assert err.max() <= 1.0 + 1e-3, f"{img.shape}: max error {err.max():.3f} levels"
        # Mostly exact: the only difference allowed is PIL's pass order/fixed-point rounding.
        assert (err > 0.5).mean() < 0.25, f"{img.shape}: {(err > 0.5).mean():.2%} pixels off by one"


def test_local_oracle_is_torchvision():
    # The oracle of the other tests must itself be the transform, or they prove nothing.
    spec = _spec()
    img = _rand_images([(30, 41)])[0]
    ref = _local_oracle(img, spec)
    assert ref.shape == (12, 12, 3)
    assert not np.array_equal(ref, _local_oracle(img[::-1].copy(), spec))


def test_upscaling_and_crop_larger_than_resize():
    # crop > resize: torchvision pads with zeros around the resized image.
    spec = _spec(resize=8, crop=12)
    imgs = _rand_images([(5, 3), (4, 4), (9, 2)], seed=3)
    out = K.preprocess_batch_triton(imgs, spec, device=_device())
    for i, img in enumerate(imgs):
        err = np.abs(_unnormalize(out[i], spec) - _local_oracle(img, spec))
        assert err.max() <= 1.0 + 1e-3, f"{img.shape}: {err.max()}"


@pytest.mark.parametrize("orig,scale", [((63, 50), 2), ((101, 77), 4), ((37, 130), 8), ((300, 41), 2)])
def test_scaled_extent(orig, scale):
    spec = _spec()
    h, w = math.ceil(orig[0] / scale), math.ceil(orig[1] / scale)
    img = _rand_images([(h, w)], seed=5)[0]
    out = K.preprocess_batch_triton([img], spec, orig_sizes=[orig], scales=[scale], device=_device())
    ref = _oracle_u8(img, spec, orig_size=orig, scale=scale)
    err = np.abs(_unnormalize(out[0], spec) - ref)
    assert err.max() <= 1.0 + 1e-3
    # Rounding the extent instead would shift the picture: the test must be able to see that.
    wrong = K.preprocess_batch_triton([img], spec, device=_device())
    assert np.abs(_unnormalize(wrong[0], spec) - ref).max() > 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes_are_the_fp32_result_cast(dtype):
    imgs = _rand_images([(20, 31), (9, 9)], seed=7)
    ref = K.preprocess_batch_triton(imgs, _spec(), device=_device())
    got = K.preprocess_batch_triton(imgs, _spec(dtype=dtype), device=_device())
    assert got.dtype == dtype
    # Bit for bit torch's round-to-nearest cast, bf16 included: the kernel rounds bf16 itself, since
    # Triton's interpreter truncates fp32 -> bf16 where the GPU rounds (up to 0.9 level apart).
    torch.testing.assert_close(got.float(), ref.to(dtype).float(), rtol=0, atol=0)


def test_writes_into_a_slot_of_a_bigger_batch_and_nothing_else():
    spec = _spec()
    imgs = _rand_images([(20, 31), (15, 15)], seed=9)
    big = torch.full((5, 3, 12, 12), float("nan"), device=_device())
    ret = K.preprocess_batch_triton(imgs, spec, out=big[2:4])
    assert ret.data_ptr() == big[2].data_ptr()
    assert torch.isnan(big[[0, 1, 4]]).all()
    assert not torch.isnan(big[2:4]).any()
    torch.testing.assert_close(big[2:4], K.preprocess_batch_triton(imgs, spec, device=_device()))


def test_chw_tensor_viewed_as_hwc_reads_without_copy():
    spec = _spec()
    img = _rand_images([(26, 19)], seed=11)[0]
    chw = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    flat, strides = K._layout(chw.permute(1, 2, 0))
    assert strides == (19, 1, 26 * 19) and flat.data_ptr() == chw.data_ptr()
    a = K.preprocess_batch_triton([img], spec, device=_device())
    b = K.preprocess_batch_triton([chw.permute(1, 2, 0).to(_device())], spec, device=_device())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kernel_reads_chw_planes_and_hwc_side_by_side():
    # The GPU-decode path hands the kernel torchvision's [3, H, W] planes: one buffer, mixed layouts.
    spec = _spec()
    a, b = _rand_images([(26, 19), (31, 44)], seed=23)
    chw = torch.from_numpy(b).permute(2, 0, 1).contiguous()
    packed = torch.cat([torch.from_numpy(a).reshape(-1), chw.reshape(-1)]).to(_device())
    shapes = [a.shape[:2], b.shape[:2]]
    strides = [(3 * 19, 3, 1), (44, 1, 31 * 44)]
    out = torch.empty((2, 3, 12, 12), device=_device())
    K.launch(packed, [0, a.nbytes], strides, shapes, K._geometry(shapes, spec, None, None), spec, out)
    torch.testing.assert_close(out, K.preprocess_batch_triton([a, b], spec, device=_device()), rtol=0, atol=0)


def test_geometry_matches_torchvision_rules():
    assert K.resized_size(480, 640, 256) == (256, 341)
    assert K.resized_size(640, 480, 256) == (341, 256)
    assert K.resized_size(1, 40, 16) == (16, 640)
    # CenterCrop uses Python's round (half to even) on (size - crop) / 2.
    assert K.crop_origin(257, 256, 224) == (16, 16)
    assert K.crop_origin(259, 256, 224) == (18, 16)
    assert K.crop_origin(8, 8, 12) == (-2, -2)


@pytest.mark.parametrize(
    "imgs,kw,exc,needle",
    [
        ([np.zeros((4, 4, 3), np.float32)], {}, ValueError, "uint8"),
        ([np.zeros((4, 4), np.uint8)], {}, ValueError, "[H, W, 3]"),
        ([np.zeros((4, 4, 4), np.uint8)], {}, ValueError, "[H, W, 3]"),
        ([np.zeros((0, 4, 3), np.uint8)], {}, ValueError, "[H, W, 3]"),
        ([], {}, ValueError, "at least one image"),
        (["not an image"], {}, TypeError, "str"),
        ([np.zeros((4, 4, 3), np.uint8)], {"orig_sizes": [(9, 9)], "scales": [2]}, ValueError, "ceil"),
        ([np.zeros((4, 4, 3), np.uint8)], {"orig_sizes": [(4, 4), (4, 4)]}, ValueError, "orig_sizes"),
    ],
)
def test_bad_arguments_name_the_op(imgs, kw, exc, needle):
    with pytest.raises(exc) as e:
        K.preprocess_batch_triton(imgs, _spec(), device=_device(), **kw)
    assert "preprocess_batch_triton" in str(e.value) and needle in str(e.value)


def test_out_of_wrong_shape_or_dtype_is_rejected():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="out must be"):
        K.preprocess_batch_triton([img], _spec(), out=torch.empty(1, 3, 11, 11, device=_device()))
    with pytest.raises(ValueError, match="out must be"):
        K.preprocess_batch_triton(
            [img], _spec(), out=torch.empty(1, 3, 12, 12, dtype=torch.float16, device=_device())
        )


@requires_cuda
def test_cuda_full_spec_photo_sizes_within_one_level():
    spec = _spec(resize=256, crop=224)
    imgs = _rand_images([(480, 640), (1280, 1920), (300, 200), (97, 1003)], seed=13)
    out = K.preprocess_batch_triton(imgs, spec, device="cuda")
    for i, img in enumerate(imgs):
        err = np.abs(_unnormalize(out[i], spec) - _oracle_u8(img, spec))
        assert err.max() <= 1.0 + 1e-3, f"{img.shape}: {err.max()}"


@requires_cuda
def test_cuda_inputs_on_device_match_host_inputs():
    spec = _spec(resize=256, crop=224, dtype=torch.float16)
    imgs = _rand_images([(480, 640), (333, 500)], seed=17)
    host = K.preprocess_batch_triton(imgs, spec)
    dev = K.preprocess_batch_triton([torch.from_numpy(i).cuda() for i in imgs], spec)
    torch.testing.assert_close(host, dev, rtol=0, atol=0)


@requires_cuda
def test_cuda_warmup_then_mixed_batch_in_a_slot():
    spec = _spec(resize=256, crop=224, dtype=torch.bfloat16)
    K.warmup(spec, "cuda")
    imgs = _rand_images([(480, 640), (2592, 3872), (224, 224), (1, 1)], seed=19)
    big = torch.full((6, 3, 224, 224), float("nan"), dtype=spec.dtype, device="cuda")
    K.preprocess_batch_triton(imgs, spec, out=big[1:5])
    assert torch.isnan(big[[0, 5]].float()).all() and not torch.isnan(big[1:5].float()).any()
    out32 = K.preprocess_batch_triton(imgs, _spec(256, 224, torch.float32), device="cuda")
    _check_bf16_batch(imgs, spec, big[1:5], out32)


def test_bf16_full_spec_in_a_slot_on_the_cpu():
    # The CUDA case above on the interpreter (its 10 MP image left out: too slow here). The H200 run
    # failed it at 1.79 levels for the 480x640 image: the old bound (1.4, against an oracle that was
    # itself rounded to bf16) was wrong, not the kernel; the same arithmetic gives 1.79 here.
    spec = _spec(resize=256, crop=224, dtype=torch.bfloat16)
    imgs = _rand_images([(480, 640), (2592, 3872), (224, 224), (1, 1)], seed=19)
    imgs = [imgs[0], imgs[2], imgs[3]]
    big = torch.full((5, 3, 224, 224), float("nan"), dtype=spec.dtype, device=_device())
    K.preprocess_batch_triton(imgs, spec, out=big[1:4])
    assert torch.isnan(big[[0, 4]].float()).all() and not torch.isnan(big[1:4].float()).any()
    out32 = K.preprocess_batch_triton(imgs, _spec(256, 224, torch.float32), device=_device())
    _check_bf16_batch(imgs, spec, big[1:4], out32)


_aot_cache: dict = {}


def _compile_ahead_of_time(impl: str) -> list[dict]:
    """benchmarks/kernel_aot.py's report: every config of `impl` compiled for sm_80 and sm_90, fp16 and
    bf16 out, on this machine (no GPU needed): whether the PTX has tensor-core mma, local memory, 16-byte
    and 1-byte global loads, and ptxas' registers and spill bytes. A separate process, because
    triton.jit picks interpreted or compiled once per process; cached per impl (~20-40 s each). fp32
    out, the lightest epilogue, was checked by hand (benchmarks/RESULTS.md, issue 16)."""
    import subprocess

    if impl not in _aot_cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        r = subprocess.run(
            [sys.executable, os.path.join(root, "benchmarks", "kernel_aot.py"), K.__file__, impl],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if "ImportError" in r.stderr and "triton." in r.stderr:  # pragma: no cover - other triton layouts
            pytest.skip("triton without the AOT compile API")
        assert r.returncode == 0, r.stderr[-2000:]
        _aot_cache[impl] = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    return _aot_cache[impl]


def test_kernel_compiles_for_ampere_and_hopper_without_a_gpu(impl):
    # The interpreter runs Python, not the compiler: compile every config to sm_80 and sm_90 here (ptxas
    # ships with triton) so that a kernel the Triton compiler rejects fails in CI rather than on the one
    # GPU run. The vertical passes run on the tensor cores, and no config uses local memory.
    results = _compile_ahead_of_time(impl)
    n_cfg = len(K._banded_configs() if impl == "banded" else K._configs())
    # Under the interpreter the config lists hold one entry; the subprocess compiles the real ones.
    assert {r["arch"] for r in results} == {80, 90} and len(results) >= 4 * n_cfg, results
    assert all(r["mma"] and not r["ld_local"] for r in results), results


def test_kernels_do_not_spill_registers(impl):
    # A spill turns the kernel's register tiles into local-memory traffic, the bandwidth it is meant to
    # leave to the image bytes: ptxas must place every config of both kernels in registers.
    results = _compile_ahead_of_time(impl)
    assert all(r["spill_bytes"] == 0 and r["regs"] <= 255 for r in results), results


def test_banded_kernel_loads_wide(impl):
    # Issue 16: the byte-per-lane gathers (one ld.global.u8 per tap and channel) held the banded kernel
    # at 5.1-9.4% of an H200's copy bandwidth. Every config, on both archs, must read the source as
    # 16-byte vector loads and issue no 1-byte global load. Fails on the byte-per-lane kernel.
    if impl != "banded":
        pytest.skip("the dense kernel still loads one byte per lane (its tiles feed tl.dot)")
    results = _compile_ahead_of_time("banded")
    assert all(r["ld_v4"] > 0 and r["ld_u8"] == 0 for r in results), results


def test_wide_readable_aligns_and_pads_only_when_needed():
    # The banded kernel reads whole aligned 16-byte blocks around each image: the buffer it gets must
    # start on a 16-byte boundary and be readable to the next multiple of 16 past its end.
    raw = torch.arange(100, dtype=torch.uint8)
    shifted = raw[3:40]  # misaligned start
    got = K.wide_readable(shifted)
    assert got.data_ptr() % 16 == 0 and torch.equal(got, shifted)
    storage = got.untyped_storage()
    assert storage.nbytes() - (got.data_ptr() - storage.data_ptr()) >= 48
    packed, _, _ = K.pack_images(_rand_images([(5, 7), (3, 3)]), "cpu")  # 132 bytes: not a multiple of 16
    assert packed.numel() == 132 and K.wide_readable(packed) is packed
    with pytest.raises(ValueError, match="byte strides"):
        K.make_params([0], [(14, 2, 1)], [(3, 7)], K._geometry([(3, 7)], _spec(), None, None), "cpu")


def test_impl_is_chosen_by_env_and_banded_by_default(monkeypatch):
    monkeypatch.delenv("AURORA_TRITON_IMPL")
    assert K.impl_name() == "banded"
    monkeypatch.setenv("AURORA_TRITON_IMPL", "dense")
    assert K.impl_name() == "dense" and K.impl_name("banded") == "banded"
    monkeypatch.setenv("AURORA_TRITON_IMPL", "sparse")
    with pytest.raises(ValueError, match="preprocess_batch_triton: impl must be one of"):
        K.preprocess_batch_triton([np.zeros((4, 4, 3), np.uint8)], _spec(), device=_device())


def test_mixed_tap_counts_in_one_launch_match_single_launches():
    # Strong downscales (21 horizontal taps for 200 -> 21 wide) next to an upscale (3 taps)
    # and 1-pixel images in one launch: each image's taps are its own, so the batch equals the images
    # launched alone, bit for bit, and each stays within a level of the oracle.
    spec = _spec()
    imgs = _rand_images([(150, 200), (5, 3), (1, 1), (40, 260), (13, 17)], seed=29)
    out = K.preprocess_batch_triton(imgs, spec, device=_device())
    for i, img in enumerate(imgs):
        alone = K.preprocess_batch_triton([img], spec, device=_device())
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=0)
        err = np.abs(_unnormalize(out[i], spec) - _oracle_u8(img, spec))
        assert err.max() <= 1.0 + 1e-3, f"{img.shape}: {err.max()}"


def test_banded_and_dense_agree():
    # The two implementations share the vertical pass and differ only in the horizontal weights'
    # precision (fp32 in the banded one, an fp16 hi/lo pair in the dense one): PIL-style rounding may
    # flip at most one level, on a few pixels.
    spec = _spec()
    imgs = _rand_images([(100, 37), (33, 200), (150, 200), (17, 23)], seed=31)
    b = K.preprocess_batch_triton(imgs, spec, device=_device(), impl="banded")
    d = K.preprocess_batch_triton(imgs, spec, device=_device(), impl="dense")
    diff = (b - d).abs().cpu().double().numpy() * (np.array(STD)[:, None, None] * 255)
    assert diff.max() <= 1.0 + 1e-3 and (diff > 0.5).mean() < 0.01, (diff.max(), (diff > 0.5).mean())
