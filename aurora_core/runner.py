"""Model loading and execution: device, dtype, channels_last, bucket warm-up, CUDA graphs, OOM split.

The runner owns the model and the device side of the batch buffers. The pipeline fills a host batch
buffer (``Slab.host``, pinned on CUDA), calls ``stage`` (on CUDA: an async H2D copy on a side stream,
so it overlaps the previous batch's compute), then ``run``, which returns the top-k of every real row.
The pipeline's two batch workers call ``run`` one batch at a time, in batch order.

On CUDA every bucket gets one CUDA graph (captured after warm-up; eager when capture fails). An
out-of-memory error splits the rows in halves down to single rows; a row that still fails is reported
as failed, its batch-mates are served. A sticky device error (illegal address, device lost) raises
``DeviceLost``: the device is unusable and the pipeline decides what happens next. Any other error of
the model, or logits with another batch size than the input's, raises ``ModelError``.

On the CPU (``compile=True`` or ``"background"``) the runner serves the model compiled ahead of time:
``aot.py`` exports the head (model + softmax + top-k) with the batch fixed at the largest bucket and with a
dynamic batch dimension, and compiles both with AOTInductor, cached on disk. ``"background"`` compiles on a
side thread and serves eager until the packages are ready; every package is checked against eager on each
bucket before it serves. ``dtype="auto"`` is fp32, or bf16 on a CPU with AVX512-BF16 / AMX where bf16
passes ``agreement.py``'s rule.

When the pipeline preprocesses on the device, ``preprocess_spec`` makes the warm-up also compile and
autotune the Triton preprocessing kernel for that spec, so that the first batch does not pay for it.

Fault injection (tests, drills): ``runner.inject_fault("oom" | "sticky", count=1, min_rows=1)`` makes
the next ``count`` model executions with at least ``min_rows`` rows raise an injected
``torch.cuda.OutOfMemoryError`` or a sticky "illegal memory access" error, on any device.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from aurora_core import aot
from aurora_core.errors import AuroraError, DeviceLost, ModelError
from aurora_core.records import now_ns

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# Messages of CUDA errors after which the context is unusable (cudaErrorIllegalAddress and friends).
_STICKY_MARKERS = (
    "illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
    "misaligned address", "illegal instruction", "device lost", "fallen off the bus",
    "uncorrectable ecc", "hardware stop", "launch timed out", "cuda-capable device(s) is/are busy or unavailable",
)

_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None)) if t
)


class InjectedStickyError(RuntimeError):
    """Raised by fault injection; reads like cudaErrorIllegalAddress."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, _OOM_TYPES) or "out of memory" in str(exc).lower()


def is_sticky(exc: BaseException) -> bool:
    if isinstance(exc, InjectedStickyError | DeviceLost):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in msg for m in _STICKY_MARKERS)


def resolve_dtype(dtype) -> torch.dtype:
    """fp32 / fp16 / bf16 by name or torch dtype; None and "auto" (the Runner may pick bf16) are fp32."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"Runner: dtype must be fp32, fp16, bf16 or auto (or the torch dtype), got {dtype!r}")


def default_compile() -> bool | str:
    """Pipeline's compile=None: $AURORA_COMPILE (off / on / background), else "background"."""
    v = os.environ.get("AURORA_COMPILE", "background").strip().lower()
    modes = {"off": False, "0": False, "false": False, "on": True, "1": True, "true": True, "background": "background"}
    if v not in modes:
        raise ValueError(f"AURORA_COMPILE must be off, on or background, got {v!r}")
    return modes[v]


