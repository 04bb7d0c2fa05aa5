"""Telemetry sampler cost: its own CPU time at 10 Hz (target <= 1% of one core), and pipeline
throughput with and without the sampler in one run (target: no measurable change).

Run: python benchmarks/bench_telemetry.py [--seconds 10] [--requests 96] [--rounds 3] [--breakdown-seconds 3]
     python benchmarks/bench_telemetry.py --replay tests/data/nvml/live_h200_e2e_load.jsonl --ticks 200 --rounds 41 \
         [--baseline OLD_NVML_PY]
     python -m pytest benchmarks/bench_telemetry.py --benchmark-only   (CI: --benchmark-disable)

Overhead: the sampler's threads measure their own CPU time (time.thread_time); it is divided by the
wall time. On a machine without NVML this is the CPU backend only; on a GPU machine gpu="auto" adds
the NVML poller and the event thread, with the default settings (NVML slow set every
``nvml.SLOW_EVERY`` ticks). After the combined run, a per-source breakdown runs the CPU backend alone,
the NVML poller alone (events off) and the NVML poller with the event thread, ``--breakdown-seconds``
each (GPU rows only where NVML works). Each GPU row includes one nvmlInit + probe (25.6 ms of driver
time in the live H200 trace, ~0.9% of one core over a 3 s row): use a long ``--breakdown-seconds`` for
the per-tick cost. Before the slow cadence an H200 measured 8.4% of one core at 10 Hz for cpu + gpu0,
0.8% of it the CPU backend.

``--replay TRACE`` splits the GPU tick without a GPU: the Python CPU time per tick with NVML answering
at once (``replay_cost``), and the driver time per tick priced from the trace (``trace_driver_us``) at
the cadence the backend picks on that trace (which counters and GPM it reads on slow ticks only, and
why, is printed). With ``--baseline`` both are given for the other nvml.py too, from the same run.

Throughput: the real ``aurora_core.Pipeline`` (CPU:
mobilenet_v3_small, random weights; CUDA: resnet50) on the shipped sample mix; rounds alternate
off/on so that drift on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import statistics
import sys
import time

import pytest

from aurora_core.telemetry.sampler import TelemetrySampler


def sampler_overhead(seconds: float, period_s: float = 0.1, gpu="auto", cpu: bool = True, events: bool = True) -> dict:
    """Run the sampler alone for ``seconds``; its CPU time as a percentage of one core."""
    n = {"samples": 0}
    s = TelemetrySampler(callbacks=[lambda _s: n.__setitem__("samples", n["samples"] + 1)], period_s=period_s,
                         gpu=gpu, cpu=cpu, events=events)
    t0 = time.monotonic()
    with s:
        time.sleep(seconds)
    wall = time.monotonic() - t0
    return {"wall_s": wall, "sampler_cpu_s": s.sampler_cpu_s, "pct_of_one_core": 100 * s.sampler_cpu_s / wall,
            "samples": n["samples"], "sources": sorted(s.latest()), "period_s": period_s}


def source_breakdown(seconds: float, period_s: float = 0.1, with_gpu: bool = True) -> dict[str, dict]:
    """Sampler cost per source: CPU backend alone, NVML poller alone, NVML poller + event thread."""
    out = {"cpu only": sampler_overhead(seconds, period_s, gpu=False)}
    if with_gpu:
        out["gpu poller only"] = sampler_overhead(seconds, period_s, gpu=True, cpu=False, events=False)
        out["gpu poller + events"] = sampler_overhead(seconds, period_s, gpu=True, cpu=False)
    return out


def _load_nvml_module(path: str):
    """Another version of aurora_core/telemetry/nvml.py (e.g. ``git show HEAD~1:...``) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_nvml", path)
    mod = sys.modules["baseline_nvml"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


_STUB_C = """
int nvml_ok(void) { return 0; }
int nvml_one(unsigned int *n) { *n = 1; return 0; }
int nvml_gpm_supported(void *h, unsigned int *s) { s[1] = 1; return 0; }
"""


@functools.cache
def _stub_lib():
    import ctypes
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", f"{d}/stub.so", "-x", "c", "-"], input=_STUB_C,
                       text=True, check=True)
        return ctypes.CDLL(f"{d}/stub.so")  # stays mapped when the file goes


@contextlib.contextmanager
def stub_driver():
    """The ``pynvml`` module on a stand-in libnvidia-ml (built here with ``cc``): every call succeeds at
    once with zeroed outputs, one GPU, GPM supported (x86-64 and arm64 callers clean up the arguments
    these functions ignore). pynvml's own wrappers and ctypes calls run as live; the driver does not."""
    import pynvml

    lib = _stub_lib()

    class Lib:
        def __getattr__(self, name):
            if name.startswith("nvmlDeviceGetCount"):
                return lib.nvml_one
            return lib.nvml_gpm_supported if name == "nvmlGpmQueryDeviceSupport" else lib.nvml_ok

    saved = pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache)
    pynvml.nvmlLib = Lib()
    pynvml._nvmlGetFunctionPointer_cache.clear()
    try:
        yield pynvml
    finally:
        pynvml.nvmlLib = saved[0]
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlGetFunctionPointer_cache.update(saved[1])


