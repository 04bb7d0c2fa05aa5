"""Runner: model loading, top-k against the plain model, bucket padding, dtypes, OOM split, sticky errors."""

from __future__ import annotations

import pytest
import torch

from aurora_core import aot
from aurora_core.errors import DeviceLost, ModelError
from aurora_core.runner import Runner, is_oom, is_sticky, load_model, resolve_dtype
from tests.conftest import Faulty, Tiny, devices, requires_cuda

SHAPE = (3, 16, 16)


def fill(runner, n, seed=1):
    slab = runner.new_slab(0)
    g = torch.Generator().manual_seed(seed)
    slab.host[:n].copy_(torch.randn((n, *SHAPE), generator=g))
    slab.n = n
    runner.stage(slab)
    return slab


def expected(model, x, k):
    with torch.inference_mode():
        return torch.topk(torch.softmax(model(x).float(), 1), k, 1)


@pytest.mark.parametrize("device", devices())
def test_topk_matches_plain_model_and_padding_is_invisible(device):
    ref = Tiny()
    r = Runner(Tiny(), device=device, buckets=(1, 4, 8), input_shape=SHAPE, top_k=3)
    slab = fill(r, 5)
    out = r.run(slab)
    assert out.bucket == 8 and out.failed == set()
    p, i = expected(ref, slab.host[:5], 3)
    assert out.indices == i.tolist()
    torch.testing.assert_close(torch.tensor(out.probs), p, rtol=1e-4, atol=1e-5)
    assert out.compute_start_ns <= out.compute_end_ns


def test_warmup_runs_every_bucket_and_k_is_clamped():
    m = Tiny(classes=3)
    r = Runner(m, buckets=(1, 2, 6), input_shape=SHAPE, top_k=5)
    assert {1, 2, 6} <= set(m.rows_seen)
    assert r.k == 3


@pytest.mark.skipif(not aot.cpu_has_bf16(), reason="needs a CPU with AVX512-BF16 or AMX")
def test_bf16_on_cpu():
    r = Runner(Tiny(), dtype="bf16", buckets=(2,), input_shape=SHAPE, top_k=2)
    out = r.run(fill(r, 2))
    assert len(out.probs) == 2 and all(abs(sum(p) - 1) < 1 for p in out.probs)
    assert next(r.model.parameters()).dtype == torch.bfloat16


def test_bf16_without_cpu_support_is_an_error_and_auto_is_fp32(monkeypatch):
    """A CPU without AVX512-BF16 / AMX (the flags read as absent where the host has them)."""
    monkeypatch.setattr(aot, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match=r"dtype='bf16' on the CPU needs AVX512-BF16 or AMX.*Use dtype='fp32'"):
        Runner(Tiny(), dtype="bf16", buckets=(2,), input_shape=SHAPE)
    r = Runner(Tiny(), dtype="auto", buckets=(2,), input_shape=SHAPE, top_k=2)
    assert r.dtype == torch.float32 and r.agreement is None  # nothing measured: no bf16 to pick
    assert next(r.model.parameters()).dtype == torch.float32
    assert r.run(fill(r, 2)).indices == expected(Tiny(), fill(r, 2).host[:2], 2)[1].tolist()


def test_auto_dtype_picks_bf16_only_where_it_agrees(monkeypatch):
    """With bf16 engines (the flags read as present where the host lacks them), "auto" measures agreement
    on >= 200 photo variants and keeps fp32 unless top-1 agrees on >= 99%."""
    monkeypatch.setattr(aot, "cpu_has_bf16", lambda: True)
    r = Runner(Tiny(), dtype="auto", buckets=(2,), input_shape=SHAPE, top_k=2)
    assert r.agreement is not None and r.agreement.n >= 200
    assert r.dtype == (torch.bfloat16 if r.agreement.top1 >= 0.99 else torch.float32)
    assert next(r.model.parameters()).dtype == r.dtype


@pytest.mark.parametrize("bad", ["fp8", torch.int8, 3])
def test_bad_dtype(bad):
    with pytest.raises(ValueError, match="fp32, fp16, bf16 or auto"):
        resolve_dtype(bad)


