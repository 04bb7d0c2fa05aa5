"""Telemetry sampler cost: its own CPU time at 10 Hz (target <= 1% of one core), and pipeline
throughput with and without the sampler in one run (target: no measurable change).

Run: python benchmarks/bench_telemetry.py [--seconds 10] [--requests 96] [--rounds 3] [--breakdown-seconds 3]
     python -m pytest benchmarks/bench_telemetry.py --benchmark-only   (CI: --benchmark-disable)

Overhead: the sampler's threads measure their own CPU time (time.thread_time); it is divided by the
wall time. On a machine without NVML this is the CPU backend only; on a GPU machine gpu="auto" adds
the NVML poller and the event thread, with the default settings (NVML slow set every
``nvml.SLOW_EVERY`` ticks). After the combined run, a per-source breakdown runs the CPU backend alone,
the NVML poller alone (events off) and the NVML poller with the event thread, ``--breakdown-seconds``
each (GPU rows only where NVML works). Before the slow cadence an H200 measured 8.4% of one core at
10 Hz for cpu + gpu0, 0.8% of it the CPU backend. Throughput: the real ``aurora_core.Pipeline`` (CPU:
mobilenet_v3_small, random weights; CUDA: resnet50) on the shipped sample mix; rounds alternate
off/on so that drift on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
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
    ap.add_argument("--rounds", type=int, default=3, help="off/on round pairs")
    ap.add_argument("--breakdown-seconds", type=float, default=3.0, help="per-source run length (0: skip)")
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args()
    from aurora_core.telemetry.nvml import SLOW_EVERY

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