def replay_cost(path: str, ticks: int = 2000, rounds: int = 5, baseline: str | None = None) -> dict:
    """Python CPU time per GPU tick with NVML answering at once: a trace replayed by ``TickReplayNvml``.

    Per round, on this thread, ``ticks`` each at the live slow cadence (``nvml.SLOW_EVERY``), init
    excluded: ``NvmlBackend.tick()`` on the replay ("backend"); the sampler's GPU poller loop on it
    (tick, CPU accounting, capabilities, publish, a 1 us wait between ticks: "sampler"); and the backend
    on the real pynvml over ``stub_driver`` ("pynvml"), which adds pynvml's wrappers (all zeros, so
    its values differ from the trace's). With ``baseline`` (the path of another nvml.py) the same loops
    run its backend too, interleaved round by round. The driver's time is in none of them (see
    ``trace_driver_us``). Returns medians in us per tick, per variant.
    """
    from unittest import mock

    from aurora_core.telemetry import nvml
    from aurora_core.telemetry.replay import TickReplayNvml

    variants = {"current": nvml}
    if baseline:
        variants = {"baseline": _load_nvml_module(baseline), **variants}

    def backend_loop(mod) -> float:
        be = mod.NvmlBackend(TickReplayNvml(path, nvml.SLOW_EVERY))
        be.tick()  # init and probe: not per-tick work
        t0 = time.thread_time()
        for _ in range(ticks):
            be.tick()
        dt = time.thread_time() - t0
        assert be.healthy, be.error
        return dt / ticks

    def sampler_loop(mod) -> float:
        t0 = [0.0, 0]

        def count(_s):
            t0[1] += 1
            if t0[1] == 1:
                t0[0] = time.thread_time()  # after the first tick, which initialises NVML
            elif t0[1] == ticks + 1:
                s._stop.set()

        s = TelemetrySampler(callbacks=[count], period_s=1e-6, gpu=True, cpu=False, events=False,
                             nvml_api=TickReplayNvml(path, nvml.SLOW_EVERY))
        s._api = s.nvml_api
        with mock.patch.object(nvml, "NvmlBackend", mod.NvmlBackend):
            s._gpu_loop(s._gpu_gen)  # the poller thread's loop, on this thread, until `count` stops it
        return (time.thread_time() - t0[0]) / ticks

    def pynvml_loop(mod) -> float:
        with stub_driver() as api:
            be = mod.NvmlBackend(api)
            be.tick()
            t0 = time.thread_time()
            for _ in range(ticks):
                be.tick()
            dt = time.thread_time() - t0
            assert be.healthy and be.devices[0].gpm_samples, be.error
            be.shutdown()
        return dt / ticks

    loops = {"backend": backend_loop, "sampler": sampler_loop}
    if shutil.which("cc"):
        loops["pynvml"] = pynvml_loop
    runs: dict[str, dict[str, list[float]]] = {v: {k: [] for k in loops} for v in variants}
    for _ in range(rounds):
        for name, mod in variants.items():
            for k, loop in loops.items():
                runs[name][k].append(1e6 * loop(mod))
    out = {"ticks": ticks, "rounds": rounds, "slow_every": nvml.SLOW_EVERY}
    for name, r in runs.items():
        out[name] = {f"{k}_tick_us": statistics.median(v) for k, v in r.items()}
        out[name].update({f"{k}_min_us": min(v) for k, v in r.items()})
        out[name].update({f"{k}_all": [round(x, 1) for x in v] for k, v in r.items()})
    if baseline:  # per round, so that drift on a shared machine cancels
        out["ratio"] = {k: statistics.median(c / b for b, c in zip(runs["baseline"][k], runs["current"][k], strict=True))
                        for k in loops}
    return out


