"""The compiled path (torch.export + AOTInductor): outputs against eager, the disk cache (hit, another torch
or CPU, corrupt entry), background compile, .pt2 packages as models, and fp32-vs-compiled agreement.

A cold compile costs 30-60 s of CPU on a 2-core box: one session fixture builds the package that most
tests reuse through the disk cache; two more builds (the corrupt entry, mobilenet) are the slow ones.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import warnings
import zipfile

import pytest
import torch
from torch import nn

from aurora_core import aot
from aurora_core.agreement import agreement, agreement_images
from aurora_core.runner import Runner, load_model

SHAPE = (3, 16, 16)
BUCKETS = (1, 2, 4)


class Branchy(nn.Module):
    """A user module with Python control flow: a loop over a ModuleList, a branch on a static shape, a
    branch on a constructor flag. torch.export resolves each of them as eager does."""

    def __init__(self, classes: int = 10, residual: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)) for _ in range(2))
        self.fc = nn.Linear(8, classes)
        self.residual = residual
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        for blk in self.blocks:
            y = torch.relu(blk(y) + y) if self.residual else torch.relu(blk(y))
        if y.shape[-1] > 8:
            y = nn.functional.max_pool2d(y, 2)
        return self.fc(y.mean((2, 3)))


class SignBranch(Branchy):
    """Control flow on the data: tracing baked one branch in; torch.export refuses it."""

    def forward(self, x):
        y = super().forward(x)
        return y if float(x.sum()) > 0 else -y


def batch(n, seed=1):
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def serve(r: Runner, x: torch.Tensor):
    slab = r.new_slab(0)
    slab.host[: len(x)].copy_(x)
    slab.n = len(x)
    return r.run(slab)


def eager(model, x, k=3):
    with torch.inference_mode():
        return torch.topk(torch.softmax(model.eval()(x).float(), 1), k, 1)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A cache holding Branchy's package, built once."""
    root = str(tmp_path_factory.mktemp("aoti"))
    r = Runner(Branchy(), buckets=BUCKETS, input_shape=SHAPE, top_k=3, compile=True, cache_dir=root)
    assert r.compile_state == "compiled", r.compile_error
    assert r.compile_source == "built"
    return root


def entry_of(root):
    (name,) = [d for d in os.listdir(root) if not d.startswith(".")]
    return os.path.join(root, name)


def package_source(entry, name) -> str:
    """The C++ that AOTInductor generated for a package of a cache entry (kept inside the .pt2)."""
    with zipfile.ZipFile(os.path.join(entry, f"{name}.pt2")) as z:
        return "".join(z.read(n).decode(errors="replace") for n in z.namelist() if n.endswith(".cpp"))


def assert_frozen(entry):
    """Inductor froze the graphs: BatchNorm is folded into the convolutions (unfrozen, the generated kernels
    still compute _native_batch_norm_legit_no_training, and the convolutions repack their weights)."""
    for name in ("full", "dynamic"):
        src = package_source(entry, name)
        assert "convolution" in src and "batch_norm" not in src


def test_the_largest_bucket_runs_the_fixed_batch_package_with_packed_weights(cache):
    """With the batch fixed, freezing stores the convolutions' weights in oneDNN's layout (constants of
    layout _mkldnn); with a dynamic batch the convolutions reorder plain weights on every call."""
    full, dynamic = (package_source(entry_of(cache), n).count("layout__mkldnn") for n in ("full", "dynamic"))
    assert full >= 3 + dynamic  # Branchy's three convolutions
    r = Runner(Branchy(), buckets=BUCKETS, input_shape=SHAPE, top_k=3, compile=True, cache_dir=cache)
    c, calls = r.compiled, []
    assert isinstance(c, aot.Compiled) and c.max_batch == 4
    for name in ("full", "dynamic"):
        pkg = getattr(c, name)
        setattr(c, name, lambda x, pkg=pkg, name=name: calls.append((name, len(x))) or pkg(x))
    for n in (4, 1, 2, 3):  # 3 is padded to 4
        x = batch(n, seed=n)
        assert serve(r, x).indices == eager(Branchy(), x)[1].tolist()
    assert calls == [("full", 4), ("dynamic", 1), ("dynamic", 2), ("full", 4)]


