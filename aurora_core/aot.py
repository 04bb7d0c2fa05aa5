"""Ahead-of-time compiled models: torch.export + AOTInductor (with freezing), cached on disk.

The runner's head (model + softmax + top-k) is exported twice and compiled by AOTInductor into two ``.pt2``
packages: one with the batch fixed at the largest bucket (the batch a saturated server runs), one with a
dynamic batch dimension (1 up to the largest bucket) for the smaller buckets. Freezing folds BatchNorm into
the convolutions and packs their weights into oneDNN's layouts; with a dynamic batch it cannot pack them at
compile time, and the convolutions reorder their weights on every call (mobilenet_v3_small at batch 16: ~5%
slower than the fixed-batch package, resnet50 ~3%). The packages are stored under ``cache_dir()/<key>/``
beside ``meta.json``, the key being a hash of: the model's classes, their source, its structure and weights,
dtype, device, input shape and dtype, largest bucket, k, the torch version and the CPU's features. A second
start with the same key loads the packages in about a second. An entry whose meta.json names another torch
version or CPU, or a package of which fails to load, is rebuilt with a warning.

A compile (both packages) costs 30-60 s of CPU on the 2-core dev box (mostly g++ on the generated
wrappers); the runner runs it on a side thread and serves eager until it is ready
(``Runner(compile="background")``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings

import torch
import torch._inductor
from torch import nn

log = logging.getLogger(__name__)

# Flags that change which kernels Inductor and oneDNN generate; the rest of /proc/cpuinfo's flags do not.
_FEATURE_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "vnni", "bmi", "popcnt")

# dynamic_threads: the generated loops take the calling thread's OpenMP thread count, as ATen's ops there
# do; by default Inductor bakes in the compiling thread's torch.get_num_threads(), which a side thread
# or another process need not share with the threads that serve.
INDUCTOR_CONFIGS = {"freezing": True, "cpp.dynamic_threads": True}

_build_lock = threading.Lock()   # one compile at a time per process: two would halve each other's CPU


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that file is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_features() -> str:
    """What the compiled code depends on: torch's CPU capability and the SIMD / matrix flags."""
    flags = sorted(f for f in cpu_flags() if f.startswith(_FEATURE_PREFIXES))
    return f"{torch.backends.cpu.get_cpu_capability()}:{','.join(flags)}"


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: oneDNN runs bf16 convolutions and matmuls natively (else it emulates)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def torch_version() -> str:
    return torch.__version__


def cache_dir() -> str:
    """``$AURORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/aurora_core/aoti`` (``~/.cache/aurora_core/aoti``)."""
    if os.environ.get("AURORA_CACHE_DIR"):
        return os.environ["AURORA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aurora_core", "aoti")


def model_identity(model: nn.Module) -> dict:
    """What makes two modules compute the same function: every class in the tree with a hash of its
    source (a changed forward() is another model), the printed structure with each module's plain
    attributes (flags, sizes), and a hash of the weights and buffers. State forward() reads outside these
    (a list, an object) is not seen: the runner's check against eager on every load is the guard there."""
    classes, plain = {}, []
    for m in model.modules():
        plain.append(sorted((k, repr(v)) for k, v in vars(m).items()
                            if not k.startswith("_") and isinstance(v, bool | int | float | str | tuple | None)))
        cls = type(m)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name not in classes:
            try:
                src = inspect.getsource(cls)
            except (OSError, TypeError):
                src = ""
            classes[name] = hashlib.blake2b(src.encode(), digest_size=8).hexdigest()
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    structure = repr(model) + repr(plain)
    return {"classes": classes, "structure": hashlib.blake2b(structure.encode(), digest_size=8).hexdigest(),
            "weights": h.hexdigest()}


def cache_meta(model: nn.Module, *, dtype: torch.dtype, device: torch.device, input_shape, input_dtype,
               max_batch: int, k: int) -> dict:
    # "aot": this module's build recipe; bumped when an entry it built before would be worse or unreadable
    # (2: frozen; 3: a fixed-batch package for the largest bucket beside the dynamic one).
    return {"aot": 3, "model": model_identity(model), "dtype": str(dtype), "device": str(device),
            "input_shape": list(input_shape), "input_dtype": str(input_dtype), "max_batch": int(max_batch),
            "k": int(k), "torch": torch_version(), "cpu": cpu_features(), "inductor": dict(INDUCTOR_CONFIGS)}