def trace_driver_us(path: str, mod=None) -> dict:
    """Driver time per tick priced from a live trace's ``dur_ns``, for the calls this code makes.

    The calls are those ``NvmlBackend`` makes on ``TickReplayNvml`` over one slow cycle after init; each
    is priced at the median recorded duration of the same function and int arguments. A field-values
    call asking for fewer ids than were recorded is priced per recorded call as its duration minus the
    ``latencyUsec`` of the ids it did not ask for (the per-field latencies add up to ~97% of the call).
    Wall time of the calls, an upper bound on their CPU time. Returns us: a fast tick, a slow tick, the
    mean per tick at the live slow cadence, and init (nvmlInit and the probe, once per sampler start);
    ``cadence``: the backend's own account of what it reads less than every tick. mod: another
    nvml.py (``_load_nvml_module``) to price instead of the current one.
    """
    from aurora_core.telemetry import nvml
    from aurora_core.telemetry.replay import TickReplayNvml, read_trace

    mod = mod or nvml
    SLOW_EVERY, NvmlBackend = mod.SLOW_EVERY, mod.NvmlBackend
    lines = [e for e in read_trace(path)[1:] if "dur_ns" in e]
    api = TickReplayNvml(path, SLOW_EVERY)
    calls: list[tuple] = []

    class Logged:
        def __getattr__(self, name):
            target = getattr(api, name)
            if not name.startswith("nvml") or not callable(target):
                return target

            def call(*args):
                calls.append((name, *(tuple(a) if isinstance(a, list) else a for a in args if type(a) in (int, list))))
                return target(*args)
            return call

    be = NvmlBackend(Logged())
    be.tick()
    init = list(calls)  # nvmlInit, the probe and the first (slow) read
    per_tick = []
    for _ in range(SLOW_EVERY):
        calls.clear()
        be.tick()
        per_tick.append(list(calls))

    def price(call: tuple) -> float:
        name, *args = call
        if name == "nvmlDeviceGetFieldValues":
            want = set(args[0])
            durs = [e["dur_ns"] / 1e3 - sum(f["f"]["latencyUsec"] for f in e["ret"]["a"] if f["f"]["fieldId"] not in want)
                    for e in lines if e["fn"] == name and "ret" in e and want <= {f["f"]["fieldId"] for f in e["ret"]["a"]}]
        else:
            durs = [e["dur_ns"] / 1e3 for e in lines if e["fn"] == name and [a for a in e["args"] if type(a) is int] == args]
        return statistics.median(durs) if durs else float("nan")

    slow = max(range(len(per_tick)), key=lambda i: len(per_tick[i]))  # the one with the second field call
    cost = [sum(price(c) for c in tick) for tick in per_tick]
    fast = [c for i, c in enumerate(cost) if i != slow]
    return {"fast_tick_us": statistics.median(fast), "slow_tick_us": cost[slow], "mean_tick_us": sum(cost) / len(cost),
            "init_us": sum(price(c) for c in init) - cost[slow],
            "fast_calls": [c[0] for c in per_tick[(slow + 1) % len(per_tick)]],
            "priced": {" ".join(map(str, c))[:60]: round(price(c)) for c in per_tick[slow]},
            "priced_fast": {" ".join(map(str, c))[:60]: round(price(c)) for c in per_tick[(slow + 1) % len(per_tick)]},
            "cadence": be.capabilities()["gpu0"].get("cadence", {})}


def pipeline_throughput(requests: int, rounds: int, period_s: float = 0.1) -> dict:
    """Images/s of the real Pipeline, alternating rounds without and with the sampler."""
    import torch

    import aurora_core as ac
    from aurora_core.samples import default_mix

    mix = default_mix()
    model = "resnet50" if torch.cuda.is_available() else "mobilenet_v3_small"
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with ac.Pipeline(model=model) as pipe:
        for f in [pipe.submit(mix[i % len(mix)]) for i in range(16)]:  # warm-up
            f.result()
        for _ in range(rounds):
            for mode in ("off", "on"):
                sampler = TelemetrySampler(period_s=period_s) if mode == "on" else None
                if sampler:
                    sampler.start()
                t0 = time.perf_counter()
                futures = [pipe.submit(mix[i % len(mix)]) for i in range(requests)]
                for f in futures:
                    f.result()
                rates[mode].append(requests / (time.perf_counter() - t0))
                if sampler:
                    sampler.stop()
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"model": model, "device": "cuda" if torch.cuda.is_available() else "cpu", "requests": requests,
            "rounds": rounds, "off_img_s": off, "on_img_s": on, "change_pct": 100 * (on - off) / off,
            "off_all": rates["off"], "on_all": rates["on"]}


