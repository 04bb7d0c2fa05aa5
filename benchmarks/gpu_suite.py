#!/usr/bin/env python3
"""GPU suite: one script for target hardware (an H100/H200), run once, under a hard time budget.

    OUT=/some/dir bash benchmarks/gpu_suite.sh          # or: python3 benchmarks/gpu_suite.py --out DIR

Sections, in order of value; each is isolated (its own subprocess for GPU work, so a CUDA fault in one
does not poison the next), records its error and lets the suite go on:

  setup        install carried wheels (.wheels/, see benchmarks/fetch_wheels.sh), build and install
               aurora_core (editable, with _C)
  card         the GPU (torch properties, nvidia-smi), driver, versions
  copy_bw      device-to-device copy bandwidth ceiling (bytes read + written)
  kernels      Triton kernel (banded and dense, side by side) vs torch eager chain vs the C++ CPU kernel,
               batch 64/256/1/8 x 0.3/2.5/10 MP and a mix
  correctness  Triton kernel (both implementations, and C++) vs preprocess_ref on the sample photos, on the GPU
  sampler      the telemetry sampler's CPU cost at 10 Hz (CPU + NVML, and per source), and the Pipeline's
               throughput with the sampler off and on (benchmarks/bench_telemetry.py's functions)
  e2e          benchmarks/bench_e2e.py, resnet50 fp16, p99 <= 15 ms: Triton, Triton + nvJPEG, C++
               preprocessing side by side against the naive server, with an NVML trace recorded alongside
  decode       nvJPEG (GpuDecoder) vs CPU decode throughput
  tests        the GPU-relevant pytest subset (runs only in what the budget leaves)

Writes at most 5 files to OUT: gpu_suite.md (the table), gpu_suite.json (every number), gpu_suite.log
(all subprocess output), nvml_trace.jsonl, e2e_report.html. Results are rewritten after every section,
so a run cut short still leaves what it measured. gpu_suite.md ends with issue 16's targets, each
with its measured figure and met / NOT met.

The default budget (360 s, about 6 minutes on an H200 plus the outer timeout's slack) fits every
section; AURORA_SUITE_SELFTEST=1 runs the GPU workers' code on the CPU (Triton interpreter, tiny
images) to check the suite itself before its one GPU run: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = time.monotonic()
PY = sys.executable
MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------------
# Orchestrator


class Suite:
    def __init__(self, out: str, budget_s: float):
        self.out, self.budget = out, budget_s
        os.makedirs(out, exist_ok=True)
        self.log = open(os.path.join(out, "gpu_suite.log"), "a", buffering=1)
        self.results: dict = {"budget_s": budget_s, "argv": sys.argv, "sections": {}}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, self.env.get("PYTHONPATH")) if p)

    def left(self) -> float:
        return self.budget - (time.monotonic() - T0)

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - T0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def run(self, cmd, timeout: float, *, env=None, cwd=ROOT, quiet=False) -> tuple[int, str]:
        """Run a command with its output appended to the log; kills its whole process group on timeout."""
        timeout = max(1.0, timeout)
        self.say(f"$ {' '.join(cmd)}  (timeout {timeout:.0f}s)")
        self.log.write(f"--- begin {cmd[:3]} ---\n")
        with tempfile.TemporaryFile(mode="w+") as cap:
            p = subprocess.Popen(
                cmd,
                stdout=cap,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env or self.env,
                start_new_session=True,
            )
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = 124
            cap.seek(0)
            text = cap.read()
        self.log.write(text[-4000:] if quiet else text)
        self.log.write(f"--- end rc={rc} ---\n")
        return rc, text

    def section(self, name: str, fn, *, min_s: float, cap_s: float) -> None:
        left = self.left()
        if left < min_s:
            self.results["sections"][name] = {"skipped": f"time budget: {left:.0f}s left, needs {min_s:.0f}s"}
            self.say(f"== {name}: SKIPPED (budget)")
            self.write()
            return
        self.say(f"== {name} (cap {min(cap_s, left):.0f}s, {left:.0f}s left)")
        t = time.monotonic()
        try:
            res = fn(min(cap_s, left))
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"}
            self.log.write(traceback.format_exc())
        res["seconds"] = round(time.monotonic() - t, 1)
        self.results["sections"][name] = res
        self.say(f"   {name}: {'ERROR ' + res['error'] if 'error' in res else 'ok'} ({res['seconds']}s)")
        self.write()

    def worker(self, name: str, timeout: float, extra=()) -> dict:
        """Run one GPU section in a fresh interpreter; it writes its result as JSON."""
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        rc, text = self.run(
            [
                PY,
                os.path.abspath(__file__),
                "--worker",
                name,
                "--result",
                path,
                "--budget-s",
                str(int(timeout - 5)),
                *extra,
            ],
            timeout,
        )
        try:
            with open(path) as f:
                res = json.load(f)
        except Exception:
            res = {"error": f"worker exited rc={rc} without a result; tail: {text[-600:]}"}
        os.unlink(path)
        if rc != 0 and "error" not in res:
            res["error"] = f"worker rc={rc}" + (" (cut off: partial results)" if res.get("partial") else "")
        return res

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - T0, 1)
        with open(os.path.join(self.out, "gpu_suite.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        with open(os.path.join(self.out, "gpu_suite.md"), "w") as f:
            f.write(render_markdown(self.results))


# ---------------------------------------------------------------------------------------------------
# Orchestrator sections


def s_setup(suite: Suite, cap: float) -> dict:
    t_end = time.monotonic() + cap
    res: dict = {}
    wheels = sorted(glob.glob(os.path.join(ROOT, ".wheels", "*.whl")))
    if wheels:
        rc, _ = suite.run(
            [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels], min(90, cap)
        )
        if rc != 0:  # e.g. a read-only site-packages: install beside it
            target = "/tmp/aurora_wheels"
            rc, _ = suite.run(
                [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", target, *wheels], 90
            )
            suite.env["PYTHONPATH"] = os.pathsep.join([suite.env["PYTHONPATH"], target])
            sys.path.append(target)
        res["wheels"] = {"files": [os.path.basename(w) for w in wheels], "rc": rc}
    else:
        res["wheels"] = "no .wheels/ folder"
    rc, _ = suite.run(
        [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."],
        max(30, t_end - time.monotonic() - 30),
    )
    res["editable_install_rc"] = rc
    if rc != 0:
        rc, _ = suite.run([PY, "setup.py", "build_ext", "--inplace"], max(30, t_end - time.monotonic()))
        res["build_ext_rc"] = rc
    rc, text = suite.run(
        [
            PY,
            "-c",
            "import aurora_core._C, aurora_core.kernels.preprocess as k; print('imports ok', k.__file__)",
        ],
        60,
    )
    res["imports"] = "ok" if rc == 0 else text.strip().splitlines()[-1:] or [f"rc={rc}"]
    if rc != 0:
        res["error"] = f"aurora_core._C or aurora_core.kernels not importable: {res['imports']}"
    return res


def s_tests(suite: Suite, cap: float) -> dict:
    """This issue's GPU tests first (they must finish), then the other CUDA-touching tests in what is left."""
    import importlib.util

    t_end = time.monotonic() + cap
    common = [
        "-m",
        "pytest",
        "-q",
        "-m",
        "not slow",
        "--maxfail=10",
        "--continue-on-collection-errors",
        "-p",
        "no:cacheprovider",
    ]
    if importlib.util.find_spec("pytest_timeout"):
        common += ["--timeout", "90"]
    mine = ["tests/test_triton_preprocess.py", "tests/test_gpu_decode.py"]
    runs = [
        ("kernel_and_decode", [PY, *common, *mine], 0.5),
        (
            "runner_pipeline_other_gpu",
            [
                PY,
                *common,
                "-k",
                "cuda or gpu or triton or runner or pipeline",
                *[f"--ignore={m}" for m in mine],
                "tests",
            ],
            1.0,
        ),
    ]
    res: dict = {}
    errors = []
    for label, cmd, share in runs:
        left = t_end - time.monotonic()
        if left < 10:
            res[label] = {"skipped": "time budget"}
            continue
        rc, text = suite.run(cmd, left * share)
        lines = text.strip().splitlines()
        summary = [ln for ln in lines if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        res[label] = {
            "rc": rc,
            "summary": summary[-1] if summary else (lines[-1:] or ["no output"])[0],
            "failed": failed[:20],
        }
        if rc not in (0, 5):
            errors.append(f"{label}: pytest rc={rc}: {res[label]['summary']}")
    res["summary"] = "; ".join(f"{k}: {v.get('summary', v.get('skipped'))}" for k, v in res.items())
    res["failed"] = [ln for v in res.values() if isinstance(v, dict) for ln in v.get("failed", [])]
    if errors:
        res["error"] = "; ".join(errors)
    return res


def _e2e_flags(help_text: str) -> tuple[str | None, list[str], list[str]]:
    """(flag, args for GPU preprocessing, args for CPU preprocessing), read off bench_e2e's --help."""
    for on, off in (
        ("--gpu-preprocess", "--cpu-preprocess"),
        ("--device-preprocess", "--no-device-preprocess"),
    ):
        if off in help_text:
            return off, ([on] if on in help_text else []), [off]
    for flag in (
        "--preprocess-device",
        "--preprocess-on",
        "--preprocess-backend",
        "--preprocess",
        "--device-preprocess",
    ):
        m = re.search(re.escape(flag) + r"[ =]\{([^}]*)\}", help_text)
        if re.search(re.escape(flag) + r"\b(?!-)", help_text):
            choices = [c.strip() for c in re.split(r"[,|]", m.group(1))] if m else []
            gpu = next((c for c in ("cuda", "gpu", "triton", "on", "true", "1") if c in choices), None)
            cpu = next((c for c in ("cpu", "cpp", "off", "false", "0") if c in choices), None)
            if gpu is None or cpu is None:  # no choices listed: guess from the flag's name
                gpu, cpu = ("triton", "cpp") if "backend" in flag else ("cuda", "cpu")
            return flag, [flag, gpu], [flag, cpu]
    return None, [], []


def s_e2e(suite: Suite, cap: float) -> dict:
    script = os.path.join(ROOT, "benchmarks", "bench_e2e.py")
    if not os.path.exists(script):
        return {"error": "benchmarks/bench_e2e.py not found"}
    rc, help_text = suite.run([PY, script, "--help"], 60)
    flag, gpu_args, cpu_args = _e2e_flags(help_text)
    extra = []
    if "--duration" in help_text and os.environ.get("AURORA_E2E_DURATION"):
        extra += ["--duration", os.environ["AURORA_E2E_DURATION"]]
    base = [
        PY,
        script,
        "--device",
        "cuda",
        "--model",
        "resnet50",
        "--dtype",
        "fp16",
        "--slo-ms",
        "15",
        *extra,
    ]
    res: dict = {"preprocess_flag": flag or "none found in --help: CPU-preprocessing variant not run"}
    # The naive server's rate does not depend on aurora's variant: measured in the first run only.
    once = ["--no-naive"] if "--no-naive" in help_text else []
    runs = [("gpu_preprocess", gpu_args)]
    if "--gpu-decode" in help_text:
        runs.append(("gpu_decode", gpu_args + ["--gpu-decode", "on"] + once))
    if flag:
        runs.append(("cpu_preprocess", cpu_args + once))

    trace = os.path.join(suite.out, "nvml_trace.jsonl")
    t_end = time.monotonic() + cap - 15  # keep time to collect the telemetry trace
    # Start the 20 s NVML trace once the model is loaded and warm, while the probes load the GPU.
    tele: dict = {}
    timer = threading.Timer(
        float(os.environ.get("AURORA_TELEMETRY_DELAY_S", "20")),
        lambda: tele.update(p=_start_telemetry(suite, trace)),
    )
    timer.start()
    for i, (label, args) in enumerate(runs):
        # Runs that do not fit at 30 s each are dropped from the end of the list, not the start: the first
        # run is the main result.
        left = t_end - time.monotonic()
        fit = min(len(runs) - i, int(left // 30))
        if fit < 1:
            res[label] = {"skipped": f"{left:.0f}s left"}
            continue
        per_run = left / fit
        outdir = tempfile.mkdtemp(prefix=f"e2e_{label}_")
        # bench_e2e's --out is the JSON summary file; a directory-style --out is given a file inside it.
        out_arg = os.path.join(outdir, "e2e.json") if _out_is_file(help_text) else outdir
        # bench_e2e bounds its own bisection; give it the slot minus start-up and model load.
        budget = ["--budget-s", f"{max(20.0, per_run - 25):.0f}"] if "--budget-s" in help_text else []
        rc, text = suite.run(base + ["--out", out_arg] + args + budget, per_run)
        res[label] = {
            "rc": rc,
            "cmd": " ".join(base[1:] + ["--out", out_arg] + args + budget),
            "stdout_tail": text[-3000:],
        }
        res[label]["files"] = _collect_jsons(outdir)
        html = sorted(glob.glob(os.path.join(outdir, "**", "*.html"), recursive=True))
        if html and label == "gpu_preprocess":
            shutil.copy(html[0], os.path.join(suite.out, "e2e_report.html"))
        if rc != 0:
            res.setdefault("error", f"{label}: bench_e2e rc={rc}")
    timer.cancel()
    timer.join()
    res["telemetry"] = _finish_telemetry(suite, tele.get("p"), trace)
    return res


def _out_is_file(help_text: str) -> bool:
    m = re.search(r"^\s+--out\s+\S+\s+(.*)$", help_text, re.M)
    return bool(m and re.search(r"json|file", m.group(1), re.I) and not re.search(r"dir", m.group(1), re.I))


def _collect_jsons(outdir: str) -> dict:
    got = {}
    for path in sorted(glob.glob(os.path.join(outdir, "**", "*.json"), recursive=True)):
        if os.path.getsize(path) < 300_000:
            try:
                with open(path) as f:
                    got[os.path.relpath(path, outdir)] = json.load(f)
            except Exception as e:
                got[os.path.relpath(path, outdir)] = f"unreadable: {e}"
    return got


def _start_telemetry(suite: Suite, trace: str):
    cmd = [PY, "-m", "aurora_core.cli", "telemetry", "record", "--out", trace, "--duration", "20"]
    suite.say("$ " + " ".join(cmd) + "  (background)")
    try:
        cap = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(
            cmd, stdout=cap, stderr=subprocess.STDOUT, cwd=ROOT, env=suite.env, start_new_session=True
        )
        return proc, cap
    except Exception as e:
        suite.say(f"telemetry not started: {e}")
        return None


def _finish_telemetry(suite: Suite, started, trace: str) -> dict:
    if started is None:
        return {"error": "not started"}
    proc, cap = started
    try:
        rc = proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = 124
    cap.seek(0)
    text = cap.read()
    cap.close()
    suite.log.write("--- telemetry record ---\n" + text + f"--- end rc={rc} ---\n")
    res: dict = {"rc": rc}
    m = re.search(r"sampler CPU time .*", text)
    if m:
        res["sampler_overhead"] = m.group(0)
    res["missing"] = [ln[8:] for ln in text.splitlines() if ln.startswith("missing ")][:30]
    if not os.path.exists(trace):
        res["error"] = f"no trace written (rc={rc}): {text.strip()[-300:]}"
        return res
    rc2, samples = suite.run(
        [PY, "-m", "aurora_core.cli", "telemetry", "replay", trace, "--json"], 60, quiet=True
    )
    res.update(summarize_samples(samples))
    return res


def summarize_samples(text: str) -> dict:
    """Min/max/mean of the interesting metrics in `aurora telemetry replay --json` output."""
    vals: dict[str, list[float]] = {}
    n = 0
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        values = rec.get("values") if isinstance(rec, dict) else None
        if not isinstance(values, dict):
            continue
        n += 1
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                vals.setdefault(k, []).append(float(v))
    out: dict = {"samples": n}
    for k in (
        "sm_clock_mhz",
        "sm_clock_max_mhz",
        "mem_clock_mhz",
        "temp_c",
        "temp_margin_c",
        "power_w",
        "power_limit_w",
        "util_gpu_busy_pct",
        "throttle_frac_power",
        "throttle_frac_thermal",
        "throttle_frac_hw_slowdown",
        "mem_used_bytes",
        "pcie_rx_bytes_s",
        "pcie_tx_bytes_s",
    ):
        if k in vals:
            v = vals[k]
            out[k] = {"min": min(v), "max": max(v), "mean": round(sum(v) / len(v), 3)}
    return out


# ---------------------------------------------------------------------------------------------------
# Workers (each runs in its own interpreter)


def _kernel_module():
    import importlib

    try:
        return importlib.import_module("aurora_core.kernels.preprocess")
    except ImportError:
        import importlib.util

        for name, path in (
            ("aurora_core.kernels", "kernels/__init__.py"),
            ("aurora_core.kernels.preprocess", "kernels/preprocess.py"),
        ):
            spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        return sys.modules["aurora_core.kernels.preprocess"]


# AURORA_SUITE_SELFTEST=1 runs the workers' code on the CPU (Triton interpreter, tiny images and spec)
# so that the suite's own logic is tested before its one run on a GPU. Its numbers mean nothing.
SELFTEST = os.environ.get("AURORA_SUITE_SELFTEST") == "1"
DEV = "cpu" if SELFTEST else "cuda"


def _spec(**kw):
    from aurora_core.ops.preprocess import PreprocessSpec

    return PreprocessSpec(resize=16, crop=12, **kw) if SELFTEST else PreprocessSpec(**kw)


def _sync():
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def _bench(fn, rep_ms=200):
    """Median ms over repeats, timed with CUDA events, L2 flushed between repeats (triton's do_bench)."""
    if SELFTEST:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def w_card(budget: float) -> dict:
    import torch

    res: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        res["triton"] = triton.__version__
    except Exception as e:
        res["triton"] = f"unavailable: {e}"
    try:
        import torchvision

        res["torchvision"] = torchvision.__version__
    except Exception as e:
        res["torchvision"] = f"unavailable: {e}"
    if not torch.cuda.is_available():
        res["error"] = "torch.cuda.is_available() is False"
        return res
    p = torch.cuda.get_device_properties(0)
    res.update(
        name=p.name,
        sm_count=p.multi_processor_count,
        mem_gib=round(p.total_memory / GiB, 1),
        capability=f"{p.major}.{p.minor}",
        l2_mib=round(getattr(p, "L2_cache_size", 0) / MiB, 1),
    )
    try:
        q = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit,pcie.link.gen.max,pcie.link.width.max",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        res["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except Exception as e:
        res["nvidia_smi"] = f"failed: {e}"
    res["cpu_count"] = os.cpu_count()
    return res


def w_copy_bw(budget: float) -> dict:
    import torch

    n = 2 * GiB
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a), rep_ms=300)
    return {"bytes": n, "ms": round(ms, 4), "gbps": round(2 * n / ms / 1e6, 1), "note": "read + written"}


def _photos():
    """Decoded sample photos by size class: (label, uint8 [H, W, 3])."""
    from aurora_core.decode import decode
    from aurora_core.samples import sample_bytes

    if SELFTEST:
        img = decode(sample_bytes("0.3mp"))
        return [("a", img[:40, :50].copy()), ("b", img[:90, :70].copy()), ("c", img[:33, :200].copy())]
    return [
        ("0.3MP", decode(sample_bytes("0.3mp"))),
        ("2.5MP", decode(sample_bytes("2.5mp"))),
        ("10MP", decode(sample_bytes("10mp"))),
    ]


def _footprint(K, shape, geo_row, crop):
    """Source bytes the crop's filter window reads (rows x cols x 3), as the kernel computes it."""
    h, w = shape
    top, left, rh, rw, sy, sx = geo_row
    fy, fx = max(sy, 1.0), max(sx, 1.0)
    y0, y1 = max(top, 0), min(top + crop, rh) - 1
    x0, x1 = max(left, 0), min(left + crop, rw) - 1
    r_lo, r_hi = max(int((y0 + 0.5) * sy - fy + 0.5), 0), min(int((y1 + 0.5) * sy + fy + 0.5) + 1, h)
    c_lo, c_hi = max(int((x0 + 0.5) * sx - fx + 0.5), 0), min(int((x1 + 0.5) * sx + fx + 0.5) + 1, w)
    return (r_hi - r_lo) * (c_hi - c_lo) * 3


# The copy ceiling of the first H200 run (benchmarks/RESULTS.md, run 1): used for "% of copy" when the
# copy_bw section is skipped and AURORA_COPY_GBPS is not set. Only meaningful on that card.
RUN1_H200_COPY_GBPS = 4273.0
# The kernels worker stops starting new cases this many seconds before its budget ends, so that the
# correctness worker after it (which compiles and tunes float32 kernels of both implementations) still
# finds its time in a tight suite budget (e.g. AURORA_SUITE_BUDGET_S=170 with copy_bw/e2e skipped).
KERNELS_RESERVE_S = 45.0


def _impls(K) -> tuple[str, ...]:
    return tuple(getattr(K, "IMPLS", ("dense",)))


def w_kernels(budget: float) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from aurora_core.ops.preprocess import preprocess_batch

    t_end = time.monotonic() + budget
    K = _kernel_module()
    impls = _impls(K)
    spec = _spec(dtype=torch.float16)
    dev = torch.device(DEV)
    mean = torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=dev).view(1, 3, 1, 1)
    max_bytes = int(os.environ.get("AURORA_SUITE_MAX_INPUT_GIB", "3")) * GiB
    rows, notes = [], []
    ceiling = float(os.environ.get("AURORA_COPY_GBPS", "0")) or None
    ceiling_src = "copy_bw section of this run" if ceiling else None
    if ceiling is None and not SELFTEST:
        ceiling, ceiling_src = (
            RUN1_H200_COPY_GBPS,
            "from run 1 (H200, benchmarks/RESULTS.md): not measured here",
        )
        notes.append(f"% of copy uses {ceiling:.0f} GB/s {ceiling_src}")

    if not SELFTEST:
        working = []
        for impl in impls:
            t = time.monotonic()
            try:
                K.warmup(spec, DEV, **({"impl": impl} if len(impls) > 1 else {}))  # compile + autotune once
                working.append(impl)
                notes.append(f"{impl}: compile + autotune {time.monotonic() - t:.1f}s")
            except Exception as e:  # one implementation failing must not cost the other's numbers
                traceback.print_exc()
                notes.append(f"{impl}: warmup FAILED, not timed: {type(e).__name__}: {e}"[:300])
        if not working:
            raise RuntimeError("; ".join(notes))
        impls = tuple(working)
    photos = _photos()
    mixed = [photos[i][1] for i in (0, 0, 0, 0, 0, 0, 1, 2)]  # the default request mix's sizes
    cases = [(label, [img]) for label, img in photos] + [("mix 6x0.3+2.5+10MP", mixed)]
    # Large batches first: they carry the targets; batch 1 shows the launch-bound end; 8 goes last, the
    # first to fall to the time budget.
    plan = [
        (label, pattern, b) for b in ((1, 8) if SELFTEST else (64, 256, 1, 8)) for label, pattern in cases
    ]
    for label, pattern, batch in plan:
        if time.monotonic() > t_end - max(10.0, min(KERNELS_RESERVE_S, budget / 3)):
            notes.append(f"stopped before {label} x{batch}: time budget")
            break
        imgs = [pattern[i % len(pattern)] for i in range(batch)]
        nbytes = sum(im.nbytes for im in imgs)
        row = {"case": label, "batch": batch, "input_mb": round(nbytes / 1e6, 1)}
        rows.append(row)
        if nbytes > max_bytes:
            row["skipped"] = f"input {nbytes / GiB:.1f} GiB > cap {max_bytes / GiB:.0f} GiB"
            continue
        try:
            _bench_case(K, impls, spec, imgs, row, dev, mean, std, F, preprocess_batch, np, torch, ceiling)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        _save_partial({"rows": rows, "notes": notes})
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return {
        "rows": rows,
        "notes": notes,
        "spec": "resize 256, crop 224, fp16 out",
        "copy_gbps": ceiling,
        "copy_gbps_source": ceiling_src,
        "impls": list(impls),
        "default_impl": K.impl_name() if hasattr(K, "impl_name") else "dense",
    }