def test_oom_splits_down_to_one_row_and_only_that_row_fails():
    r = Runner(Tiny(), buckets=(1, 2, 4), input_shape=SHAPE, top_k=2)
    slab = fill(r, 4)
    full = r.run(slab)
    # 4 -> OOM, split (2, 2); rows 0-1 -> OOM, split (1, 1); row 0 alone -> OOM: failed. Then all fine.
    r.inject_fault("oom", count=3)
    out = r.run(slab)
    assert out.failed == {0}
    assert r.counters["oom_splits"] == 2
    assert out.indices[1:] == full.indices[1:]
    torch.testing.assert_close(torch.tensor(out.probs[1:]), torch.tensor(full.probs[1:]), rtol=1e-4, atol=1e-5)


def test_oom_above_a_size_serves_everyone_in_smaller_pieces():
    r = Runner(Tiny(), buckets=(1, 2, 4, 8), input_shape=SHAPE, top_k=2)
    slab = fill(r, 8)
    r.inject_fault("oom", count=100, min_rows=3)  # anything of 3+ rows fails
    out = r.run(slab)
    assert out.failed == set() and None not in out.probs
    assert r.counters["oom_splits"] == 1 + 2  # 8 -> 4+4, each 4 -> 2+2


def test_sticky_error_raises_device_lost():
    r = Runner(Tiny(), buckets=(2,), input_shape=SHAPE)
    r.inject_fault("sticky")
    with pytest.raises(DeviceLost):
        r.run(fill(r, 2))
    assert r.run(fill(r, 2)).failed == set()  # the injection is consumed


def test_a_model_exception_is_a_model_error_with_the_cause():
    m = Faulty()
    r = Runner(m, buckets=(1, 4), input_shape=SHAPE, top_k=3)
    m.mode = "raise"
    with pytest.raises(ModelError) as ei:
        r.run(fill(r, 3))
    assert ei.value.reason == "model_error" and isinstance(ei.value.__cause__, ValueError)
    assert "boom" not in str(ei.value)  # the server sends messages to clients; the cause stays on the server


def test_a_model_returning_the_wrong_number_of_rows_is_a_model_error():
    m = Faulty()
    r = Runner(m, buckets=(1, 4), input_shape=SHAPE, top_k=3)
    m.mode = "one_row"
    with pytest.raises(ModelError, match="1 rows of logits for a batch of 4"):
        r.run(fill(r, 3))  # padded to the 4-row bucket


def test_inject_fault_validates_kind():
    r = Runner(Tiny(), buckets=(1,), input_shape=SHAPE)
    with pytest.raises(ValueError, match="oom"):
        r.inject_fault("meteor")