def test_sampler_overhead(benchmark):
    benchmark.group = "telemetry sampler"
    result = benchmark.pedantic(sampler_overhead, args=(2.0,), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["samples"] > 0


def test_replay_cost(benchmark):
    from pathlib import Path

    trace = Path(__file__).parent.parent / "tests" / "data" / "nvml" / "live_h200_e2e_load.jsonl"
    benchmark.group = "telemetry sampler"
    result = benchmark.pedantic(replay_cost, args=(str(trace), 50, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["current"]["backend_tick_us"] > 0 and trace_driver_us(str(trace))["fast_tick_us"] > 0


@pytest.mark.slow
def test_pipeline_with_and_without_sampler(benchmark):
    benchmark.group = "telemetry sampler"
    result = benchmark.pedantic(pipeline_throughput, args=(32, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["off_img_s"] > 0 and result["on_img_s"] > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="sampler-alone run length")
    ap.add_argument("--period", type=float, default=0.1, help="sampling period, s")
    ap.add_argument("--requests", type=int, default=96, help="requests per throughput round")
    ap.add_argument("--rounds", type=int, default=3, help="off/on round pairs (--replay: rounds per loop)")
    ap.add_argument("--breakdown-seconds", type=float, default=3.0, help="per-source run length (0: skip)")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--replay", metavar="PATH", help="instead: Python CPU us per GPU tick replaying this NVML trace "
                    "(no GPU needed), and the trace's driver time per tick")
    ap.add_argument("--ticks", type=int, default=200, help="--replay: ticks per loop (short loops, many rounds)")
    ap.add_argument("--baseline", metavar="NVML_PY", help="--replay: also time this nvml.py, interleaved "
                    "(e.g. from git show HEAD~1:aurora_core/telemetry/nvml.py)")
    args = ap.parse_args()
    from aurora_core.telemetry.nvml import SLOW_EVERY

    if args.replay:
        import os

        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        priced = {"baseline": _load_nvml_module(args.baseline)} if args.baseline else {}
        for name, mod in {**priced, "current": None}.items():
            d = trace_driver_us(args.replay, mod)
            print(f"{name}: driver time from the trace's dur_ns: fast tick {d['fast_tick_us']:.0f} us, slow tick "
                  f"{d['slow_tick_us']:.0f} us, mean {d['mean_tick_us']:.0f} us per tick = "
                  f"{d['mean_tick_us'] / 1e4 / args.period:.2f}% of one core at {1 / args.period:g} Hz; "
                  f"init {d['init_us'] / 1e3:.1f} ms once")
            print(f"  fast tick calls (us): {d['priced_fast']}")
            print(f"  slow tick calls (us): {d['priced']}")
            for m, why in d["cadence"].items():
                if "SLOW_METRICS" not in why and "slow-changing" not in why:
                    print(f"  {m}: {why}")
        r = replay_cost(args.replay, args.ticks, args.rounds, args.baseline)
        print(f"Python per GPU tick, NVML replayed at no cost ({r['ticks']} ticks x {r['rounds']} rounds, "
              f"slow set every {r['slow_every']}; medians):")
        for name in ("baseline", "current"):
            if name in r:
                x = r[name]
                print(f"  {name:8s} backend.tick {x['backend_tick_us']:6.1f} us, sampler loop {x['sampler_tick_us']:6.1f} us "
                      f"= {x['sampler_tick_us'] / 1e4 / args.period:.3f}% of one core at {1 / args.period:g} Hz, "
                      f"backend.tick on pynvml + stub driver {x.get('pynvml_tick_us', float('nan')):6.1f} us")
                print(f"           min: backend {x['backend_min_us']:.1f}, sampler {x['sampler_min_us']:.1f}, pynvml "
                      f"{x.get('pynvml_min_us', float('nan')):.1f} us")
        if "ratio" in r:
            print("  current / baseline, median of per-round ratios: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["ratio"].items()))
        return

    o = sampler_overhead(args.seconds, args.period)
    print(f"sampler alone (defaults, NVML slow set every {SLOW_EVERY} ticks): {o['sampler_cpu_s'] * 1e3:.1f} ms CPU "
          f"over {o['wall_s']:.2f} s = {o['pct_of_one_core']:.3f}% of one core at {1 / args.period:g} Hz; "
          f"sources {o['sources']}, {o['samples']} samples")
    if args.breakdown_seconds > 0:
        with_gpu = any(src.startswith("gpu") for src in o["sources"])
        for name, b in source_breakdown(args.breakdown_seconds, args.period, with_gpu).items():
            print(f"  {name:20s} {b['pct_of_one_core']:.3f}% of one core ({b['sampler_cpu_s'] * 1e3:.1f} ms CPU over "
                  f"{b['wall_s']:.2f} s; sources {b['sources']}, {b['samples']} samples)")
        if not with_gpu:
            print("  (no GPU source: NVML rows skipped)")
    if not args.skip_pipeline:
        t = pipeline_throughput(args.requests, args.rounds, args.period)
        print(f"pipeline {t['model']} on {t['device']}: {t['off_img_s']:.1f} img/s without sampler, "
              f"{t['on_img_s']:.1f} with ({t['change_pct']:+.1f}%, medians of {t['rounds']} rounds of "
              f"{t['requests']}); off {[round(x, 1) for x in t['off_all']]} on {[round(x, 1) for x in t['on_all']]}")


if __name__ == "__main__":
    main()
