"""Print the preprocess ratio table, every figure measured in this one run.

Providers are timed round-robin (one call of each in turn, repeated), so that a noisy neighbour slows
all of them alike; figures are medians. Round-robin also means each call starts cold, its image and
output evicted by the other providers' work, as a request in a server does: aurora's 0.3 MP call costs
~2x its back-to-back (warm) time here, torch's barely changes (it streams the whole image in order).
Single-image numbers run on one thread (torch, OpenCV, aurora) and are reported twice: wall time, and
the calling thread's CPU time (time.thread_time), which leaves out the time a loaded machine keeps the
thread descheduled. The batch figure compares preprocess_batch of 64 decoded images on 2 threads
against 1, in wall time only (CPU time would miss the worker).

Run: python benchmarks/preprocess_ratios.py [--repeat 3] [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cv2  # noqa: E402
import torch  # noqa: E402
from bench_preprocess import PHOTOS, PROVIDERS, SPEC, batch_images, make, timed_medians  # noqa: E402

from aurora_core.ops.preprocess import preprocess_batch  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(rounds: int) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    res = {}
    for photo in PHOTOS:
        n = rounds if photo != "10mp" else max(5, rounds // 2)
        for kind in ("prep", "e2e"):
            fns = {p: make(kind, p, photo) for p in PROVIDERS[kind]}
            res[(kind, photo)] = timed_medians(fns, n)
    imgs = batch_images(64)
    out = torch.empty((64, 3, SPEC.crop, SPEC.crop))
    fns = {f"{t}thr": (lambda t=t: preprocess_batch(imgs, SPEC, out=out, num_threads=t)) for t in (1, 2)}
    res["batch"] = timed_medians(fns, rounds)
    return res


def report(all_res: dict, clock: str) -> list[tuple[str, float, float]]:
    """Print the tables for one clock ("wall" or "cpu"); returns (target, measured, required) rows."""
    res = {k: v[clock] for k, v in all_res.items() if k != "batch"}
    res["batch"] = all_res["batch"]["wall"]
    ms = lambda s: f"{s * 1e3:8.2f}"  # noqa: E731
    checks = []
    print(f"\n--- clock: {clock} ---")
    print("resize + crop + normalize on a decoded image, 1 thread, median ms")
    cols = list(PROVIDERS["prep"])
    print(f"{'photo':8}" + "".join(f"{c:>16}" for c in cols) + f"{'torch/aurora':>14}{'pil/aurora':>12}")
    for photo in PHOTOS:
        r = res[("prep", photo)]
        t, p = r["torch_uint8_aa"] / r["aurora"], r["pil"] / r["aurora"]
        print(f"{photo:8}" + "".join(f"{ms(r[c]):>16}" for c in cols) + f"{t:14.2f}{p:12.2f}")
        checks += [(f"prep {photo}: vs torch uint8 AA", t, 2.0), (f"prep {photo}: vs PIL + numpy", p, 6.0)]
    print("\ndecode + preprocess (bytes -> tensor), 1 thread, median ms")
    cols = list(PROVIDERS["e2e"])
    print(f"{'photo':8}" + "".join(f"{c:>24}" for c in cols))
    for photo in PHOTOS:
        r = res[("e2e", photo)]
        print(f"{photo:8}" + "".join(f"{ms(r[c]):>24}" for c in cols))
    print(f"\n{'photo':8}{'classic/exact':>15}{'best/exact':>12}{'exact/decode':>14}{'classic/fast':>14}")
    for photo in PHOTOS:
        r = res[("e2e", photo)]
        ce, be = r["classic_pil"] / r["aurora_exact"], r["simplejpeg_torch"] / r["aurora_exact"]
        ed, cf = r["aurora_exact"] / r["simplejpeg_decode_only"], r["classic_pil"] / r["aurora_fast"]
        print(f"{photo:8}{ce:15.2f}{be:12.2f}{ed:14.2f}{cf:14.2f}")
        checks += [(f"e2e {photo}: exact vs classic PIL", ce, 1.8), (f"e2e {photo}: exact vs best off-the-shelf", be, 1.0)]
        if photo != "0.3mp":
            checks.append((f"e2e {photo}: fast vs classic PIL", cf, 2.5))
    b = res["batch"]
    speedup = b["1thr"] / b["2thr"]
    print(f"\nbatch of 64 (default mix, wall): 1 thread {64 / b['1thr']:.0f} img/s, 2 threads {64 / b['2thr']:.0f} img/s, "
          f"ratio {speedup:.2f}")
    checks.append(("batch64: 2 threads vs 1", speedup, 1.7))
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="measure the whole table this many times")
    ap.add_argument("--rounds", type=int, default=20, help="timed calls per provider (10 MP: half)")
    args = ap.parse_args()
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.machine()}; "
          f"load average {os.getloadavg()[0]:.2f} at start; torch {torch.__version__}, cv2 {cv2.__version__}")
    runs = {"wall": [], "cpu": []}
    for i in range(args.repeat):
        print(f"\n=== run {i + 1}/{args.repeat} (load average {os.getloadavg()[0]:.2f}) ===")
        res = measure(args.rounds)
        for clock in runs:
            runs[clock].append(report(res, clock))
    print(f"\ntargets, ratio per run (load average {os.getloadavg()[0]:.2f} at end)")
    for clock, rows in runs.items():
        print(f"  clock: {clock}")
        for j, (name, _, need) in enumerate(rows[0]):
            got = [run[j][1] for run in rows]
            ok = "met" if min(got) >= need else ("met in some runs" if max(got) >= need else "NOT met")
            print(f"    {name:45} need >= {need:4.1f}x  got " + " ".join(f"{g:5.2f}" for g in got) + f"  {ok}")


if __name__ == "__main__":
    main()