def test_error_classification():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_sticky(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_sticky(RuntimeError("shape mismatch"))
    assert not is_sticky(ValueError("illegal memory access"))


def test_load_model_name_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("squeezenet1_1", seed=0)
    after = torch.rand(1)
    b = load_model("squeezenet1_1", seed=0)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_load_model_files(tmp_path):
    m = Tiny().eval()
    x = torch.randn(2, *SHAPE)
    ts = tmp_path / "tiny.pt"
    with pytest.warns(FutureWarning, match="deprecated"):  # torch's own notice: TorchScript is deprecated
        torch.jit.trace(m, x).save(str(ts))
    sd = tmp_path / "sd.pt"
    torch.save(m.state_dict(), sd)
    fresh = Tiny()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    with torch.inference_mode(), pytest.warns(FutureWarning, match="torch.jit.load. is deprecated"):
        torch.testing.assert_close(load_model(str(ts))(x), m(x))
    with torch.inference_mode():
        torch.testing.assert_close(load_model(fresh, weights=str(sd))(x), m(x))
    with pytest.raises(ValueError, match="torchvision"):
        load_model("no_such_net")
    with pytest.raises(TypeError):
        load_model(42)


def test_load_model_torch_export(tmp_path):
    m = Tiny().eval()
    x = torch.randn(2, *SHAPE)
    path = tmp_path / "tiny.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(m, (x,), dynamic_shapes=({0: batch},)), str(path))
    r = Runner(load_model(str(path)), buckets=(1, 2), input_shape=SHAPE, top_k=2)
    slab = fill(r, 2)
    out = r.run(slab)
    assert out.indices == expected(m, slab.host[:2], 2)[1].tolist()


@requires_cuda
def test_cuda_graphs_per_bucket_and_events():
    r = Runner(Tiny(), device="cuda", buckets=(1, 2, 4), input_shape=SHAPE, top_k=3)
    assert r.graph_buckets == (1, 2, 4)
    slab = fill(r, 3)
    assert slab.host.is_pinned()
    out = r.run(slab)
    assert r.counters["graph_replays"] == 1 and r.counters["eager_runs"] == 0
    assert 0 < out.h2d_start_ns <= out.h2d_end_ns <= out.compute_start_ns <= out.compute_end_ns <= out.d2h_end_ns
    p, i = expected(Tiny(), slab.host[:3], 3)
    assert out.indices == i.tolist()


@requires_cuda
def test_cuda_eager_when_graphs_off_and_real_oom_split():
    r = Runner(Tiny(), device="cuda", buckets=(1, 2), input_shape=SHAPE, cuda_graphs=False)
    out = r.run(fill(r, 2))
    assert r.counters["eager_runs"] == 1 and out.failed == set()
    r.inject_fault("oom", count=1, min_rows=2)
    out = r.run(fill(r, 2))
    assert out.failed == set() and r.counters["oom_splits"] == 1


def _spy_kernel_warmup(monkeypatch, fail=None):
    """Replaces the Triton kernel's warmup; records (spec, device) of each call, raises ``fail`` if given."""
    import aurora_core.kernels.preprocess as kp

    calls = []

    def warmup(spec, device="cuda"):
        calls.append((spec, torch.device(device)))
        if fail is not None:
            raise fail

    monkeypatch.setattr(kp, "warmup", warmup)
    return calls


def test_preprocess_kernel_is_not_warmed_on_the_cpu(monkeypatch):
    from aurora_core.ops.preprocess import PreprocessSpec

    calls = _spy_kernel_warmup(monkeypatch)
    r = Runner(Tiny(), buckets=(1,), input_shape=SHAPE, preprocess_spec=PreprocessSpec(resize=24, crop=16))
    assert calls == [] and r.preprocess_spec is None and not r.preprocess_warm


@requires_cuda
def test_preprocess_kernel_warmed_once_at_start_up(monkeypatch):
    from aurora_core.ops.preprocess import PreprocessSpec

    spec = PreprocessSpec(resize=24, crop=16)
    calls = _spy_kernel_warmup(monkeypatch)
    r = Runner(Tiny(), device="cuda", buckets=(1, 2), input_shape=SHAPE, preprocess_spec=spec)
    assert calls == [(spec, r.device)] and r.preprocess_warm and r.preprocess_error is None
    r.warmup()
    assert len(calls) == 1  # compiled and tuned already: a second warm-up does not redo it


@requires_cuda
def test_preprocess_kernel_warmup_failure_is_kept_and_the_runner_still_serves(monkeypatch):
    from aurora_core.ops.preprocess import PreprocessSpec

    _spy_kernel_warmup(monkeypatch, fail=RuntimeError("injected compile failure"))
    r = Runner(Tiny(), device="cuda", buckets=(1, 2), input_shape=SHAPE,
               preprocess_spec=PreprocessSpec(resize=24, crop=16))
    assert not r.preprocess_warm and isinstance(r.preprocess_error, RuntimeError)
    assert r.run(fill(r, 2)).failed == set()
    _spy_kernel_warmup(monkeypatch, fail=RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(DeviceLost):
        Runner(Tiny(), device="cuda", buckets=(1,), input_shape=SHAPE,
               preprocess_spec=PreprocessSpec(resize=24, crop=16))


def test_weights_that_do_not_fit_are_a_value_error_naming_the_file(tmp_path):
    """A library user's Pipeline(weights=...) gets the misfit spelled out, not torch's raw RuntimeError."""
    from aurora_core.runner import load_model

    w = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, w)
    with pytest.raises(ValueError, match=r"weights .*w\.pt do not fit .*missing.*unknown to the model \(fc\.weight\)"):
        load_model("mobilenet_v3_small", weights=str(w))
    (tmp_path / "t.pt").write_text("not weights\n")
    with pytest.raises(ValueError, match="not a state_dict file"):
        load_model("mobilenet_v3_small", weights=str(tmp_path / "t.pt"))


def test_a_model_that_drops_rows_fails_at_warm_up():
    """Checked per bucket at start-up (ModelError from the constructor), not first on every batch."""
    m = Faulty()
    m.mode = "one_row"
    with pytest.raises(ModelError, match="1 rows of logits for a batch of 2"):
        Runner(m, buckets=(1, 2), input_shape=SHAPE)
