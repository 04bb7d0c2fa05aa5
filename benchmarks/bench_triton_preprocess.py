"""Triton preprocessing kernel (banded and dense) vs the torch eager chain vs the C++ CPU kernel.

    python -m pytest benchmarks/bench_triton_preprocess.py --benchmark-only      # on a CUDA machine

GPU cases are skipped without CUDA; a tiny interpreter smoke case runs everywhere (CI runs it with
--benchmark-disable). GB/s counts the source bytes the crop's filter window reads plus the output.
benchmarks/gpu_suite.py runs the full size x batch matrix with a copy-bandwidth ceiling.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F  # noqa: E402

from aurora_core.decode import decode  # noqa: E402
from aurora_core.ops.preprocess import PreprocessSpec, preprocess_batch  # noqa: E402
from aurora_core.samples import sample_bytes  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_suite import _footprint, _kernel_module  # noqa: E402

K = _kernel_module()  # aurora_core.kernels.preprocess, also from an uninstalled checkout


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _inputs(size: str, batch: int, spec, device):
    img = decode(sample_bytes(size))
    imgs = [img] * batch
    shapes = [img.shape[:2]] * batch
    geo = K._geometry(shapes, spec, None, None)
    # Aligned and padded once here (the banded kernel reads 16-byte blocks), not inside the timed launch.
    packed = K.wide_readable(torch.from_numpy(img).reshape(-1).repeat(batch).to(device))
    offsets = [i * img.nbytes for i in range(batch)]
    strides = [(3 * img.shape[1], 3, 1)] * batch
    moved = sum(_footprint(K, s, g, spec.crop) for s, g in zip(shapes, geo, strict=True))
    moved += batch * 3 * spec.crop * spec.crop * torch.empty(0, dtype=spec.dtype).element_size()
    return imgs, shapes, geo, packed, offsets, strides, moved


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("provider", ["triton_banded", "triton_dense", "torch_eager", "cpp"])
@pytest.mark.parametrize("batch", [8, 64])
@pytest.mark.parametrize("size", ["0.3mp", "2.5mp", "10mp"])
def test_preprocess_gpu(benchmark, provider, size, batch):
    spec = PreprocessSpec(dtype=torch.float16)
    imgs, shapes, geo, packed, offsets, strides, moved = _inputs(size, batch, spec, "cuda")
    benchmark.group = f"{size} x{batch}"
    out = torch.empty((batch, 3, spec.crop, spec.crop), dtype=spec.dtype, device="cuda")
    if provider.startswith("triton_"):
        ip, fp = K.make_params(offsets, strides, shapes, geo, "cuda")
        impl = provider.removeprefix("triton_")

        def fn():
            K.launch_params(packed, ip, fp, spec, out, impl)
            _sync()
    elif provider == "torch_eager":
        mean = torch.tensor(spec.mean, device="cuda").view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device="cuda").view(1, 3, 1, 1)
        h, w = shapes[0]
        top, left, rh, rw, _, _ = geo[0]
        x_u8 = packed.view(batch, h, w, 3)
        chunk = max(1, (1 << 30) // (h * w * 12))

        def fn():
            for i in range(0, batch, chunk):
                x = x_u8[i : i + chunk].permute(0, 3, 1, 2).float()
                x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
                x = x[:, :, top : top + spec.crop, left : left + spec.crop]
                out[i : i + chunk] = ((x / 255.0 - mean) / std).to(spec.dtype)
            _sync()
    else:
        host = torch.empty((batch, 3, spec.crop, spec.crop), dtype=spec.dtype)

        def fn():
            preprocess_batch(imgs, spec, out=host, backend="cpp")

    benchmark(fn)
    if benchmark.stats is not None:
        sec = benchmark.stats.stats.median
        benchmark.extra_info.update(gbps=round(moved / sec / 1e9, 1), images_per_s=round(batch / sec, 1))


@pytest.mark.parametrize("impl", ["banded", "dense"])
def test_preprocess_interpreter_smoke(benchmark, impl):
    """Runs everywhere: the kernel on a tiny spec (interpreted on CPU-only machines), checked once."""
    spec = PreprocessSpec(resize=16, crop=12)
    device = "cuda" if HAS_CUDA else "cpu"
    imgs = [np.ascontiguousarray(decode(sample_bytes("0.3mp"))[::8, ::8]), np.full((5, 7, 3), 77, np.uint8)]
    out = benchmark(lambda: K.preprocess_batch_triton(imgs, spec, device=device, impl=impl))
    assert out.shape == (2, 3, 12, 12) and torch.isfinite(out).all()
    # A flat image stays flat: every output pixel is (77/255 - mean) / std.
    flat = (77 / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(out[1].cpu(), flat.view(3, 1, 1).expand(3, 12, 12), rtol=0, atol=1e-5)