class Dense(nn.Module):
    """Eight 4096-wide layers: a batch of one takes milliseconds, long enough to see who holds the GIL."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4096, 4096)
        self.out = nn.Linear(4096, 10)

    def forward(self, x):
        h = x.flatten(1)
        for _ in range(8):
            h = torch.tanh(self.fc(h))
        return self.out(h)


@pytest.mark.slow
def test_the_compiled_model_runs_without_holding_the_gil(tmp_path):
    """The packages run through their C entry point (aot.GilFree), which drops the GIL: a Python thread keeps
    running while the model does, where torch's loader holds the GIL for the whole run; same outputs."""
    r = Runner(Dense(), buckets=(1,), input_shape=(1, 64, 64), top_k=3, compile=True, cache_dir=str(tmp_path))
    assert r.compile_state == "compiled", r.compile_error
    assert isinstance(r.compiled.full, aot.GilFree)
    loader = torch._inductor.aoti_load_package(os.path.join(entry_of(str(tmp_path)), "full.pt2"))
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    for p, q in zip(r.compiled.full(x), loader(x), strict=True):
        assert torch.equal(p, q)

    def progress(fn) -> int:
        count, stop = [0], threading.Event()

        def spin():
            while not stop.is_set():
                count[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        try:
            for _ in range(20):
                fn(x)
        finally:
            stop.set()
            t.join()
        return count[0]

    # Counts over the same 20 runs, not times: the spinning thread runs only when the runs let go of the GIL.
    free, held = progress(r.compiled.full), progress(loader)
    assert free > 3 * held, (free, held)


def test_the_package_is_frozen_though_the_caller_has_grad_on(cache):
    """The fixture built it with grad on (a test's default, as on a fresh side thread); Inductor freezes
    only under no_grad, which aot.build sets itself."""
    assert torch.is_grad_enabled()
    assert_frozen(entry_of(cache))


def test_compiled_matches_eager_for_a_module_with_python_control_flow(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # nothing deprecated on this path (no torch.jit)
        warnings.simplefilter("error", FutureWarning)
        r = Runner(Branchy(), buckets=BUCKETS, input_shape=SHAPE, top_k=3, compile=True, cache_dir=cache)
        assert r.compile_state == "compiled" and r.compile_source == "cache"  # a second start loads it
        for n in (1, 3, 4):  # 3 is padded to the 4-row bucket
            x = batch(n, seed=n)
            out = serve(r, x)
            p, i = eager(Branchy(), x)
            assert out.indices == i.tolist()
            torch.testing.assert_close(torch.tensor(out.probs), p, rtol=1e-4, atol=1e-5)
    assert r.counters["compiled_runs"] == 3 and r.counters["eager_runs"] == 0
    # Another constructor flag is another function: not the cached package.
    other = Runner(Branchy(residual=False), buckets=BUCKETS, input_shape=SHAPE, compile=False)
    meta = aot.cache_meta(other.model, dtype=torch.float32, device=torch.device("cpu"), input_shape=SHAPE,
                          input_dtype=torch.float32, max_batch=4, k=3)
    assert aot.load_cached(meta, cache) is None


def test_data_dependent_control_flow_is_not_frozen(cache, caplog):
    caplog.set_level(logging.WARNING, "aurora_core.runner")
    r = Runner(SignBranch(), buckets=BUCKETS, input_shape=SHAPE, top_k=3, compile=True, cache_dir=cache)
    assert r.compile_state == "eager" and r.compiled is None
    assert "cannot be compiled ahead of time" in caplog.text
    for x in (batch(2).abs(), -batch(2).abs()):  # both branches, served as eager computes them
        assert serve(r, x).indices == eager(SignBranch(), x)[1].tolist()


@pytest.mark.parametrize("what", ["torch", "cpu"])
def test_a_package_built_for_another_torch_or_cpu_is_rebuilt_not_loaded(cache, monkeypatch, caplog, tmp_path,
                                                                         what):
    root = str(tmp_path / "c")
    shutil.copytree(cache, root)
    built = entry_of(root)
    meta = aot._read_meta(built)
    assert aot.load_cached(meta, root) is not None
    # This process now is another torch / another CPU: the key moves, and an entry whose meta.json names
    # the old one (copied there, or a key collision) is not loaded either.
    monkeypatch.setattr(aot, "torch_version" if what == "torch" else "cpu_features", lambda: "other")
    now = aot.cache_meta(Branchy().eval(), dtype=torch.float32, device=torch.device("cpu"), input_shape=SHAPE,
                         input_dtype=torch.float32, max_batch=4, k=3)
    assert now[what] == "other" and aot.cache_key(now) != os.path.basename(built)
    assert aot.load_cached(now, root) is None
    stale = os.path.join(root, aot.cache_key(now))
    shutil.copytree(built, stale)
    caplog.set_level(logging.WARNING, "aurora_core.aot")
    assert aot.load_cached(now, root) is None
    assert "built for torch" in caplog.text and not os.path.exists(stale)
    builds = []

    def build(*a, **k):  # the real one would spend a minute on the same build the fixture did
        builds.append(a)
        raise RuntimeError("not built in this test")

    monkeypatch.setattr(aot, "build", build)
    r = Runner(Branchy(), buckets=BUCKETS, input_shape=SHAPE, top_k=3, compile=True, cache_dir=root)
    assert len(builds) == 1 and r.compile_state == "eager"  # it went to build, not to the stale package


@pytest.mark.slow  # a real rebuild: 20-40 s on 2 shared cores
def test_a_corrupt_entry_is_rebuilt_with_a_warning_in_the_background(cache, tmp_path, caplog):
    """Also: a background compile serves eager until the package is ready, then the package."""
    root = str(tmp_path / "c")
    shutil.copytree(cache, root)
    with open(os.path.join(entry_of(root), "dynamic.pt2"), "r+b") as f:
        f.truncate(4096)
    caplog.set_level(logging.INFO)
    r = Runner(Branchy(), buckets=BUCKETS, input_shape=SHAPE, top_k=3, compile="background", cache_dir=root)
    assert "does not load" in caplog.text and "rebuilding" in caplog.text
    assert r.compile_state == "compiling"
    x = batch(4)
    assert serve(r, x).indices == eager(Branchy(), x)[1].tolist() and r.counters["eager_runs"] == 1
    assert r.wait_compiled(timeout=300) == "compiled" and r.compile_source == "built"
    assert "compiling Branchy: compiling with AOTInductor" in caplog.text  # progress in the log
    assert_frozen(entry_of(root))  # built on the side thread, where grad is on
    out = serve(r, x)
    assert r.counters["compiled_runs"] == 1 and out.indices == eager(Branchy(), x)[1].tolist()


@pytest.mark.slow
def test_an_aoti_package_is_accepted_as_a_model_file(tmp_path):
    """A user's AOTInductor package of a logits model (dynamic batch), served as compiled already."""
    net = Branchy().eval()
    pkg = str(tmp_path / "user.pt2")
    dim = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad():
        ep = torch.export.export(net, (batch(2),), dynamic_shapes=({0: dim},))
    torch._inductor.aoti_compile_and_package(ep, package_path=pkg)
    r = Runner(load_model(pkg), buckets=BUCKETS, input_shape=SHAPE, top_k=3, compile=True,
               cache_dir=str(tmp_path / "c"))
    assert r.compile_state == "off" and not os.path.exists(tmp_path / "c")  # compiled already: nothing to do
    x = batch(3)
    out = serve(r, x)
    p, i = eager(net, x)
    assert out.indices == i.tolist()
    torch.testing.assert_close(torch.tensor(out.probs), p, rtol=1e-4, atol=1e-5)
    (tmp_path / "junk.pt2").write_bytes(b"not a package")
    with pytest.raises(ValueError, match="neither a torch.export.save file nor an AOTInductor package"):
        load_model(str(tmp_path / "junk.pt2"))


def test_agreement_of_the_compiled_model_with_fp32_eager(cache):
    """The agreement rule's measurement, fp32 eager vs fp32 compiled, on >= 200 photo variants; and that it
    can fail. (A random-init model gives nearly one class for every photo, so the figures that mean
    something are benchmarks/compiled_vs_traced.py's, on BatchNorm-calibrated torchvision models.)"""
    r = Runner(Branchy(), buckets=BUCKETS, input_shape=SHAPE, top_k=3, compile=True, cache_dir=cache)
    x = agreement_images(SHAPE[-1])
    assert x.shape == (200, *SHAPE) and x.std() > 0.3
    a = agreement(r.head, r.compiled, x, batch=4)
    assert a.n == 200 and a.passes() and a.top1 == 1.0 and a.max_prob_diff < 1e-4

    def every_other_wrong(x):
        p, i = r.compiled(x)
        i = i.clone()
        i[::2, 0] += 1
        return p * 0.5, i

    a = agreement(r.head, every_other_wrong, x, batch=4)
    assert a.top1 == 0.5 and not a.passes() and a.max_prob_diff > 0.1
    assert not agreement(r.head, r.compiled, x[:100], batch=4).passes()  # 100% but on too few images


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet50"])
def test_torchvision_archs_compiled_match_eager(arch, tmp_path):
    """The architectures the README names, at a 64 px input (compile time does not depend on it)."""
    shape = (3, 64, 64)
    r = Runner(load_model(arch), buckets=(1, 4), input_shape=shape, top_k=5, compile=True,
               cache_dir=str(tmp_path))
    assert r.compile_state == "compiled", r.compile_error
    x = torch.randn((4, *shape), generator=torch.Generator().manual_seed(3))
    out = serve(r, x)
    p, _ = eager(load_model(arch), x, 5)
    torch.testing.assert_close(torch.tensor(out.probs), p, rtol=1e-3, atol=1e-5)


def test_a_pipeline_serves_the_cached_package(cache, monkeypatch):
    """Pipeline(compile=...) reaches the runner; the package comes from $AURORA_CACHE_DIR (the fixture's)."""
    from aurora_core import samples
    from aurora_core.batching import BatchingConfig
    from aurora_core.ops.preprocess import PreprocessSpec
    from aurora_core.pipeline import Pipeline

    monkeypatch.setenv("AURORA_CACHE_DIR", cache)
    spec, cfg = PreprocessSpec(resize=18, crop=16), BatchingConfig(max_batch_size=4, bucket_sizes=(1, 2, 4))
    data = samples.sample_bytes("0.3mp")
    with Pipeline(Branchy(), spec, cfg, device="cpu", top_k=3, compile="background") as p:
        assert p.runner.compile_state == "compiled" and p.runner.compile_source == "cache"
        got = p.infer(data, timeout=30)
        assert p.runner.counters["compiled_runs"] == 1
    with Pipeline(Branchy(), spec, cfg, device="cpu", top_k=3, compile=False) as p:
        want = p.infer(data, timeout=30)
        assert p.runner.compiled is None and p.runner.counters["eager_runs"] == 1
    assert [c for c, _ in got.top_k] == [c for c, _ in want.top_k]
    torch.testing.assert_close(torch.tensor([q for _, q in got.top_k]), torch.tensor([q for _, q in want.top_k]),
                               rtol=1e-4, atol=1e-5)