def cache_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]


def _read_meta(entry: str) -> dict | None:
    try:
        with open(os.path.join(entry, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Compiled:
    """The compiled head: the fixed-batch package runs batches of ``max_batch`` rows, the dynamic one the rest."""

    def __init__(self, full, dynamic, max_batch: int):
        self.full, self.dynamic, self.max_batch = full, dynamic, max_batch

    def __call__(self, x):
        return (self.full if x.shape[0] == self.max_batch or self.dynamic is None else self.dynamic)(x)


def _packages(max_batch: int) -> tuple[str, ...]:
    """The package names of an entry: "full" (batch fixed at max_batch) and, below it, "dynamic"."""
    return ("full", "dynamic") if max_batch > 1 else ("full",)


def _load(entry: str, max_batch: int) -> Compiled:
    pkgs = {name: _load_package(os.path.join(entry, f"{name}.pt2")) for name in _packages(max_batch)}
    return Compiled(pkgs["full"], pkgs.get("dynamic"), max_batch)


class GilFree:
    """A CPU package's model run through its C entry point (``AOTInductorModelContainerRun``) by ctypes, which
    releases the GIL for the call. torch binds the package loader's ``boxed_run`` without releasing it, so a
    serving process stalled while a batch ran (~30 ms for 16 images): its decode threads could not take their
    next image nor the HTTP thread read a request, and the 2-core machine idled 15% at saturation
    (benchmarks/RESULTS.md, issue 20). The same model container the loader makes, from the package's .so."""

    def __init__(self, so_path: str):
        import ctypes

        from torch.utils import _pytree as pytree

        self._lib, self._handle = ctypes.CDLL(so_path), ctypes.c_void_p()
        lib = self._lib
        if lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(self._handle), ctypes.c_size_t(1), b"cpu",
                                                          None) != 0:
            raise RuntimeError(f"{so_path}: the model container was not created")
        n = ctypes.c_size_t()
        in_spec, out_spec = ctypes.c_char_p(), ctypes.c_char_p()
        if (lib.AOTInductorModelContainerGetNumOutputs(self._handle, ctypes.byref(n)) != 0 or
                lib.AOTInductorModelContainerGetCallSpec(self._handle, ctypes.byref(in_spec), ctypes.byref(out_spec))):
            raise RuntimeError(f"{so_path}: no call spec")
        self._n_out, self._out_spec = n.value, pytree.treespec_loads(out_spec.value.decode())
        self._unflatten = pytree.tree_unflatten
        ptrs = ctypes.POINTER(ctypes.c_void_p)
        self._run = lib.AOTInductorModelContainerRun
        self._run.argtypes = [ctypes.c_void_p, ptrs, ctypes.c_size_t, ptrs, ctypes.c_size_t, ctypes.c_void_p,
                              ctypes.c_void_p]
        get, new = ctypes.pythonapi.PyCapsule_GetPointer, ctypes.pythonapi.PyCapsule_New
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self._get, self._new, self._ctypes = get, new, ctypes

    def __call__(self, x: torch.Tensor):
        ct, aoti = self._ctypes, torch._C._aoti
        ins = aoti.unsafe_alloc_void_ptrs_from_tensors([x])  # new handles, which the run steals
        in_arr = (ct.c_void_p * 1)(self._get(ins[0], None))
        out_arr = (ct.c_void_p * self._n_out)()
        rc = self._run(self._handle, in_arr, 1, out_arr, self._n_out, None, None)  # ctypes drops the GIL
        if rc != 0:
            raise RuntimeError(f"aot: the compiled model failed (AOTInductorModelContainerRun returned {rc})")
        outs = aoti.alloc_tensors_by_stealing_from_void_ptrs([self._new(out_arr[i], None, None)
                                                             for i in range(self._n_out)])
        return self._unflatten(outs, self._out_spec)

    def __del__(self):
        with contextlib.suppress(Exception):
            self._lib.AOTInductorModelContainerDelete(self._handle)


def _load_package(path: str):
    """``GilFree`` on the package's model where it is one .so holding its weights, without custom ops (their
    proxy executor is the loader's); else, or when that fails, torch's loader. Either way the runner checks
    the result against eager on every bucket before it serves."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            sos = [n for n in names if n.endswith(".so")]
            extern = [n for n in names if n.endswith(".json") and not n.endswith("_metadata.json")]
            weights = [n for n in names if "/data/weights/" in n or "/data/constants/" in n]
            if len(sos) == 1 and not extern and not weights:
                so = os.path.join(path + ".so.d", os.path.basename(sos[0]))
                if not os.path.exists(so):
                    os.makedirs(os.path.dirname(so), exist_ok=True)
                    tmp = f"{so}.{os.getpid()}.{threading.get_ident()}.tmp"
                    with z.open(sos[0]) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(tmp, so)
                return GilFree(so)
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile, AttributeError) as e:
        log.info("aot: %s runs through torch's loader, with the GIL held (%s)", path, e)
    return torch._inductor.aoti_load_package(path)


def load_cached(meta: dict, root: str | None = None) -> Compiled | None:
    """The compiled head for ``meta`` from the cache, or None (a miss, an entry built for another torch or
    CPU, or one whose packages do not load: each of the last two with a warning, and the entry removed)."""
    entry = os.path.join(root or cache_dir(), cache_key(meta))
    if not os.path.exists(entry):
        return None
    found = _read_meta(entry)
    if found is None or found != meta:
        if found is not None and (found.get("torch"), found.get("cpu")) != (meta["torch"], meta["cpu"]):
            why = (f"built for torch {found.get('torch')} on CPU {found.get('cpu')!r}, this is torch "
                   f"{meta['torch']} on {meta['cpu']!r}")
        else:
            why = "its meta.json is missing, unreadable or names another model"
        log.warning("aot: cache entry %s: %s; rebuilding it", entry, why)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    try:
        return _load(entry, meta["max_batch"])
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: rebuild
        log.warning("aot: cache entry %s does not load (%s: %s); rebuilding it", entry, type(e).__name__,
                    " ".join(str(e).split())[:200])
        shutil.rmtree(entry, ignore_errors=True)
        return None


def export(head: nn.Module, example: torch.Tensor, max_batch: int) -> dict:
    """torch.export of ``head`` (example: one input row or more): {"full": batch fixed at max_batch,
    "dynamic": batch 1..max_batch (only where max_batch > 1)}. Raises what torch.export raises (e.g. on
    Python control flow on tensor values). Not on a side thread while the same module serves: non-strict
    export swaps its parameters for fake tensors."""
    max_batch = int(max_batch)
    rows = example[torch.arange(max(2, max_batch)) % len(example)]
    eps = {}
    with torch.no_grad():
        eps["full"] = torch.export.export(head, (rows[:max_batch],), strict=False)
        if "dynamic" in _packages(max_batch):
            # Two rows or more in the example: torch.export specialises a dimension that is 1 there.
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            eps["dynamic"] = torch.export.export(head, (rows[:2],), dynamic_shapes=({0: batch},), strict=False)
    return eps


def build(eps: dict, meta: dict, root: str | None = None, progress=None) -> Compiled:
    """Compile export()'s ExportedPrograms with AOTInductor (freezing on), store them under their key in
    the cache and load them. Raises what Inductor raises."""
    say = progress or (lambda msg: None)
    root = root or cache_dir()
    os.makedirs(root, exist_ok=True)
    entry = os.path.join(root, cache_key(meta))
    with _build_lock:
        tmp = tempfile.mkdtemp(prefix=".build-", dir=root)
        try:
            # no_grad: Inductor freezes (folds BatchNorm, prepacks oneDNN weights) only when grad is off,
            # and grad mode is per thread (on in a fresh side thread); unfrozen, mobilenet_v3_small ran 1.2x
            # slower than the frozen TorchScript trace it replaces.
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", UserWarning)  # "No CUDA runtime is found" on CPU-only hosts
                for name, ep in eps.items():
                    say(f"compiling with AOTInductor: the {name}-batch package")
                    torch._inductor.aoti_compile_and_package(  # (it adds keys to the configs dict)
                        ep, package_path=os.path.join(tmp, f"{name}.pt2"), inductor_configs=dict(INDUCTOR_CONFIGS))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, sort_keys=True)
            shutil.rmtree(entry, ignore_errors=True)
            with contextlib.suppress(OSError):  # another process won the race: its entry is as good
                os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say("loading")
    return _load(entry, meta["max_batch"])