def _bench_case(K, impls, spec, imgs, row, dev, mean, std, F, preprocess_batch, np, torch, ceiling):
    crop, batch = spec.crop, len(imgs)
    shapes = [im.shape[:2] for im in imgs]
    geo = K._geometry(shapes, spec, None, None)
    # Distinct device copies of every image: no image is served from L2 because its twin was just read.
    packed = torch.cat([torch.from_numpy(im).reshape(-1) for im in imgs]).to(dev)
    if hasattr(K, "wide_readable"):  # aligned and padded once here, not inside every timed launch
        packed = K.wide_readable(packed)
    offsets = np.cumsum([0] + [im.nbytes for im in imgs[:-1]]).tolist()
    strides = [(3 * s[1], 3, 1) for s in shapes]
    out = torch.empty((batch, 3, crop, crop), dtype=spec.dtype, device=dev)
    ip, fp = K.make_params(offsets, strides, shapes, geo, dev)
    foot = sum(_footprint(K, s, g, crop) for s, g in zip(shapes, geo, strict=True))
    moved = foot + out.numel() * out.element_size()
    row["bytes_moved_mb"] = round(moved / 1e6, 2)
    default = K.impl_name() if hasattr(K, "impl_name") else impls[0]
    default = default if default in impls else impls[0]  # the default may have failed its warmup
    results = {}
    for impl in impls:
        kw = {"impl": impl} if len(impls) > 1 else {}
        out.fill_(float("nan"))
        K.launch_params(packed, ip, fp, spec, out, **kw)  # autotunes on the first call per key
        _sync()
        if torch.isnan(out).any():
            raise RuntimeError(f"Triton kernel ({impl}) left output unwritten")
        results[impl] = out.clone()
        t = _bench(lambda kw=kw: K.launch_params(packed, ip, fp, spec, out, **kw))
        row[f"{impl}_ms"] = round(t, 4)
        row[f"{impl}_gbps"] = round(moved / t / 1e6, 1)
        if ceiling:
            row[f"{impl}_pct_copy"] = round(100 * moved / t / 1e6 / ceiling, 1)
    # The default implementation's figures under the names the report's target line reads.
    t_tri = row[f"{default}_ms"]
    row.update(triton_impl=default, triton_ms=t_tri, triton_gbps=row[f"{default}_gbps"])
    if ceiling:
        row["pct_copy_bw"] = row[f"{default}_pct_copy"]
    tri_ref = results[default]
    if len(results) > 1:
        a, b = (results[i].float() for i in impls[:2])
        row[f"{impls[0]}_vs_{impls[1]}_max_levels"] = round(float((a - b).abs().max()) * 0.229 * 255, 2)

    # The whole call from host arrays: validation, packing, one H2D copy, tables, launch.
    if batch <= 64 and packed.numel() <= 600 * MiB:
        t_host = _bench(lambda: K.preprocess_batch_triton(imgs, spec, out=out), rep_ms=300)
        row["triton_from_host_ms"] = round(t_host, 3)

    # Torch eager chain on the device: float, antialiased interpolate, slice, normalize, cast. Images of
    # one size are stacked (chunks of <= 1 GiB of float input): eager's best case.
    views = [
        packed[o : o + s[0] * s[1] * 3].view(s[0], s[1], 3) for o, s in zip(offsets, shapes, strict=True)
    ]

    def eager():
        i = 0
        while i < batch:
            h, w = shapes[i]
            j = i + 1
            limit = max(1, GiB // (h * w * 3 * 4))
            while j < batch and shapes[j] == (h, w) and j - i < limit:
                j += 1
            x = torch.stack(views[i:j]).permute(0, 3, 1, 2).float()
            top, left, rh, rw, _, _ = geo[i]
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            x = x[:, :, top : top + crop, left : left + crop]
            out[i:j] = ((x / 255.0 - mean) / std).to(spec.dtype)
            i = j

    t_eager = _bench(eager)
    row.update(eager_ms=round(t_eager, 3), speedup_vs_eager=round(t_eager / t_tri, 2))
    for impl in impls:
        row[f"{impl}_vs_eager"] = round(t_eager / row[f"{impl}_ms"], 2)
    # Eager does not round to uint8 between passes or before normalizing; it agrees to a few levels.
    row["eager_vs_triton_max_levels"] = round(
        float((out.float() - tri_ref.float()).abs().max()) * 0.229 * 255, 2
    )

    if batch <= 64:
        try:
            host_out = torch.empty((batch, 3, crop, crop), dtype=spec.dtype)
            preprocess_batch(imgs, spec, out=host_out, backend="cpp")
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or (time.perf_counter() - t0 < 1.0 and reps < 20):
                preprocess_batch(imgs, spec, out=host_out, backend="cpp")
                reps += 1
            t_cpp = (time.perf_counter() - t0) / reps * 1e3
            row.update(cpp_cpu_ms=round(t_cpp, 3), speedup_vs_cpp=round(t_cpp / t_tri, 1))
        except Exception as e:
            row["cpp_cpu_ms"] = f"error: {type(e).__name__}: {e}"[:200]


def w_correctness(budget: float) -> dict:
    import numpy as np
    import torch

    from aurora_core.decode import decode_ex
    from aurora_core.ops.preprocess import fast_min_size, preprocess_batch, preprocess_ref
    from aurora_core.samples import SAMPLES, sample_bytes

    K = _kernel_module()
    impls = _impls(K)
    spec = _spec()
    scale255 = np.array(spec.std)[:, None, None] * 255
    rows = []
    worst = {impl: 0.0 for impl in impls}
    batch_imgs, batch_refs = [], []

    def kw(impl):
        return {"impl": impl} if len(impls) > 1 else {}

    for name in ("0.3mp", "coffee_png") if SELFTEST else SAMPLES:
        data = sample_bytes(name)
        for mode in ("exact", "fast"):
            d = decode_ex(data)
            if mode == "fast":
                d = decode_ex(data, min_size=fast_min_size(d.orig_size, spec))
            ref = preprocess_ref(d.image, spec, orig_size=d.orig_size, scale=d.scale).numpy()
            row = {"image": name, "mode": mode, "size": list(d.image.shape[:2]), "scale": d.scale}
            for impl in impls:
                try:
                    got = K.preprocess_batch_triton(
                        [d.image], spec, orig_sizes=[d.orig_size], scales=[d.scale], device=DEV, **kw(impl)
                    )
                except Exception as e:  # recorded as a failure of this implementation; the other goes on
                    traceback.print_exc()
                    row[f"{impl}_max_levels"] = f"error: {type(e).__name__}: {e}"[:160]
                    worst[impl] = math.inf
                    continue
                err = np.abs(got[0].cpu().numpy() - ref) * scale255
                row[f"{impl}_max_levels"] = round(float(err.max()), 3)
                row[f"{impl}_frac_off"] = round(float((err > 0.5).mean()), 4)
                worst[impl] = max(worst[impl], float(err.max()))
            try:
                cpp = preprocess_batch(
                    [d.image], spec, orig_sizes=[d.orig_size], scales=[d.scale], backend="cpp"
                )
                row["cpp_max_levels"] = round(float((np.abs(cpp[0].numpy() - ref) * scale255).max()), 3)
            except Exception as e:
                row["cpp_max_levels"] = f"error: {type(e).__name__}: {e}"[:160]
            rows.append(row)
            _save_partial({"rows": rows, "worst_single_levels": round(max(worst.values()), 3)})
            batch_imgs.append(d)
            batch_refs.append(ref)
    # All of them in one launch, mixed sizes and scales, as CUDA tensors (the GPU-decode path).
    mixed = {}
    for impl in impls:
        if worst[impl] == math.inf:
            mixed[impl] = math.inf
            continue
        got = K.preprocess_batch_triton(
            [torch.from_numpy(d.image).to(DEV) for d in batch_imgs],
            spec,
            orig_sizes=[d.orig_size for d in batch_imgs],
            scales=[d.scale for d in batch_imgs],
            **kw(impl),
        )
        mixed[impl] = max(
            float((np.abs(g.cpu().numpy() - r) * scale255).max())
            for g, r in zip(got, batch_refs, strict=True)
        )
    res = {
        "rows": rows,
        "impls": list(impls),
        "worst_single_levels": round(max(worst.values()), 3),
        "mixed_batch_worst_levels": round(max(mixed.values()), 3),
        "per_impl": {
            i: {"worst_single": round(worst[i], 3), "mixed_batch": round(mixed[i], 3)} for i in impls
        },
        "bound_levels": 1.0,
    }
    bad = {i: max(worst[i], mixed[i]) for i in impls if max(worst[i], mixed[i]) > 1.0 + 1e-3}
    if bad:
        res["error"] = "Triton kernel off by more than 1 level: " + ", ".join(
            f"{i} {v:.3f}" for i, v in bad.items()
        )
    return res


def _pil_chw(tensors, device):
    """Selftest stand-in for nvJPEG (PIL, [3, H, W]); never used on a GPU."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    return [
        torch.from_numpy(np.asarray(Image.open(io.BytesIO(t.numpy().tobytes())).convert("RGB")).copy())
        .permute(2, 0, 1)
        .contiguous()
        for t in tensors
    ]


def w_decode(budget: float) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from aurora_core.decode import decode, decode_ex
    from aurora_core.gpu_decode import GpuDecoder, nvjpeg_available
    from aurora_core.ops.preprocess import preprocess_batch
    from aurora_core.samples import default_mix, sample_bytes

    K = _kernel_module()
    spec = _spec(dtype=torch.float16)
    res: dict = {"nvjpeg_available": nvjpeg_available("cuda")}
    sets = {
        "mix (default_mix x8)": default_mix() * 8,
        "10MP x16": [sample_bytes("10mp")] * 16,
        "0.3MP x64": [sample_bytes("0.3mp")] * 64,
    }
    if SELFTEST:
        import io

        from PIL import Image

        b = io.BytesIO()
        Image.fromarray(decode(sample_bytes("0.3mp"))[:40, :50]).save(b, format="JPEG")
        sets = {"selftest 2 tiny": [b.getvalue(), sample_bytes("coffee_png")]}
    dec = GpuDecoder("cuda") if not SELFTEST else GpuDecoder("cpu", nvjpeg=_pil_chw)
    rows = []
    for label, datas in sets.items():
        row = {"set": label, "images": len(datas)}
        head = datas[:8]
        mp = sum(a.shape[0] * a.shape[1] for a in map(decode, head)) / len(head) * len(datas) / 1e6
        dec.decode_batch(datas)  # warm-up: nvJPEG handles, pinned buffers
        _sync()
        t0, reps = time.perf_counter(), 0
        while reps < 3 or (time.perf_counter() - t0 < 1.5 and reps < 20):
            dec.decode_batch(datas)
            _sync()
            reps += 1
        t_gpu = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for d in datas:
            decode(d)
        t_cpu1 = time.perf_counter() - t0
        workers = min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(decode, datas))
            t0 = time.perf_counter()
            list(ex.map(decode, datas))
            t_cpuN = time.perf_counter() - t0
        row.update(
            gpu_img_s=round(len(datas) / t_gpu, 1),
            gpu_mp_s=round(mp / t_gpu, 1),
            cpu_1thread_img_s=round(len(datas) / t_cpu1, 1),
            cpu_threads=workers,
            cpu_threads_img_s=round(len(datas) / t_cpuN, 1),
        )
        # Bytes to model-ready batch: nvJPEG + Triton kernel vs threaded CPU decode + the C++ kernel.
        try:
            out = torch.empty((len(datas), 3, spec.crop, spec.crop), dtype=spec.dtype, device=DEV)

            def gpu_full(datas=datas, out=out):
                r = dec.decode_batch(datas)
                K.preprocess_batch_triton(
                    [x.image for x in r],
                    spec,
                    out=out,
                    orig_sizes=[x.orig_size for x in r],
                    scales=[x.scale for x in r],
                )
                _sync()

            def cpu_full(datas=datas):
                ds = list(ex2.map(decode_ex, datas))
                preprocess_batch(
                    [d.image for d in ds],
                    spec,
                    orig_sizes=[d.orig_size for d in ds],
                    scales=[d.scale for d in ds],
                    backend="cpp",
                )

            with ThreadPoolExecutor(workers) as ex2:
                for name, fn in (
                    ("gpu_decode_preprocess_img_s", gpu_full),
                    ("cpu_decode_preprocess_img_s", cpu_full),
                ):
                    fn()
                    t0, reps = time.perf_counter(), 0
                    while reps < 2 or (time.perf_counter() - t0 < 1.0 and reps < 10):
                        fn()
                        reps += 1
                    row[name] = round(len(datas) * reps / (time.perf_counter() - t0), 1)
        except Exception as e:
            row["full_path_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        _save_partial({"rows": rows})
    res["rows"] = rows
    res["stats"] = dec.stats
    return res


def _bench_module(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"_suite_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def w_sampler(budget: float) -> dict:
    """Issue 16's sampler targets: CPU + NVML at 10 Hz costs <= 1% of one core, and the Pipeline's
    throughput with the sampler on is within noise of it off (noise: the spread of the off rounds)."""
    import statistics

    bt = _bench_module("bench_telemetry")
    seconds, per_source = (1.0, 0.5) if SELFTEST else (10.0, 3.0)
    res: dict = {"period_s": 0.1}
    res["combined"] = bt.sampler_overhead(seconds, 0.1)
    with_gpu = any(src.startswith("gpu") for src in res["combined"]["sources"])
    if not with_gpu and not SELFTEST:
        res["error"] = f"no GPU source sampled (sources {res['combined']['sources']}): NVML not working"
    res["breakdown"] = bt.source_breakdown(per_source, 0.1, with_gpu)
    _save_partial(res)
    requests, rounds = (8, 1) if SELFTEST else (480, 7)
    t = bt.pipeline_throughput(requests, rounds, 0.1)
    off = t["off_all"]
    t["noise_pct"] = 100 * (max(off) - min(off)) / statistics.median(off)
    t["within_noise"] = abs(t["change_pct"]) <= t["noise_pct"]
    res["throughput"] = t
    return res


WORKERS = {
    "sampler": w_sampler,
    "card": w_card,
    "copy_bw": w_copy_bw,
    "kernels": w_kernels,
    "correctness": w_correctness,
    "decode": w_decode,
}


_RESULT_PATH: str | None = None


def _save_partial(res: dict) -> None:
    """Write what a worker has so far: a worker killed at its deadline still reports its rows."""
    if _RESULT_PATH:
        with open(_RESULT_PATH, "w") as f:
            json.dump({**res, "partial": True}, f, default=str)


def run_worker(name: str, result_path: str, budget: float) -> int:
    global _RESULT_PATH
    _RESULT_PATH = result_path
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    try:
        res = WORKERS[name](budget)
    except Exception as e:
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"[:500]}
    with open(result_path, "w") as f:
        json.dump(res, f, default=str)
    return 0


# ---------------------------------------------------------------------------------------------------
# Report


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    s = results.get("sections", {})
    card = s.get("card", {})
    out = ["# aurora_core GPU suite", ""]
    out.append(
        f"Card: **{card.get('name', '?')}** ({card.get('sm_count', '?')} SMs, {card.get('mem_gib', '?')} GiB, "
        f"L2 {card.get('l2_mib', '?')} MiB); nvidia-smi: {card.get('nvidia_smi', '?')}; torch {card.get('torch', '?')}, "
        f"CUDA {card.get('cuda', '?')}, triton {card.get('triton', '?')}, torchvision {card.get('torchvision', '?')}. "
        f"Elapsed {results.get('elapsed_s')} s of a {results.get('budget_s')} s budget."
    )
    out += [
        "",
        "## Sections",
        "",
        _table(
            [
                {
                    "section": k,
                    "status": ("skipped: " + v["skipped"])
                    if "skipped" in v
                    else ("ERROR: " + v["error"])
                    if "error" in v
                    else "ok",
                    "seconds": v.get("seconds"),
                }
                for k, v in s.items()
            ],
            ["section", "status", "seconds"],
        ),
    ]
    bw = s.get("copy_bw", {})
    if "gbps" in bw:
        out += ["", f"Copy bandwidth ceiling (device-to-device, read + written): **{bw['gbps']} GB/s**."]
    k = s.get("kernels", {})
    if k.get("rows"):
        out += [
            "",
            f"## Preprocessing kernels ({k.get('spec')})",
            "",
            "GB/s and % count the source bytes the crop's filter window reads plus the output written; "
            "times are medians of CUDA-event timings with L2 flushed (triton.testing.do_bench). "
            "eager = torch float F.interpolate(antialias) + slice + normalize + cast, same-size images stacked. "
            "cpp = the C++ CPU kernel on all host cores.",
            "",
            _table(
                k["rows"],
                [
                    "case",
                    "batch",
                    "input_mb",
                    "banded_ms",
                    "banded_gbps",
                    "banded_pct_copy",
                    "dense_ms",
                    "dense_gbps",
                    "dense_pct_copy",
                    "banded_vs_dense_max_levels",
                    "eager_ms",
                    "banded_vs_eager",
                    "dense_vs_eager",
                    "triton_from_host_ms",
                    "cpp_cpu_ms",
                    "speedup_vs_cpp",
                    "skipped",
                    "error",
                ],
            ),
        ]
        if k.get("notes"):
            out += ["", "Notes: " + "; ".join(k["notes"])]
        out += [
            "",
            f"Copy ceiling {k.get('copy_gbps')} GB/s ({k.get('copy_gbps_source')}); from-host, cpp and the "
            f"target line below use the default implementation ({k.get('default_impl')}).",
        ]
        big = [r for r in k["rows"] if r.get("batch", 0) >= 64 and isinstance(r.get("triton_ms"), float)]
        if big:
            pct = [r["pct_copy_bw"] for r in big if isinstance(r.get("pct_copy_bw"), float)]
            spd = [r["speedup_vs_eager"] for r in big if isinstance(r.get("speedup_vs_eager"), float)]
            out += [
                "",
                "Targets on batches >= 64 (measured above, not estimated): "
                f"% of copy bandwidth min {min(pct) if pct else 'n/a'} / max {max(pct) if pct else 'n/a'} "
                f"(target >= 70); speedup vs eager min {min(spd) if spd else 'n/a'} (target >= 3).",
            ]
    c = s.get("correctness", {})
    if c.get("rows"):
        out += [
            "",
            f"## Correctness vs preprocess_ref (uint8 levels; bound {c.get('bound_levels')})",
            "",
            f"worst single image {c.get('worst_single_levels')}, one mixed launch {c.get('mixed_batch_worst_levels')}",
            "",
            _table(
                c["rows"],
                [
                    "image",
                    "mode",
                    "size",
                    "scale",
                    "banded_max_levels",
                    "banded_frac_off",
                    "dense_max_levels",
                    "dense_frac_off",
                    "cpp_max_levels",
                ],
            ),
        ]
    d = s.get("decode", {})
    if d.get("rows"):
        out += [
            "",
            f"## Decode throughput (nvJPEG available: {d.get('nvjpeg_available')}; routed {d.get('stats')})",
            "",
            _table(
                d["rows"],
                [
                    "set",
                    "images",
                    "gpu_img_s",
                    "gpu_mp_s",
                    "cpu_1thread_img_s",
                    "cpu_threads",
                    "cpu_threads_img_s",
                    "gpu_decode_preprocess_img_s",
                    "cpu_decode_preprocess_img_s",
                    "full_path_error",
                ],
            ),
        ]
    t = s.get("tests", {})
    if t and "skipped" not in t:
        out += ["", "## GPU tests", "", f"{t.get('summary')}", ""] + [f"- {ln}" for ln in t.get("failed", [])]
    e = s.get("e2e", {})
    if e and "skipped" not in e:
        out += [
            "",
            "## End to end (bench_e2e.py, resnet50 fp16, p99 SLO 15 ms)",
            "",
            f"preprocess flag: {e.get('preprocess_flag')}",
        ]
        rows = e2e_rows(e)
        if rows:
            out += [
                "",
                "Peak Poisson rate at p99 <= 15 ms per variant; the naive server was measured in the first run.",
                "",
                _table(
                    rows,
                    [
                        "variant",
                        "preprocess_on_gpu",
                        "decode_on_gpu",
                        "rate_at_slo",
                        "offline",
                        "pct_of_offline",
                        "naive_rate",
                        "vs_naive",
                        "rc",
                    ],
                ),
            ]
        for label in ("gpu_preprocess", "gpu_decode", "cpu_preprocess"):
            r = e.get(label)
            if isinstance(r, dict):
                out += [
                    "",
                    f"### {label}: rc={r.get('rc')} {r.get('skipped', '')}",
                    "",
                    f"`{r.get('cmd', '')}`",
                    "",
                    "```",
                    (r.get("stdout_tail") or "")[-1500:],
                    "```",
                ]
        tele = e.get("telemetry")
        if tele:
            out += [
                "",
                "Telemetry during the e2e load (aurora telemetry record, 20 s):",
                "",
                "```",
                json.dumps(tele, indent=1),
                "```",
            ]
    sm = s.get("sampler", {})
    if sm and "skipped" not in sm:
        out += ["", "## Telemetry sampler at 10 Hz (bench_telemetry.py's functions)", ""]
        rows = [{"run": "cpu + gpu (defaults)", **sm.get("combined", {})}]
        rows += [{"run": k, **v} for k, v in sm.get("breakdown", {}).items()]
        out.append(_table(rows, ["run", "pct_of_one_core", "sampler_cpu_s", "wall_s", "samples", "sources"]))
        t = sm.get("throughput")
        if t:
            out += [
                "",
                f"Pipeline ({t.get('model')} on {t.get('device')}, {t.get('rounds')} off/on round pairs of "
                f"{t.get('requests')} requests): off {_fmt(t.get('off_img_s'))} img/s, on {_fmt(t.get('on_img_s'))} "
                f"img/s ({_fmt(t.get('change_pct'))}%; off rounds spread {_fmt(t.get('noise_pct'))}%); "
                f"off {[round(x, 1) for x in t.get('off_all', [])]}, on {[round(x, 1) for x in t.get('on_all', [])]}",
            ]
    targets = target_rows(results)
    if targets:
        out += ["", "## Issue 16 targets", "", _table(targets, ["target", "measured", "met"])]
    return "\n".join(out) + "\n"


def e2e_rows(e: dict) -> list[dict]:
    """One row per end-to-end variant from bench_e2e's JSON summaries; vs_naive uses the naive rate of
    whichever run measured it (the first)."""
    names = {
        "cpu_preprocess": "C++ preprocessing",
        "gpu_preprocess": "Triton",
        "gpu_decode": "Triton + nvJPEG",
    }
    sums = {}
    for label in names:
        r = e.get(label)
        files = r.get("files", {}) if isinstance(r, dict) else {}
        js = [v for v in files.values() if isinstance(v, dict) and "aurora_rate" in v]
        if js:
            sums[label] = (r, js[0])
    naive = next((j["naive_rate"] for _, j in sums.values() if j.get("naive_rate") is not None), None)
    rows = []
    for label, (r, j) in sums.items():
        rate, offline = j.get("aurora_rate"), j.get("aurora_offline")
        rows.append(
            {
                "variant": names[label],
                "preprocess_on_gpu": j.get("preprocess_on_gpu"),
                "decode_on_gpu": j.get("decode_on_gpu"),
                "rate_at_slo": rate,
                "offline": offline,
                "pct_of_offline": 100 * rate / offline if rate is not None and offline else None,
                "naive_rate": naive,
                "vs_naive": rate / naive if rate is not None and naive else None,
                "rc": r.get("rc"),
            }
        )
    return rows


def target_rows(results: dict) -> list[dict]:
    """Issue 16's GPU targets, each with what this run measured (n/a where its section did not run)."""
    s = results.get("sections", {})
    rows = []

    def row(target, measured, met):
        rows.append(
            {
                "target": target,
                "measured": measured,
                "met": "n/a" if met is None else ("met" if met else "NOT met"),
            }
        )

    krows = [r for r in s.get("kernels", {}).get("rows", []) if isinstance(r.get("triton_ms"), float)]
    pct = [
        r["pct_copy_bw"] for r in krows if r.get("batch", 0) >= 64 and isinstance(r.get("pct_copy_bw"), float)
    ]
    row(
        "Triton kernel >= 70% of copy bandwidth, batches >= 64 (filter-window reads + writes)",
        f"min {min(pct)}%, max {max(pct)}%" if pct else "n/a",
        min(pct) >= 70 if pct else None,
    )
    spd = [
        (r["speedup_vs_eager"], f"{r['case']} x{r['batch']}")
        for r in krows
        if isinstance(r.get("speedup_vs_eager"), float)
    ]
    worst = min(spd) if spd else None
    row(
        "Triton kernel >= 3x the torch eager chain at every size",
        f"min {worst[0]}x ({worst[1]})" if worst else "n/a",
        worst[0] >= 3 if worst else None,
    )
    e2e = e2e_rows(s.get("e2e", {}))
    if e2e:
        best = max(e2e, key=lambda r: r["rate_at_slo"] or 0)
        ok = (best["vs_naive"] or 0) >= 5 and (best["pct_of_offline"] or 0) >= 80
        row(
            "e2e resnet50 fp16, p99 <= 15 ms: >= 5x naive and >= 80% of own offline (best variant)",
            f"{best['variant']}: {_fmt(best['rate_at_slo'])}/s, {_fmt(best['vs_naive'])}x naive, "
            f"{_fmt(best['pct_of_offline'])}% of offline",
            ok if best["rate_at_slo"] is not None else None,
        )
    else:
        row("e2e resnet50 fp16, p99 <= 15 ms: >= 5x naive and >= 80% of own offline", "n/a", None)
    sm = s.get("sampler", {})
    pct_core = sm.get("combined", {}).get("pct_of_one_core")
    gpu = any(src.startswith("gpu") for src in sm.get("combined", {}).get("sources", []))
    row(
        "sampler CPU + NVML at 10 Hz <= 1% of one core",
        f"{pct_core:.2f}% ({'with' if gpu else 'WITHOUT'} a GPU source)" if pct_core is not None else "n/a",
        pct_core <= 1.0 and gpu if pct_core is not None else None,
    )
    t = sm.get("throughput")
    row(
        "Pipeline throughput with the sampler on within noise of off",
        f"{t['change_pct']:+.1f}% (off rounds spread {t['noise_pct']:.1f}%)" if t else "n/a",
        t["within_noise"] if t else None,
    )
    return rows


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_suite"))
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("AURORA_SUITE_BUDGET_S", "360")))
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.result, args.budget_s)

    suite = Suite(args.out, args.budget_s)
    skip = set(filter(None, args.skip.split(",")))
    suite.say(f"gpu_suite: out={args.out} budget={args.budget_s:.0f}s root={ROOT}")
    plan = [
        ("setup", lambda cap: s_setup(suite, cap), 20, 150),
        ("card", lambda cap: suite.worker("card", cap), 10, 45),
        ("copy_bw", lambda cap: suite.worker("copy_bw", cap), 10, 45),
        ("kernels", lambda cap: suite.worker("kernels", cap, ()), 40, 150),
        ("correctness", lambda cap: suite.worker("correctness", cap), 20, 60),
        # The sampler before e2e: it is short and bounded, and e2e takes whatever its cap allows.
        ("sampler", lambda cap: suite.worker("sampler", cap), 30, 60),
        ("e2e", lambda cap: s_e2e(suite, cap), 60, 210),
        ("decode", lambda cap: suite.worker("decode", cap), 20, 40),
        ("tests", lambda cap: s_tests(suite, cap), 30, 90),
    ]
    for name, fn, min_s, cap_s in plan:
        if name in skip:
            suite.results["sections"][name] = {"skipped": "--skip"}
            continue
        if name == "kernels":
            gbps = suite.results["sections"].get("copy_bw", {}).get("gbps")
            if gbps:
                suite.env["AURORA_COPY_GBPS"] = str(gbps)
        suite.section(name, fn, min_s=min_s, cap_s=cap_s)
    suite.write()
    md = render_markdown(suite.results)
    print("\n" + md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
