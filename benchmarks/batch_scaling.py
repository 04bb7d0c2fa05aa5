"""Does preprocess_batch's 2-thread speed-up depend on memory traffic? The same kernel on the default mix
(64 images, 0.3 and 2.5 MP) and on 256 cache-resident 96x96 images, 2 threads against 1, wall medians
measured round-robin in one run. If the cache-resident case scales no better, the limit is the machine's
cores (e.g. vCPUs sharing a physical core), not the kernel's memory use. A third line runs the same
L2-resident torch matmul on one thread and on two (GIL released, one intra-op thread each): the speed-up
plain FMA work gets from the second vCPU.

Run: python benchmarks/batch_scaling.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_preprocess import SPEC, batch_images, timed_medians  # noqa: E402

from aurora_core.ops.preprocess import PreprocessSpec, preprocess_batch  # noqa: E402


def speedup(imgs, spec, rounds: int) -> float:
    out = torch.empty((len(imgs), 3, spec.crop, spec.crop))
    wall = timed_medians({k: (lambda k=k: preprocess_batch(imgs, spec, out=out, num_threads=k)) for k in (1, 2)},
                         rounds)["wall"]
    return wall[1] / wall[2]


def matmul_speedup(rounds: int) -> float:
    """(time for 1 unit of work on 1 thread) * 2 / (time for 2 units on 2 threads)."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)

    def work():
        for _ in range(400):
            a @ a

    def run(k: int) -> float:
        threads = [threading.Thread(target=work) for _ in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    times = {1: [], 2: []}
    for _ in range(max(3, rounds // 2)):
        for k in times:
            times[k].append(run(k))
    return 2 * statistics.median(times[1]) / statistics.median(times[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(256)]
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"cache-resident 96x96 -> 56x56, 256 images: 2 threads vs 1 {speedup(small, PreprocessSpec(64, 56), a.rounds):.2f}x")
    print(f"default mix, 64 images: 2 threads vs 1 {speedup(batch_images(64), SPEC, a.rounds):.2f}x")
    print(f"torch 256x256 matmul, one per thread: 2 threads vs 1 {matmul_speedup(a.rounds):.2f}x")


if __name__ == "__main__":
    main()