def load_weights(net: nn.Module, weights: str) -> nn.Module:
    """Load the state_dict file ``weights`` into ``net``. ValueError naming the file when it is not a
    state_dict torch.load can read, or when its tensors do not fit the model (which, how many)."""
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"weights {weights}: not a state_dict file torch.load can read "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    if not isinstance(sd, dict):
        raise ValueError(f"weights {weights}: holds a {type(sd).__name__}, not a state_dict")
    own = net.state_dict()
    shapes = [f"{k} {list(getattr(v, 'shape', [])) or type(v).__name__} vs {list(own[k].shape)}"
              for k, v in sd.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    parts = [f"{len(x)} {what} ({', '.join(x[:2])}{', ...' if len(x) > 2 else ''})"
             for x, what in ((shapes, "of another shape, file vs model"), (missing, "missing"),
                             (extra, "unknown to the model")) if x]
    if parts:
        raise ValueError(f"weights {weights} do not fit the model {type(net).__name__}: tensors " + "; ".join(parts))
    net.load_state_dict(sd)
    return net


class _Package(nn.Module):
    """An AOTInductor package (.pt2) as a module: compiled already, so the runner does not compile it."""

    precompiled = True

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _load_pt2(path: str) -> nn.Module:
    """A .pt2 from torch.export.save (an ExportedProgram) or from AOTInductor (a compiled package)."""
    try:
        return torch.export.load(path).module()
    except Exception as e:  # noqa: BLE001 - not an ExportedProgram: maybe a compiled package
        try:
            return _Package(torch._inductor.aoti_load_package(path))
        except Exception:  # noqa: BLE001
            raise ValueError(f"Pipeline: {path} is neither a torch.export.save file nor an AOTInductor package "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e


def load_model(model, *, weights: str | None = None, seed: int = 0) -> nn.Module:
    """A torchvision architecture name (random init under ``seed`` unless ``weights`` names a local
    state_dict file, see ``load_weights``), an nn.Module (used as is), or a path to a .pt2 file
    (torch.export.save or AOTInductor) or, deprecated, a TorchScript file."""
    if isinstance(model, nn.Module):
        return model if weights is None else load_weights(model, weights)
    if not isinstance(model, str | os.PathLike):
        raise TypeError(f"Pipeline: model must be a torchvision name, an nn.Module or a file path, got {type(model).__name__}")
    path = os.fspath(model)
    if os.path.isfile(path):
        if path.endswith(".pt2"):
            return _load_pt2(path)
        try:
            net = torch.jit.load(path, map_location="cpu")  # torch warns (FutureWarning): TorchScript is deprecated
        except RuntimeError:
            return _load_pt2(path)
        log.warning("Pipeline: %s is a TorchScript file; TorchScript is deprecated in torch and its support here "
                    "will go: save the model with torch.export.save (.pt2) instead", path)
        return net
    import torchvision

    if path not in torchvision.models.list_models():
        raise ValueError(f"Pipeline: {path!r} is neither a file nor a torchvision model name "
                         f"(e.g. 'resnet50', 'mobilenet_v3_small')")
    # Fork the RNG so a fixed-seed init does not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.get_model(path, weights=None)
    return net if weights is None else load_weights(net, weights)


class _TopK(nn.Module):
    """model -> (probs [B, k] float32, indices [B, k] int64): softmax and top-k fused into the graph
    so that only B*k numbers cross back to the host."""

    def __init__(self, model: nn.Module, k: int, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.model, self.k, self.dtype, self.channels_last = model, k, dtype, channels_last

    def forward(self, x):
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)
        if isinstance(logits, tuple | list):  # e.g. inception aux outputs
            logits = logits[0]
        p, i = torch.topk(torch.softmax(logits.float(), dim=1), self.k, dim=1)
        return p, i  # a plain tuple: torch.export cannot serialise torch.return_types.topk


@dataclass
class Slab:
    """One batch buffer: host rows (pinned on CUDA) and, on CUDA, the device rows they are copied to.
    host / dev: Tensor[max_bucket, 3, crop, crop] of the spec dtype."""

    index: int
    host: torch.Tensor
    dev: torch.Tensor | None = None
    n: int = 0
    on_device: bool = False         # True when dev was written directly (Triton preprocess)
    prepared_for: object = None     # the Runner whose device rows these are (the pipeline sets it)
    events: dict = field(default_factory=dict)
    h2d_start_ns: int = 0
    h2d_end_ns: int = 0


@dataclass
class BatchOutput:
    """top-k per row (probs[i], indices[i] for rows 0..n-1) and which rows hit OOM even alone."""

    probs: list
    indices: list
    failed: set
    bucket: int
    h2d_start_ns: int = 0
    h2d_end_ns: int = 0
    compute_start_ns: int = 0
    compute_end_ns: int = 0
    d2h_end_ns: int = 0


class Runner:
    """Runs a model over batch slabs on one device.

    model: nn.Module (moved to ``device``/``dtype``, set to eval). input_shape: (3, crop, crop).
    input_dtype: dtype of the slabs (the preprocess spec's). buckets: ascending batch shapes.
    preprocess_spec: on CUDA, also warm up the Triton preprocessing kernel for this PreprocessSpec; a
        failure there is kept in ``preprocess_error`` (the caller decides whether it may preprocess on the
        CPU instead), ``preprocess_warm`` says whether it succeeded. Ignored on the CPU.
    dtype: fp32 (None), fp16, bf16 (on the CPU: ValueError without AVX512-BF16 / AMX), or "auto".
    compile: CPU only: False, True (load or build the AOTInductor packages now) or "background" (load them
        now, or build them on a side thread while eager serves). cache_dir: its disk cache (aot.cache_dir()).
        compile_state / compile_source / compile_error tell what happened; wait_compiled() waits.
    """

    def __init__(self, model: nn.Module, *, device="cpu", dtype=None, buckets=(1,), input_shape=(3, 224, 224),
                 input_dtype=torch.float32, top_k=5, channels_last=None, cuda_graphs=True, warmup=True,
                 compile=False, cache_dir=None, preprocess_spec=None):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.device_str = str(self.device)
        auto_dtype = isinstance(dtype, str) and dtype.lower() == "auto"
        self.dtype = resolve_dtype(dtype)
        if self.dtype == torch.bfloat16 and not self.is_cuda and not auto_dtype and not aot.cpu_has_bf16():
            raise ValueError(f"Runner: dtype='bf16' on the CPU needs AVX512-BF16 or AMX (lscpu flags avx512_bf16, "
                             f"amx_bf16); this CPU has neither (torch CPU capability "
                             f"{torch.backends.cpu.get_cpu_capability()}). Use dtype='fp32', or 'auto' to pick "
                             f"bf16 only where it is supported")
        if compile not in (False, True, "background"):
            raise ValueError(f"Runner: compile must be False, True or 'background', got {compile!r}")
        self.buckets = tuple(buckets)
        self.input_shape = tuple(input_shape)
        self.input_dtype = input_dtype
        # channels_last pays off for convnets on tensor cores, and on the CPU with oneDNN too: mobilenet_v3_small
        # at batch 16, 1 thread, 16.9 -> 12.3 ms CPU per image on the 2-core dev box.
        self.channels_last = True if channels_last is None else bool(channels_last)
        if getattr(model, "precompiled", False):
            self.channels_last = False  # an AOTInductor package reads its inputs with the strides it was built for
        try:
            model.eval()
        except (NotImplementedError, RuntimeError):  # torch.export modules refuse eval(); they are inference graphs
            pass
        model = model.to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._lock = threading.Lock()
        self._faults: list[tuple[str, int]] = []   # (kind, min_rows), consumed in order
        self.counters = {"graph_replays": 0, "eager_runs": 0, "oom_splits": 0, "batches": 0, "compiled_runs": 0}
        self._graphs: dict[int, tuple] = {}
        self._static_in: torch.Tensor | None = None
        self.preprocess_spec = preprocess_spec if self.is_cuda else None
        self.preprocess_warm = False
        self.preprocess_error: BaseException | None = None
        if self.is_cuda:
            self._side = torch.cuda.Stream(self.device)
            self._compute = torch.cuda.Stream(self.device)
        k = max(1, int(top_k))
        with torch.inference_mode():
            probe = torch.zeros((1, *self.input_shape), dtype=self.input_dtype, device=self.device)
            n_classes = self._out_features(probe)
        self.k = min(k, n_classes)
        self.head = _TopK(self.model, self.k, self.dtype, self.channels_last)
        self.agreement = None  # dtype="auto" on a bf16 CPU: the bf16 model's Agreement with fp32
        if auto_dtype and not self.is_cuda and aot.cpu_has_bf16():
            self._try_bf16()
        # Compiled (AOTInductor) head on the CPU; None while eager serves. compile_state: "off", "compiling",
        # "compiled" or "eager" (the model cannot be exported or compiled; compile_error says why).
        self.compiled = None
        self.compile_state, self.compile_error, self.compile_source = "off", None, None
        self._cache_dir = cache_dir
        if compile and not self.is_cuda and not getattr(model, "precompiled", False):
            self._start_compile(background=compile == "background")
        if warmup:
            self.warmup(cuda_graphs=cuda_graphs)

    # ---- set-up -------------------------------------------------------------------------------
    def _try_bf16(self) -> None:
        """dtype="auto" on a CPU with bf16 matrix engines: bf16 where it keeps the answer (agreement.py's
        rule on the sample photos), else fp32 as built."""
        from aurora_core.agreement import agreement, agreement_images

        bf = copy.deepcopy(self.model).to(torch.bfloat16)
        head = _TopK(bf, self.k, torch.bfloat16, self.channels_last)
        x = agreement_images(self.input_shape[-1]).to(self.input_dtype)
        self.agreement = agreement(self.head, head, x)
        if self.agreement.passes():
            log.info("Runner: dtype auto -> bf16 (%s)", self.agreement)
            self.model, self.head, self.dtype = bf, head, torch.bfloat16
        else:
            log.info("Runner: dtype auto -> fp32; bf16 fails the agreement rule (%s)", self.agreement)

    def _start_compile(self, background: bool) -> None:
        """Load the compiled head from the disk cache, or build it: here, or on a side thread while eager
        serves (``background``). Progress goes to the log."""
        head = _TopK(self.model, self.k, self.dtype, False)  # layouts are Inductor's choice after freezing
        name = type(self.model).__name__
        try:
            meta = aot.cache_meta(self.model, dtype=self.dtype, device=self.device, input_shape=self.input_shape,
                                  input_dtype=self.input_dtype, max_batch=self.buckets[-1], k=self.k)
            fn = aot.load_cached(meta, self._cache_dir)
        except Exception as e:  # noqa: BLE001 - e.g. an unwritable cache: serve eager
            self._compile_failed(name, e)
            return
        if fn is not None:
            self._adopt(fn, "cache", name)
            log.info("Runner: %s loaded compiled from the cache (%s)", name, self.compile_state)
            return
        t0 = time.monotonic()
        log.info("Runner: compiling %s ahead of time: exporting", name)
        g = torch.Generator().manual_seed(0)
        example = torch.randn((2, *self.input_shape), generator=g).to(self.input_dtype)
        try:
            eps = aot.export(head, example, self.buckets[-1])
        except Exception as e:  # noqa: BLE001 - an optimisation; eager always works
            self._compile_failed(name, e)
            return
        self.compile_state = "compiling"
        if background:
            log.info("Runner: compiling %s on a side thread; serving it eager until then", name)
            threading.Thread(target=self._build, args=(eps, meta, name, t0), name="aurora-compile",
                             daemon=True).start()
        else:
            self._build(eps, meta, name, t0)

    def _build(self, eps: dict, meta: dict, name: str, t0: float) -> None:
        def progress(stage):
            log.info("Runner: compiling %s: %s (%.0f s)", name, stage, time.monotonic() - t0)

        try:
            fn = aot.build(eps, meta, self._cache_dir, progress)
        except Exception as e:  # noqa: BLE001 - an optimisation; eager always works
            self._compile_failed(name, e)
            return
        self._adopt(fn, "built", name)
        log.info("Runner: %s compiled in %.0f s; serving it %s", name, time.monotonic() - t0,
                 "compiled" if self.compiled is not None else "eager")

    def _compile_failed(self, name: str, e: BaseException) -> None:
        log.warning("Runner: %s cannot be compiled ahead of time (%s: %s); running it eager", name,
                    type(e).__name__, " ".join(str(e).split())[:300])
        self.compile_state, self.compile_error = "eager", e

    def _adopt(self, fn, source: str, name: str) -> None:
        """Serve ``fn`` from now on if it agrees with eager on every bucket (random inputs): in fp32 within
        1e-3; in bf16 / fp16 its error against fp32 (the same weights) at most twice eager's plus 1e-3,
        as the preprocessing kernels are held to (compiled bf16 keeps more in fp32 than eager bf16 does)."""
        try:
            ref = None
            if self.dtype != torch.float32:
                ref = _TopK(copy.deepcopy(self.model).float(), self.k, torch.float32, self.channels_last)
            with torch.inference_mode():
                g = torch.Generator().manual_seed(1)
                for b in self.buckets:
                    x = torch.randn((b, *self.input_shape), generator=g).to(self.input_dtype)
                    # Sorted probabilities, not indices: near-ties may swap places.
                    p, e = fn(x)[0].float(), self.head(x)[0].float()
                    _check_rows(p, b)
                    if ref is None:
                        err, limit = float((p - e).abs().max()), 1e-3 * (1 + float(e.abs().max()))
                    else:
                        r = ref(x)[0]
                        err, limit = float((p - r).abs().max()), 2 * float((e - r).abs().max()) + 1e-3
                    if err > limit:
                        raise ModelError(f"Runner: the compiled {name} disagrees with eager on a batch of {b}: "
                                         f"max prob error {err:.2e}, allowed {limit:.2e}")
        except Exception as e:  # noqa: BLE001
            self._compile_failed(name, e)
            return
        self.compiled, self.compile_state, self.compile_source = fn, "compiled", source

    def wait_compiled(self, timeout: float | None = None) -> str:
        """Block until a background compile ends (or ``timeout`` s); returns compile_state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.compile_state == "compiling" and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        return self.compile_state

    def _out_features(self, x) -> int:
        out = self.model(x.to(self.dtype))
        if isinstance(out, tuple | list):
            out = out[0]
        if out.dim() != 2:
            raise ValueError(f"Runner: the model must return logits [B, classes], got shape {tuple(out.shape)}")
        return int(out.shape[1])

    @property
    def stage_stream(self):
        """The stream that stages batches (copies, device preprocessing); None on the CPU."""
        return self._side if self.is_cuda else None

    def new_slab(self, index: int) -> Slab:
        """A batch buffer sized for the largest bucket; pinned host memory on CUDA."""
        shape = (self.buckets[-1], *self.input_shape)
        host = torch.zeros(shape, dtype=self.input_dtype, pin_memory=self.is_cuda)
        dev = None
        if self.is_cuda:
            dev = torch.zeros(shape, dtype=self.input_dtype, device=self.device)
            # The side stream writes it next; PyTorch's streams do not wait for the default stream's fill.
            torch.cuda.synchronize(self.device)
        return Slab(index, host, dev)

    def warmup(self, cuda_graphs: bool = True) -> None:
        """Run every bucket once (allocator, cuDNN/oneDNN plans); on CUDA capture one graph per bucket,
        and compile + autotune the Triton preprocessing kernel when ``preprocess_spec`` was given."""
        if self.preprocess_spec is not None and not self.preprocess_warm:
            self._warmup_preprocess()
        with torch.inference_mode():
            if not self.is_cuda:
                for b in self.buckets:
                    # A model that drops or merges rows fails here, at start-up, not on every batch.
                    _check_rows(self.head(torch.zeros((b, *self.input_shape), dtype=self.input_dtype))[0], b)
                return
            self._static_in = torch.zeros((self.buckets[-1], *self.input_shape), dtype=self.input_dtype,
                                          device=self.device)
            # Warm-up on a side stream, as torch.cuda.graphs recommends before capture, after the default
            # stream's work (weights moved, buffers zeroed).
            self._compute.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._compute):
                for b in self.buckets:
                    _check_rows(self.head(self._static_in[:b])[0], b)
                    for _ in range(2):
                        self.head(self._static_in[:b])
            torch.cuda.synchronize(self.device)
            if not cuda_graphs:
                return
            pool = None
            for b in reversed(self.buckets):  # largest first so smaller graphs share its memory pool
                try:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, stream=self._compute):
                        out = self.head(self._static_in[:b])
                    pool = g.pool()
                    self._graphs[b] = (g, out)
                except Exception as e:  # capture is an optimisation: eager still serves the bucket
                    log.warning("Runner: CUDA graph capture failed for bucket %d, running eager: %s", b, e)
                    torch.cuda.synchronize(self.device)
            torch.cuda.synchronize(self.device)

    def _warmup_preprocess(self) -> None:
        """The kernel's first launch per spec compiles every autotune candidate and times them (~6 s on an
        H200); done here, before the runner reports ready, no request waits for it."""
        try:
            from aurora_core.kernels.preprocess import warmup

            with torch.cuda.device(self.device):
                warmup(self.preprocess_spec, self.device)
        except Exception as e:
            if is_sticky(e):  # the device is broken, not the kernel: nothing else would run either
                raise DeviceLost(f"Runner: sticky device error on {self.device} while warming up "
                                 f"the preprocessing kernel: {e}") from e
            log.warning("Runner: warming up the Triton preprocessing kernel on %s failed: %r", self.device, e)
            self.preprocess_error = e
            return
        self.preprocess_warm = True

    @property
    def graph_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    # ---- fault injection --------------------------------------------------------------------
    def inject_fault(self, kind: str, count: int = 1, min_rows: int = 1) -> None:
        """Make the next ``count`` model executions of >= ``min_rows`` rows fail with ``kind``:
        "oom" (torch.cuda.OutOfMemoryError) or "sticky" (an illegal-memory-access error)."""
        if kind not in ("oom", "sticky"):
            raise ValueError(f"Runner.inject_fault: kind must be 'oom' or 'sticky', got {kind!r}")
        with self._lock:
            self._faults.extend([(kind, int(min_rows))] * int(count))

    def _maybe_fault(self, rows: int) -> None:
        with self._lock:
            fault = next((f for f in self._faults if rows >= f[1]), None)
            if fault is None:
                return
            self._faults.remove(fault)
        if fault[0] == "oom":
            raise _OOM_TYPES[0]("CUDA out of memory (injected by Runner.inject_fault)")
        raise InjectedStickyError("CUDA error: an illegal memory access was encountered (injected)")

    # ---- execution --------------------------------------------------------------------------
    def stage(self, slab: Slab) -> None:
        """Start moving slab.host[:n] to the device (CUDA: async on the side stream). Called on the
        preprocessing thread so the copy overlaps the previous batch's compute."""
        if not self.is_cuda or slab.on_device:
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.device), torch.cuda.stream(self._side):
            start.record()
            slab.dev[: slab.n].copy_(slab.host[: slab.n], non_blocking=True)
            end.record()
        slab.events = {"h2d_start": start, "h2d_end": end, "ready": end}

    def stage_images(self, slab: Slab, images, spec, orig_sizes, scales) -> None:
        """CUDA: upload the decoded uint8 images (list of [H_i, W_i, 3]) and preprocess them on the device
        (Triton kernel) straight into slab.dev[:n], on the side stream. Raises when that backend fails;
        the caller then preprocesses on the CPU."""
        from aurora_core.ops.preprocess import preprocess_batch

        n = len(images)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.device), torch.cuda.stream(self._side):
            start.record()
            preprocess_batch(images, spec, out=slab.dev[:n], orig_sizes=orig_sizes, scales=scales,
                             backend="triton", device=self.device)
            end.record()
        slab.n, slab.on_device = n, True
        slab.events = {"h2d_start": start, "h2d_end": end, "ready": end}

    def run(self, slab: Slab) -> BatchOutput:
        """Top-k of rows 0..slab.n-1. OOM splits the rows; raises DeviceLost on a sticky error, ModelError
        (the model's exception as its __cause__) on any other error of the model."""
        n = slab.n
        out = BatchOutput([None] * n, [None] * n, set(), self.bucket_for(n))
        try:
            with torch.inference_mode():
                if self.is_cuda:
                    with torch.cuda.device(self.device):
                        # The compute stream must not read slab.dev before the side stream wrote it. An event
                        # rather than wait_stream: the side stream may already hold the next batch's copy.
                        self._compute.wait_event(slab.events["ready"])
                        self._run_rows(slab, 0, n, out, top=True)
                else:
                    self._run_rows(slab, 0, n, out, top=True)
        except Exception as e:
            if is_sticky(e):
                raise DeviceLost(f"Runner: sticky device error on {self.device}: {e}") from e
            if isinstance(e, AuroraError):
                raise
            raise ModelError(f"Runner: the model raised {type(e).__name__} on a batch of {n} rows "
                             "(the model's exception is this error's __cause__)") from e
        self.counters["batches"] += 1
        return out

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        return n

    def _run_rows(self, slab: Slab, lo: int, hi: int, out: BatchOutput, top: bool = False) -> None:
        try:
            probs, idx = self._execute(slab, lo, hi, out, pad=top)
        except Exception as e:
            if not is_oom(e) or is_sticky(e):
                raise
            del e  # the traceback holds the failed call's activations
            self._free()
            if hi - lo == 1:
                out.failed.add(lo)
                return
            self.counters["oom_splits"] += 1
            mid = (lo + hi) // 2
            self._run_rows(slab, lo, mid, out)
            self._run_rows(slab, mid, hi, out)
            return
        out.probs[lo:hi] = probs
        out.indices[lo:hi] = idx

    def _free(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _execute(self, slab: Slab, lo: int, hi: int, out: BatchOutput, pad: bool):
        rows = hi - lo
        self._maybe_fault(rows)
        if not self.is_cuda:
            # Pad the whole batch up to its warmed-up bucket; split retries run their rows as they are.
            b = self.bucket_for(rows) if pad and lo == 0 and self.bucket_for(rows) <= slab.host.shape[0] else rows
            x = slab.host[lo: lo + b]
            fn = self.compiled  # read once: a background compile may swap it in between batches
            t0 = now_ns()
            p, i = (fn or self.head)(x)
            _check_rows(p, b)
            p, i = p[:rows].tolist(), i[:rows].tolist()
            t1 = now_ns()
            self.counters["compiled_runs" if fn is not None else "eager_runs"] += 1
            if not out.compute_start_ns:
                out.compute_start_ns = t0
            out.compute_end_ns = t1
            return p, i
        return self._execute_cuda(slab, lo, hi, out)

    def _execute_cuda(self, slab: Slab, lo: int, hi: int, out: BatchOutput):
        rows = hi - lo
        b = self.bucket_for(rows)
        ev = {k: torch.cuda.Event(enable_timing=True) for k in ("c0", "c1", "d1")}
        with torch.cuda.stream(self._compute):
            ev["c0"].record()
            graph = self._graphs.get(b)
            if graph is not None:
                self._static_in[:rows].copy_(slab.dev[lo:hi], non_blocking=True)
                graph[0].replay()
                p_dev, i_dev = graph[1]
                self.counters["graph_replays"] += 1
            else:
                p_dev, i_dev = self.head(slab.dev[lo:hi])
                self.counters["eager_runs"] += 1
            _check_rows(p_dev, b if graph is not None else rows)
            ev["c1"].record()
            p_host = p_dev[:rows].to("cpu", non_blocking=True)
            i_host = i_dev[:rows].to("cpu", non_blocking=True)
            ev["d1"].record()
        ev["d1"].synchronize()
        t_sync = now_ns()

        # Map GPU events onto the monotonic clock: the last event completed just before t_sync.
        def at(e):
            return t_sync - int(e.elapsed_time(ev["d1"]) * 1e6)

        if not out.compute_start_ns:
            out.compute_start_ns = at(ev["c0"])
            h = slab.events
            if "h2d_start" in h:
                out.h2d_start_ns, out.h2d_end_ns = at(h["h2d_start"]), at(h["h2d_end"])
        out.compute_end_ns = at(ev["c1"])
        out.d2h_end_ns = t_sync
        return p_host.tolist(), i_host.tolist()


def _check_rows(probs: torch.Tensor, rows: int) -> None:
    """A model must return one row of logits per input row; else results would go to the wrong requests."""
    if probs.shape[0] != rows:
        raise ModelError(f"Runner: the model returned {probs.shape[0]} rows of logits for a batch of {rows} "
                         f"rows; it must return logits [B, classes] with B the input's batch size")
