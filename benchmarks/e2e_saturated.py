"""Saturated throughput on the CPU: aurora with the compiled model, aurora eager, and bench_e2e's naive server.

    python benchmarks/e2e_saturated.py [--model mobilenet_v3_small] [--rounds 3] [--n 200]

bench_e2e.py's offline measurement (every request queued at once, images/s until the last completes) and
its naive server (2 threads, PIL + torchvision transform, batch-1 forward), with its CPU settings (torch on
half the cores, a decode worker per core, max batch 16, 10 ms delay). The three servers take turns, round
by round, in one process; medians. The compiled model is built or loaded before the first round.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
from bench_e2e import Naive, offline

from aurora_core import samples
from aurora_core.batching import BatchingConfig
from aurora_core.pipeline import Pipeline


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=200, help="requests per aurora offline run (naive: n / 3)")
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    default_threads = torch.get_num_threads()
    mix = samples.default_mix()
    cfg = BatchingConfig(max_batch_size=16, max_queue_delay_us=10_000, max_queue_size=100_000)
    torch.set_num_threads(max(1, cores // 2))
    t = time.monotonic()
    compiled = Pipeline(a.model, batching=cfg, device="cpu", num_workers=cores, compile=True)
    print(f"compiled pipeline ready in {time.monotonic() - t:.1f} s ({compiled.runner.compile_source})", flush=True)
    eager = Pipeline(a.model, batching=cfg, device="cpu", num_workers=cores, compile=False)
    naive = Naive(a.model, "cpu", None)
    gc.freeze()
    rates = {"compiled": [], "eager": [], "naive": []}
    for p in (compiled, eager):
        offline(p.submit, mix, 32)  # warm the decoders and allocator
    for r in range(a.rounds):
        for name, p in (("compiled", compiled), ("eager", eager)):
            torch.set_num_threads(max(1, cores // 2))
            rates[name].append(offline(p.submit, mix, a.n))
        torch.set_num_threads(default_threads)
        rates["naive"].append(offline(naive.submit, mix, max(16, a.n // 3)))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()), flush=True)
    m = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{a.model}, medians of {a.rounds}: compiled {m['compiled']:.1f}/s, eager {m['eager']:.1f}/s, naive "
          f"{m['naive']:.1f}/s; compiled/naive {m['compiled'] / m['naive']:.2f}x, eager/naive "
          f"{m['eager'] / m['naive']:.2f}x, compiled/eager {m['compiled'] / m['eager']:.2f}x", flush=True)
    for p in (compiled, eager):
        p.close()
    naive.close()


if __name__ == "__main__":
    main()
