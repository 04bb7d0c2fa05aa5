"""``aurora bench``: what this hardware sustains, where each millisecond goes, and whether it held its clocks.

With no arguments: the packaged sample photos (``samples.default_mix()``), the default model for the
device found, a short closed-loop calibration of capacity, then the Server scenario (seeded Poisson)
at 50% of that capacity. It prints the results table, the telemetry summary and a one-line
bottleneck verdict, and writes the run file (``run.aurora.sqlite``), ``summary.json`` and
``report.html`` under ``--out``. Exit code: 0 when the run is VALID, 1 when INVALID, 2 on an error (a
bad or conflicting option, checked before anything is built; a model that does not load; a run in which
every query failed), 130 when interrupted (a partial run file is kept with ``meta["interrupted"]``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import socket
import sys
import threading
import time
import urllib.parse
import zipfile
from collections import defaultdict

import numpy as np

from aurora_core import loadgen as lg
from aurora_core.cli import describe, number
from aurora_core.report import (
    CGROUP_THROTTLED_FRAC,
    CPU_BUSY_PCT,
    LIMITING_REASONS,
    OTHERS_PCT,
    STEAL_PCT,
    THROTTLE_REASONS,
    THROTTLED_FRAC,
)

PROGRESS_EVERY_S = 5.0  # plain progress lines when stderr is not a terminal
#: In a saturating scenario (offline, closed loop) the stage busy at least this share of the wall time drains
#: the queue; a stage below it waits for the other.
SATURATED_BUSY = 0.9
SCENARIOS = ("server", "single_stream", "offline", "closed_loop", "step", "replay")
DEFAULT_SLO_MS = {"cpu": 250.0, "cuda": 15.0}  # CPU: issue 3's bound; CUDA: MLPerf Server, ResNet-50


#: Defaults of the options that apply to some scenarios only. They parse as None so that an option the
#: user gave can be told from a default, and a given option the run would ignore is an error, not a
#: silent no-op; ``check_args`` fills these in.
DEFAULTS = {"duration": 25.0, "load_factor": 0.5, "calibrate_s": 4.0, "seed": 0, "connections": 64,
            "max_batch_size": 16, "max_queue_delay_us": 2000, "replay_speed": 1.0, "peak_trial_s": 8.0}


class BenchError(Exception):
    """A run that cannot give a measurement: one line on stderr, exit 2."""


class UsageError(BenchError, ValueError):
    """A bad or conflicting option, found before anything is built."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("pipeline")
    g.add_argument("--model", default=None, help="torchvision name or model file (default: resnet50 on CUDA, "
                   "mobilenet_v3_small on CPU)")
    g.add_argument("--weights", default=None, help="local state_dict for --model (default: seeded random init)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default auto)")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16", "auto"], help="model dtype")
    g.add_argument("--max-batch-size", type=number(int, ge=1), default=None,
                   help=f"most requests in one model call (default {d['max_batch_size']})")
    g.add_argument("--max-queue-delay-us", type=number(int, ge=0), default=None,
                   help=f"how long a batch's first request waits for company (default {d['max_queue_delay_us']})")
    g.add_argument("--buckets", default=None, help="padded batch sizes, e.g. 1,2,4,8,16 (default: powers of two "
                   "up to --max-batch-size)")
    g.add_argument("--max-queue-size", type=number(int, ge=1), default=None,
                   help="admission limit (Overloaded past it; default 256, offline 2^20)")
    g.add_argument("--url", default=None, help="benchmark an HTTP server (POST raw bytes, e.g. "
                   "http://127.0.0.1:8000/v1/classify) instead of an in-process Pipeline")
    g = p.add_argument_group("load")
    g.add_argument("--connections", type=number(int, ge=1), default=None,
                   help=f"HTTP connections (with --url; default {d['connections']})")
    g.add_argument("--scenario", default=None, choices=SCENARIOS,
                   help="default server, or replay when --replay is given")
    g.add_argument("--rate", type=number(gt=0), default=None, help="queries/s for server/step "
                   "(default: calibrated, --load-factor of capacity)")
    g.add_argument("--load-factor", type=number(gt=0), default=None,
                   help=f"calibrated rate = this x capacity (default {d['load_factor']:g}: a closed-loop probe "
                        "with 32 in flight overstates what an open-loop arrival stream can get within the SLO)")
    g.add_argument("--calibrate-s", type=number(gt=0), default=None,
                   help=f"closed-loop capacity probe length (default {d['calibrate_s']:g})")
    g.add_argument("--duration", type=number(gt=0), default=None,
                   help=f"seconds of measured load (default {d['duration']:g})")
    g.add_argument("--concurrency", type=number(int, ge=1), default=None,
                   help="closed_loop and calibration in flight (default 2x --max-batch-size)")
    g.add_argument("--count", type=number(int, ge=1), default=None,
                   help="offline queries (default ~duration of work)")
    g.add_argument("--steps", default=None, help="step scenario: T:RATE or T:+PCT%% items, relative to the "
                   "base rate, e.g. 0:40,60:+20%% (with --duration above 60; default +20%% halfway)")
    g.add_argument("--replay", default=None, help="replay arrivals: a run dir/.sqlite, .npy (ns) or text (s)")
    g.add_argument("--replay-speed", type=number(gt=0), default=None,
                   help=f"2 replays twice as fast (default {d['replay_speed']:g})")
    g.add_argument("--seed", type=int, default=None, help=f"Poisson arrivals' seed (default {d['seed']})")
    g.add_argument("--find-peak", action="store_true", help="bisect for the highest Poisson rate with p99 <= SLO, "
                   "then run --duration at it")
    g.add_argument("--peak-trial-s", type=number(gt=0), default=None,
                   help=f"length of each --find-peak trial (default {d['peak_trial_s']:g})")
    g = p.add_argument_group("verdict")
    g.add_argument("--slo-ms", type=number(gt=0), default=None, help="p99 bound (default 250 ms CPU, 15 ms CUDA)")
    g.add_argument("--min-duration", type=number(ge=0), default=None,
                   help="default: 80%% of --duration")
    g.add_argument("--min-queries", type=number(int, ge=0), default=256, help="default 256")
    g.add_argument("--stability-tol", type=number(ge=0), default=0.10,
                   help="last three windows' throughput within this fraction of each other (default 0.10)")
    g.add_argument("--min-window-queries", type=number(int, ge=0), default=20,
                   help="queries each of the last three windows needs for the stability rule to be judged "
                        "(default 20)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default ./aurora-runs/<UTC time>)")
    g.add_argument("--label", default=None, help="deployment/version label stored in the run")
    g.add_argument("--region", default=None, help="region label stored in the run")
    g.add_argument("--no-report", action="store_true", help="skip report.html")
    g.add_argument("--quiet", action="store_true", help="no progress output")


#: Option groups of ``add_arguments`` that describe the deployment; every other group (load, verdict,
#: output) describes the load or the run.
DEPLOYMENT_GROUPS = ("pipeline",)


def config_split(args: argparse.Namespace) -> tuple[dict, dict]:
    """The run's options as (deployment, load): the split diagnose and compare read from the run's meta.
    Read off this command's own option groups, so a new option lands on its group's side."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    # argparse has no public accessor for its groups; these two attributes are stable since Python 2.7.
    side = {a.dest: g.title in DEPLOYMENT_GROUPS for g in p._action_groups for a in g._group_actions}
    values = {k: v for k, v in vars(args).items() if k not in ("quiet", "no_report") and k in side}
    return ({k: v for k, v in values.items() if side[k]}, {k: v for k, v in values.items() if not side[k]})


class _Gate:
    """Pipeline sink that forwards to the recorder only while the measured run is on, so calibration
    and peak-search trials do not enter the run file."""

    def __init__(self, sink):
        self.sink = sink
        self.on = False
        self.n = 0

    def __call__(self, record):
        if self.on:
            self.n += 1
            self.sink(record)


class _Samples:
    """Keeps telemetry in memory for the summary and the report (10 Hz: a few thousand samples)."""

    def __init__(self):
        self.items = []

    def __call__(self, sample):
        self.items.append(sample)

    def series(self, t_from: int = 0, t_to: int | None = None) -> dict:
        cols: dict = defaultdict(lambda: ([], []))
        for s in list(self.items):
            if s.ts_ns < t_from or (t_to is not None and s.ts_ns > t_to):
                continue
            for k, v in s.values.items():
                ts, vals = cols[(s.source, k)]
                ts.append(s.ts_ns)
                vals.append(v)
        return {k: (np.asarray(t, np.int64), np.asarray(v, np.float64)) for k, (t, v) in cols.items()}


def parse_steps(text: str | None, base_rate: float, duration_s: float) -> list[tuple[float, float]]:
    """"0:40,60:+20%" -> [(0, 40), (60, 48)]. Relative items scale ``base_rate``. Default: +20% halfway.
    A step at or past ``duration_s`` would never run, so it is an error, as is a malformed item."""
    if not text:
        return [(0.0, base_rate), (duration_s / 2, base_rate * 1.2)]
    out: list[tuple[float, float]] = []
    for item in text.split(","):
        t, sep, r = (x.strip() for x in item.partition(":"))
        try:
            if not sep:
                raise ValueError
            t_s = float(t)
            rate = base_rate * (1 + float(r[:-1]) / 100) if r.endswith("%") else float(r)
        except ValueError:
            raise UsageError(f"--steps: expected T:RATE or T:+PCT% items (e.g. 0:40,10:+20%), got {item.strip()!r}"
                             ) from None
        if not (math.isfinite(t_s) and t_s >= 0 and math.isfinite(rate) and rate >= 0):
            raise UsageError(f"--steps: {item.strip()!r} needs a time >= 0 s and a rate >= 0")
        if out and t_s <= out[-1][0]:
            raise UsageError(f"--steps: step times must increase, got {t_s:g} s after {out[-1][0]:g} s")
        if t_s >= duration_s:
            raise UsageError(f"--steps: the step at {t_s:g} s starts after the run ends (--duration {duration_s:g}); "
                             f"raise --duration above {t_s:g} or drop the step")
        out.append((t_s, rate))
    if out[0][0] != 0:
        out.insert(0, (0.0, base_rate))
    return out


_SKIPPED_PHASE = ("--calibrate-s", "--peak-trial-s")


def _ignored(args, given: set[str]) -> list[str]:
    """The given options this run would not use, each with where it applies."""
    s = args.scenario
    calibrates = args.find_peak or (args.rate is None and s in ("server", "step")) \
        or (s == "offline" and args.count is None)
    remote = "configures the in-process Pipeline, not the server at --url"
    rules = [
        ("rate", s in ("server", "step") and not args.find_peak,
         "server and step only; --find-peak searches for the rate"),
        ("load_factor", s in ("server", "step") and args.rate is None and not args.find_peak,
         "scales the calibrated rate of server and step runs without --rate"),
        ("calibrate_s", calibrates, "this run does not calibrate"),
        ("concurrency", s == "closed_loop" or calibrates, "closed_loop and the calibration, which this run skips"),
        ("count", s == "offline", "offline only"),
        ("duration", s != "replay" and not (s == "offline" and args.count is not None),
         "a replay lasts as long as its recording, see --replay-speed" if s == "replay"
         else "offline with --count issues --count queries however long they take"),
        ("steps", s == "step", "step only"),
        ("replay", s == "replay", "--scenario replay only"),
        ("replay_speed", s == "replay", "replay only"),
        ("seed", s in ("server", "step") or args.find_peak, "seeds Poisson arrivals: server, step, --find-peak"),
        ("peak_trial_s", args.find_peak, "--find-peak only"),
        ("connections", bool(args.url), "--url only"),
        ("weights", not args.url, remote),
        ("dtype", not args.url, remote),
        ("buckets", not args.url, remote),
        ("max_queue_size", not args.url, remote),
        ("max_queue_delay_us", not args.url, remote),
        ("max_batch_size", not args.url, remote + "; set --concurrency"),
    ]
    return [f"--{dest.replace('_', '-')} ({why})" for dest, used, why in rules if dest in given and not used]


def check_args(args: argparse.Namespace) -> dict:
    """Fill in ``DEFAULTS`` and the scenario, and reject bad or conflicting options before anything is
    built (a model takes 5-15 s to load and warm up). Every message names the option.
    Returns what it parsed: {"device": str, "buckets": tuple | None, "replay": Scenario | None,
    "warnings": [str]}."""
    given = {k for k, v in vars(args).items() if v is not None}
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.scenario is None:
        args.scenario = "replay" if args.replay else "server"
    if args.scenario == "replay" and not args.replay:
        raise UsageError("--scenario replay needs --replay PATH")
    if args.find_peak and args.scenario != "server":
        raise UsageError(f"--find-peak runs the server scenario; it does not go with "
                         f"{'--scenario ' + args.scenario if 'scenario' in given else '--replay'}")
    ignored = _ignored(args, given)
    # Tuning of a phase this run skips changes nothing measured: a warning. Any other ignored option
    # would leave the user believing the run had a load or a setting it did not have: an error.
    warnings = [x for x in ignored if x.startswith(_SKIPPED_PHASE)]
    if errors := [x for x in ignored if x not in warnings]:
        raise UsageError("this run would ignore " + ", ".join(errors) + f"; drop {'them' if len(errors) > 1 else 'it'}")

    buckets = None
    if args.buckets:
        try:
            buckets = tuple(int(b) for b in args.buckets.split(","))
        except ValueError:
            raise UsageError(f"--buckets: expected ascending batch sizes like 1,2,4,8, got {args.buckets!r}") from None
        if min(buckets) < 1 or list(buckets) != sorted(set(buckets)) or buckets[-1] > args.max_batch_size:
            raise UsageError(f"--buckets: expected ascending sizes from 1 to --max-batch-size "
                             f"({args.max_batch_size}), got {args.buckets}")
    if args.scenario == "step":
        parse_steps(args.steps, 1.0, args.duration)
    replay = None
    if args.scenario == "replay":
        try:
            replay = lg.Scenario.replay(args.replay, args.replay_speed)
        except Exception as e:  # whatever the file is, it is not a usable recording
            raise UsageError(f"--replay {args.replay}: no arrival times read ({_one_line(e)})") from e
    if args.url:
        try:
            u = urllib.parse.urlsplit(args.url)
            ok = u.scheme == "http" and u.hostname and (u.port or 80)
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"--url: expected http://HOST[:PORT]/PATH, got {args.url!r}")
    out = args.out
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out and os.path.exists(os.path.join(out, "run.aurora.sqlite")):
        raise UsageError(f"--out {out}: already holds a run (run.aurora.sqlite); pick a new --out")
    if args.weights and not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights}: no such file")
    device = _device(args.device)
    if args.model and not args.url:
        _check_model(args.model)
    return {"device": device, "buckets": buckets, "replay": replay,
            "warnings": [f"{x} has no effect on this run" for x in warnings]}


def _check_model(name: str) -> None:
    if os.path.exists(name):
        # TorchScript and torch.export files are zip archives; anything else would fail deep in torch
        # after a screenful of its warnings.
        if not (os.path.isfile(name) and zipfile.is_zipfile(name)):
            raise UsageError(f"--model {name}: not a TorchScript or torch.export (.pt2) file")
        return
    import torchvision

    if name not in torchvision.models.list_models():
        raise UsageError(f"--model {name}: no such file, and not a torchvision model name "
                         f"(e.g. resnet50, mobilenet_v3_small)")


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = describe(e)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# Evidence: telemetry summary and the bottleneck verdict
# ---------------------------------------------------------------------------------------------------


def _stat(series: dict, prefix: str, metric: str, fn=np.nanmean):
    vals = [v for (src, m), (_, v) in series.items() if m == metric and src.startswith(prefix) and v.size]
    return float(fn(np.concatenate(vals))) if vals else None


def telemetry_summary(series: dict) -> tuple[list[tuple[str, str]], dict]:
    """Rows for the table, and the numbers behind them (None where not measured)."""
    gpu = any(src.startswith("gpu") for src, _ in series)
    n = {
        "sm_clock_p50": _stat(series, "gpu", "sm_clock_mhz", np.nanmedian),
        "sm_clock_max": _stat(series, "gpu", "sm_clock_max_mhz", np.nanmax),
        "gpu_busy_pct": _stat(series, "gpu", "util_gpu_busy_pct"),
        "temp_margin_min": _stat(series, "gpu", "temp_margin_c", np.nanmin),
        "temp_max": _stat(series, "gpu", "temp_c", np.nanmax),
        "power_mean": _stat(series, "gpu", "power_w"),
        "power_limit": _stat(series, "gpu", "power_limit_w", np.nanmin),
        "mem_used_max": _stat(series, "gpu", "mem_used_bytes", np.nanmax),
        "mem_total": _stat(series, "gpu", "mem_total_bytes", np.nanmax),
        "throttle": {r: v for r in THROTTLE_REASONS
                     if (v := _stat(series, "gpu", f"throttle_frac_{r}")) is not None},
        "cpu_util": _stat(series, "cpu", "cpu_util_pct"),
        "cpu_util_max": _stat(series, "cpu", "cpu_util_pct", np.nanmax),
        "steal": _stat(series, "cpu", "steal_pct"),
        "steal_max": _stat(series, "cpu", "steal_pct", np.nanmax),
        "proc_cpu": _stat(series, "cpu", "proc_cpu_pct"),
        "load1": _stat(series, "cpu", "load1", np.nanmax),
        "cgroup_throttled": _stat(series, "cpu", "cgroup_throttled_frac"),
        "rss_max": _stat(series, "cpu", "proc_rss_bytes", np.nanmax),
        "cores": os.cpu_count(),
    }
    na = "n/a (no GPU)" if not gpu else "n/a (not reported by this GPU)"

    def fmt(ok, text):
        return text if ok else na

    rows = [
        ("GPU SM clock (p50 / max)", fmt(n["sm_clock_p50"] is not None and n["sm_clock_max"],
            f"{n['sm_clock_p50']:.0f} / {n['sm_clock_max']:.0f} MHz "
            f"({n['sm_clock_p50'] / (n['sm_clock_max'] or 1):.0%})" if n["sm_clock_p50"] and n["sm_clock_max"] else "")),
        ("GPU throttled fraction", fmt(bool(n["throttle"]), ", ".join(
            f"{r} {v:.1%}" for r, v in sorted(n["throttle"].items(), key=lambda x: -x[1]) if v > 0) or "none")),
        ("GPU temperature margin (min)", fmt(n["temp_margin_min"] is not None,
            f"{n['temp_margin_min']:.0f} °C to slowdown (max {n['temp_max']:.0f} °C)"
            if n["temp_margin_min"] is not None and n["temp_max"] is not None else "")),
        ("GPU power (mean / limit)", fmt(n["power_mean"] is not None,
            f"{n['power_mean']:.0f} / {n['power_limit']:.0f} W" if n["power_mean"] is not None and n["power_limit"]
            else f"{n['power_mean']:.0f} W" if n["power_mean"] is not None else "")),
        ("GPU memory (max used / total)", fmt(n["mem_used_max"] is not None and n["mem_total"],
            f"{n['mem_used_max'] / 2**30:.1f} / {n['mem_total'] / 2**30:.1f} GiB"
            if n["mem_used_max"] is not None and n["mem_total"] else "")),
        ("GPU busy (time busy, not occupancy)", fmt(n["gpu_busy_pct"] is not None,
            f"{n['gpu_busy_pct']:.0f}%" if n["gpu_busy_pct"] is not None else "")),
        ("CPU utilization (mean / max)", f"{n['cpu_util']:.0f}% / {n['cpu_util_max']:.0f}% of {n['cores']} cores"
            if n["cpu_util"] is not None else "n/a (no CPU samples)"),
        ("this process's CPU (mean)", f"{n['proc_cpu']:.0f}% of one core" if n["proc_cpu"] is not None else "n/a"),
        ("CPU steal (mean / max)", f"{n['steal']:.1f}% / {n['steal_max']:.1f}%" if n["steal"] is not None
            else "n/a (not exposed)"),
        ("load average (max 1 min)", f"{n['load1']:.2f}" if n["load1"] is not None else "n/a"),
        ("cgroup CPU throttled", f"{n['cgroup_throttled']:.1%}" if n["cgroup_throttled"] is not None
            else "n/a (no CPU quota)"),
        ("process RSS (max)", f"{n['rss_max'] / 2**20:.0f} MiB" if n["rss_max"] is not None else "n/a"),
    ]
    return rows, n


def _busy(records, start: str, end: str, t0: int, t1: int) -> float:
    """Fraction of [t0, t1] during which at least one request was in [start, end] (union of intervals)."""
    iv = sorted({(getattr(r, start), getattr(r, end)) for r in records
                 if getattr(r, start, 0) and getattr(r, end, 0) >= getattr(r, start, 0)})
    total, cur_a, cur_b = 0, None, None
    for a, b in iv:
        a, b = max(a, t0), min(b, t1)
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total / max(t1 - t0, 1)


def bottleneck(summary: dict, result: lg.RunResult, tele: dict, capacity: float | None,
               remote: bool = False) -> tuple[str, dict]:
    """One line naming what limits this run, with its numbers, and the evidence as a dict.
    ``remote``: the target is another process on this host, so its CPU use is not contention."""
    st = summary["stages_ms"]
    mean = {k: v["mean"] for k, v in st.items()}
    recs = [r for r, s in zip(result.records, result.status, strict=True) if s == "ok" and hasattr(r, "arrival_ns")]
    ev: dict = {}
    if recs:
        ev["compute_busy"] = _busy(recs, "compute_start_ns", "compute_end_ns", result.t0_ns, result.end_ns)
        ev["preprocess_busy"] = _busy(recs, "decode_start_ns", "preprocess_end_ns", result.t0_ns, result.end_ns)

    limiting = {r: v for r, v in tele["throttle"].items() if r in LIMITING_REASONS and v > THROTTLED_FRAC}
    clock_ratio = (tele["sm_clock_p50"] / tele["sm_clock_max"]) if tele["sm_clock_p50"] and tele["sm_clock_max"] else None
    if limiting or (clock_ratio is not None and clock_ratio < 0.85 and (tele["gpu_busy_pct"] or 0) > 50):
        why = ", ".join(f"{r} {v:.0%} of the time" for r, v in limiting.items()) or "no reason reported"
        ratio = f"SM clock p50 at {clock_ratio:.0%} of max" if clock_ratio is not None else "SM clock not reported"
        return f"hardware-throttled: {ratio}; throttled by {why}", ev
    parts = []
    if (tele["steal"] or 0) > STEAL_PCT:
        parts.append(f"CPU steal {tele['steal']:.1f}% mean (the hypervisor ran someone else)")
    if (tele["cgroup_throttled"] or 0) > CGROUP_THROTTLED_FRAC:
        parts.append(f"cgroup CPU quota throttled {tele['cgroup_throttled']:.0%} of periods")
    cores = tele.get("cores") or 1
    if not remote and tele["cpu_util"] is not None and tele["proc_cpu"] is not None:
        others = tele["cpu_util"] - tele["proc_cpu"] / cores  # % of all cores used by other processes
        ev["other_processes_cpu_pct"] = others
        if tele["cpu_util"] > CPU_BUSY_PCT and others > OTHERS_PCT:
            load = f", load average up to {tele['load1']:.1f} on {cores} cores" if tele["load1"] is not None else ""
            parts.append(f"other processes used {others:.0f}% of the CPU against this one's "
                         f"{tele['proc_cpu'] / cores:.0f}%{load}")
    if parts:
        return "CPU-contended: " + "; ".join(parts), ev

    total = mean.get("total")
    pre = mean.get("decode", 0) + mean.get("preprocess", 0)
    comp = mean.get("h2d", 0) + mean.get("compute", 0) + mean.get("d2h", 0)
    queue = mean.get("queue", 0)
    ev.update(queue_ms=queue, preprocess_ms=pre, compute_ms=comp, total_ms=total)
    cap = f" ({summary['issued_rate'] / capacity:.0%} of the calibrated {capacity:.0f}/s)" if capacity else ""
    # 0.9, not 1.0: achieved counts the drain after the last send, which a short run feels most
    overloaded = summary["achieved_rate"] < 0.9 * summary["issued_rate"] or summary["error_frac"] > 0.01
    if total is None:
        lat = summary["latency_ms"]["mean"]
        return (f"undetermined: the target reports no per-stage timings (mean latency {lat:.1f} ms)", ev)
    busiest = max((("compute", ev.get("compute_busy", 0)), ("decode+preprocess", ev.get("preprocess_busy", 0))),
                  key=lambda x: x[1])
    busy = f"; {busiest[0]} busy {busiest[1]:.0%} of wall time" if recs else ""
    cpu = f", CPU {tele['cpu_util']:.0f}%" if tele["cpu_util"] is not None else ""
    if overloaded:
        return (f"queueing/load-bound: offered {summary['issued_rate']:.1f}/s{cap} but achieved "
                f"{summary['achieved_rate']:.1f}/s with {summary['error_frac']:.1%} errors{busy}{cpu}", ev)
    # Offline and closed loop keep the queue full on purpose: there the question is which stage drains it.
    if summary["scenario"] not in ("offline", "closed_loop") and queue >= max(pre, comp):
        return (f"queueing/load-bound: {queue / total:.0%} of mean latency is queue wait ({queue:.1f} ms) at "
                f"{summary['issued_rate']:.1f}/s{cap}{busy}{cpu}", ev)
    # A saturated pipeline is limited by whichever stage is always busy. Per-request means would say
    # "compute" whenever batches are large (each request waits for its whole batch's compute), even while
    # the compute thread idles for want of decoded images (issue 17: compute busy 55%, decode 99%).
    cb, pb = ev.get("compute_busy"), ev.get("preprocess_busy")
    drains = None  # the always-busy stage of a saturated run, when only one is
    if summary["scenario"] in ("offline", "closed_loop") and cb is not None and pb is not None:
        drains = "preprocess" if cb < SATURATED_BUSY <= pb else "compute" if pb < SATURATED_BUSY <= cb else None
    if drains == "preprocess":
        return (f"preprocessing-bound: decode+preprocess busy {pb:.0%} of wall time while compute idles "
                f"{1 - cb:.0%} of it waiting for batches (per request: decode+preprocess {pre:.1f} ms, compute "
                f"{comp:.1f} ms of {total:.1f} ms){cpu}", ev)
    if pre > comp and drains != "compute":
        return (f"preprocessing-bound: decode+preprocess {pre:.1f} ms of {total:.1f} ms mean latency vs compute "
                f"{comp:.1f} ms{busy}{cpu}", ev)
    return (f"compute-bound: compute {comp:.1f} ms of {total:.1f} ms mean latency vs decode+preprocess "
            f"{pre:.1f} ms{busy}{cpu}", ev)


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def _progress_run(gen: lg.LoadGenerator, scenario: lg.Scenario, title: str, quiet: bool) -> lg.RunResult:
    """Run with a rich progress bar showing live throughput and p99 (over the last 2 s); when stderr is
    not a terminal (logs, CI), one plain line every ``PROGRESS_EVERY_S`` instead."""
    if quiet:
        return gen.run(scenario)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    box: dict = {}

    def work():
        try:
            box["r"] = gen.run(scenario)
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    def live() -> tuple[float, str]:
        p = gen.progress()
        done = p["completed"] if scenario.kind == "offline" else min(p["elapsed_s"], total)
        p99 = f"{p['p99_ms']:.1f} ms" if p["p99_ms"] == p["p99_ms"] else "-"
        return done, f"{p['throughput']:6.1f}/s  p99 {p99}  done {p['completed']}/{p['issued']}"

    th = threading.Thread(target=work, name="aurora-bench-issuer", daemon=True)
    console = _console(stderr=True)
    total = float(scenario.count) if scenario.kind == "offline" else max(scenario.duration_s, 1e-3)
    if console.is_terminal:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[live]}"),
                      TimeElapsedColumn(), console=console, transient=True) as prog:
            task = prog.add_task(title, total=total, live="")
            th.start()
            while th.is_alive():
                th.join(0.25)
                done, text = live()
                prog.update(task, completed=done, live=text)
    else:
        unit = "" if scenario.kind == "offline" else " s"
        th.start()
        t_next = time.monotonic() + PROGRESS_EVERY_S
        while th.is_alive():
            th.join(0.25)
            if th.is_alive() and time.monotonic() >= t_next:
                t_next += PROGRESS_EVERY_S
                done, text = live()
                print(f"{title}: {done:.0f}/{total:.0f}{unit}  {' '.join(text.split())}", file=sys.stderr,
                      flush=True)
    if "error" in box:
        raise box["error"]
    return box["r"]


def _load_model(name: str, weights: str | None):
    """The model (nn.Module) as the Pipeline would load it, loaded here so that a failure names the
    option at fault: --model, or --weights (unreadable, or not fitting the model)."""
    from aurora_core.runner import load_model, load_weights

    try:
        net = load_model(name)
    except Exception as e:
        raise BenchError(f"--model {name}: cannot load it ({_one_line(e)})") from e
    if weights is None:
        return net
    try:
        return load_weights(net, weights)
    except ValueError as e:  # names the file and the misfit; here it is --weights for --model
        raise BenchError(f"--{e} (--model {name})") from e


def _build_target(args, device: str, model: str, buckets, gate: _Gate):
    if args.url:
        u = urllib.parse.urlsplit(args.url)
        try:  # nothing listening is an error now, not 100% failed requests after the whole run
            socket.create_connection((u.hostname, u.port or 80), timeout=5).close()
        except OSError as e:
            raise BenchError(f"--url {args.url}: cannot connect ({_one_line(e)}); is the server running?") from e
        return lg.HttpTarget(args.url, connections=args.connections), None
    from aurora_core.batching import BatchingConfig
    from aurora_core.pipeline import Pipeline

    kw = {"max_batch_size": args.max_batch_size, "max_queue_delay_us": args.max_queue_delay_us,
          "bucket_sizes": buckets}
    if args.max_queue_size is not None:
        kw["max_queue_size"] = args.max_queue_size
    elif args.scenario == "offline":
        # Offline issues every query at t=0; the SUT must take them all (MLPerf), not shed them.
        kw["max_queue_size"] = 1 << 20
    net = _load_model(model, args.weights)
    try:
        # The compiled model from the first request on (a cold compile blocks here), unless AURORA_COMPILE says
        pipe = Pipeline(model=net, batching=BatchingConfig(**kw), device=device, dtype=args.dtype, sink=gate,
                        compile=None if "AURORA_COMPILE" in os.environ else True)
    except Exception as e:
        raise BenchError(f"cannot build the pipeline (--device {args.device}, model {model}"
                         f"{', --dtype ' + args.dtype if args.dtype else ''}): {_one_line(e)}") from e
    return lg.PipelineTarget(pipe), pipe


def _record_client_side(rec, result: lg.RunResult) -> None:
    """A remote target's requests as the client saw them, so the run file can be diagnosed: arrival is
    the scheduled send (the latency every statistic uses) and completion the response."""
    from aurora_core.records import RequestRecord

    for i, (sched, done, status) in enumerate(zip(result.scheduled_ns, result.done_ns, result.status, strict=True)):
        rec(RequestRecord(request_id=i, arrival_ns=int(sched), completion_ns=int(done), status=status,
                          device="remote"))


def _device(arg: str) -> str:
    import torch

    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {arg}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device {arg}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {arg}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return arg


def _nothing_measured(summary: dict, what: str, url: str | None) -> BenchError | None:
    """An error when no query of ``summary`` succeeded: such a run measured nothing (its latency
    percentiles would be nan), so it is an error naming the cause, not an INVALID verdict."""
    if summary["completed_ok"]:
        return None
    n = summary["queries"]
    if not n:
        return BenchError(f"{what}: no query was issued (the schedule is empty; raise --rate or --duration)")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(summary["errors"].items(), key=lambda kv: -kv[1]))
    hint = f"; check the server at --url {url}" if url else ""
    return BenchError(f"{what}: all {n} queries failed ({errors}), nothing was measured{hint}")


def _discard(rec, out: str, created: bool) -> None:
    """Remove a run file that holds no measurement, so that rerunning with the same --out works."""
    with contextlib.suppress(Exception):  # it is being thrown away: a write error does not matter
        rec.close()
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{rec.path}{suffix}")
    if created:
        with contextlib.suppress(OSError):  # only if empty
            os.rmdir(out)


def run(args: argparse.Namespace) -> int:
    from aurora_core.errors import AuroraError

    try:
        prep = check_args(args)
        for w in prep["warnings"]:
            print(f"aurora bench: warning: {w}", file=sys.stderr)
        return _run(args, prep)
    except KeyboardInterrupt:
        return 130  # _run said what became of the run file
    except BrokenPipeError:
        raise  # cli.main: exit 141, no claim about the run
    except (BenchError, AuroraError, ValueError, OSError) as e:
        print(f"aurora bench: error: {e}", file=sys.stderr)
        return 2


def _console(**kw):
    """A rich Console that lets a closed pipe (``aurora bench | head``) raise BrokenPipeError, which the
    ``aurora`` command turns into exit 141. rich's own handling exits 1, which reads as INVALID."""
    from rich.console import Console

    class _PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _PipeConsole(**kw)


def _run(args: argparse.Namespace, prep: dict) -> int:
    from aurora_core import report, samples
    from aurora_core.recorder import Recorder
    from aurora_core.telemetry.sampler import TelemetrySampler

    wall0 = time.monotonic()
    console = _console()
    if not console.is_terminal:  # logs and CI: do not wrap the tables at 80 columns
        console = _console(width=130)
    device = prep["device"]
    slo_ms = args.slo_ms if args.slo_ms is not None else DEFAULT_SLO_MS["cuda" if device.startswith("cuda") else "cpu"]
    out = args.out or os.path.join("aurora-runs", _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    payloads = samples.default_mix()
    model = args.model or ("resnet50" if device.startswith("cuda") else "mobilenet_v3_small")

    deployment, load = config_split(args)
    meta = {"label": args.label, "region": args.region, "tool": "aurora bench",
            "model": (args.model or "the server's") if args.url else model,
            "config": {k: v for k, v in vars(args).items() if k not in ("quiet", "no_report")},
            "deployment": deployment, "load": load}
    meta = {k: v for k, v in meta.items() if v is not None}
    rec = Recorder(path=out, meta=meta)
    gate = _Gate(rec)
    mem = _Samples()
    sampler = TelemetrySampler(callbacks=[rec.add_sample, mem], event_callbacks=[rec.add_event], period_s=0.1)
    # "setup" until requests may enter the run file, then "measuring"; "closed" once it is final. A run
    # that ends in setup (an error, Ctrl-C) or that measured nothing leaves no run file behind.
    state = "setup"
    try:
        target = pipe = None
        try:
            sampler.start()
            console.print(f"[bold]aurora bench[/]: device {device}, model {meta['model']}, "
                          f"{'HTTP ' + args.url if args.url else 'in-process Pipeline'}; output {out}")
            t_build = time.monotonic()
            with console.status("building the target (model load, warm-up of every batch bucket)"):
                target, pipe = _build_target(args, device, model, prep["buckets"], gate)
            console.print(f"target ready in {time.monotonic() - t_build:.1f} s")
            gen = lg.LoadGenerator(target, payloads)

            conc = args.concurrency or 2 * args.max_batch_size
            capacity = None
            need_capacity = args.find_peak or (args.rate is None and args.scenario in ("server", "step")) \
                or (args.scenario == "offline" and args.count is None)
            if need_capacity:
                cal = _progress_run(gen, lg.Scenario.closed_loop(conc, args.calibrate_s), "calibrating", args.quiet)
                cs = lg.summarize(cal)
                if err := _nothing_measured(cs, "calibration", args.url):
                    raise err
                capacity = cs["throughput"]
                console.print(f"capacity (closed loop, {conc} in flight, {args.calibrate_s:g} s): "
                              f"{capacity:.1f} queries/s")
            rate = args.rate if args.rate is not None else (capacity or 0) * args.load_factor

            peak = None
            if args.find_peak:
                def measure(r: float) -> dict:
                    res = _progress_run(gen, lg.Scenario.server(r, args.peak_trial_s, args.seed),
                                        f"peak trial {r:.1f}/s", args.quiet)
                    s = lg.summarize(res)
                    console.print(f"  trial {r:7.1f}/s: p99 {s['latency_ms']['p99']:8.1f} ms, "
                                  f"errors {s['error_frac']:.1%}")
                    return s
                pr = lg.find_peak(measure, slo_ms, 0.0, capacity * 1.1)
                peak = {"peak_rate": pr.peak_rate, "slo_ms": slo_ms, "trials": [
                    {"rate": r, "passed": ok, "p99_ms": s["latency_ms"]["p99"], "error_frac": s["error_frac"]}
                    for r, ok, s in pr.trials]}
                if pr.peak_rate <= 0:
                    raise BenchError(f"find-peak: no rate met p99 <= {slo_ms:g} ms")
                rate = pr.peak_rate
                console.print(f"peak: {rate:.1f}/s; confirming for {args.duration:g} s")
                scenario = lg.Scenario.server(rate, args.duration, args.seed)
            elif args.scenario == "server":
                scenario = lg.Scenario.server(rate, args.duration, args.seed)
            elif args.scenario == "step":
                steps = parse_steps(args.steps, rate, args.duration)
                # diagnose tells a load step from Poisson noise by the offered schedule (s from the first arrival).
                rec.set_meta("offered_schedule", [[float(t), float(r)] for t, r in steps])
                scenario = lg.Scenario.step(steps, args.duration, args.seed)
            elif args.scenario == "offline":
                scenario = lg.Scenario.offline(args.count or max(1, int(capacity * args.duration)))
            elif args.scenario == "closed_loop":
                scenario = lg.Scenario.closed_loop(conc, args.duration)
            elif args.scenario == "single_stream":
                scenario = lg.Scenario.single_stream(args.duration)
            else:
                scenario = prep["replay"]

            if scenario.kind == "server":
                # aurora compare matches load on the offered rate when both runs carry it.
                rec.set_meta("offered_rate_per_s", float(rate))
            state = "measuring"
            gate.on = True
            result = _progress_run(gen, scenario, scenario.kind, args.quiet)
            gate.on = False
            if pipe is None:
                _record_client_side(rec, result)
        finally:
            gate.on = False
            if pipe is not None:
                pipe.close()
            if target is not None:
                target.close()
            sampler.stop()

        summary = lg.summarize(result)
        if err := _nothing_measured(summary, "the measured run", args.url):
            state = "setup"  # nothing measured: the run file would only mislead diagnose and compare
            raise err
        min_dur = args.min_duration if args.min_duration is not None else 0.8 * scenario.duration_s
        rules = lg.Rules(min_duration_s=min_dur, min_queries=args.min_queries, slo_ms=slo_ms,
                         stability_tol=args.stability_tol, min_window_queries=args.min_window_queries)
        valid, reasons = lg.verdict(summary, rules)
        series = mem.series(result.t0_ns, result.end_ns)
        tele_rows, tele = telemetry_summary(series)
        verdict_line, evidence = bottleneck(summary, result, tele, capacity, remote=pipe is None)

        files = {"run": os.path.join(out, "run.aurora.sqlite"), "summary": os.path.join(out, "summary.json")}
        hw = {"host": platform.node(), "machine": platform.machine(), "cpu_cores": os.cpu_count(),
              "device": device, "gpu": rec.meta.get("gpu"), "cpu": rec.meta.get("cpu"),
              "versions": rec.meta.get("versions")}
        doc = {"valid": valid, "verdict": "VALID" if valid else "INVALID", "reasons": reasons,
               "bottleneck": verdict_line, "evidence": evidence, "summary": summary, "capacity": capacity,
               "rate": rate if scenario.kind in ("server", "step") else None, "slo_ms": slo_ms, "peak": peak,
               "telemetry": dict(tele_rows), "hardware": hw, "config": meta["config"], "files": files,
               "capabilities": sampler.capabilities()}
        rec.set_meta("capabilities", doc["capabilities"])
        rec.set_meta("bench", {k: doc[k] for k in ("verdict", "reasons", "bottleneck", "capacity", "rate", "slo_ms")})
        rec.set_meta("scenario", scenario.describe())
        rec.close()
        state = "closed"
    except BaseException as e:
        stopped = isinstance(e, KeyboardInterrupt)
        if state == "measuring":
            # Ctrl-C, a closed pipe or an error: diagnose and compare must not take a cut-short run for a
            # complete one.
            rec.set_meta("interrupted", True)
            rec.close()  # keep what was recorded readable
        elif state == "setup":
            _discard(rec, out, created)
        if stopped:
            print("aurora bench: interrupted; " + (
                f"the partial run file {rec.path} ({gate.n} requests) is marked interrupted"
                if state == "measuring" else "nothing was measured and no run file was kept"), file=sys.stderr)
        raise

    try:
        if not args.no_report:
            files["report"] = os.path.join(out, "report.html")
            report.render(files["report"], result=result, summary=summary, valid=valid, reasons=reasons,
                          bottleneck=verdict_line, telemetry=tele_rows, samples=series, slo_ms=slo_ms, peak=peak,
                          meta={**{k: v for k, v in rec.meta.items() if k != "capabilities"}, **hw,
                                "scenario": scenario.describe(), "capacity_qps": capacity},
                          extra=[_diagnosis(files["run"])])
        doc["wall_s"] = time.monotonic() - wall0
        with open(files["summary"], "w") as f:
            json.dump(doc, f, indent=2, default=str)
    except KeyboardInterrupt:
        print(f"aurora bench: interrupted; the run file {rec.path} is complete", file=sys.stderr)
        raise

    _print(console, summary, tele_rows, valid, reasons, verdict_line, files, peak, capacity, doc["wall_s"])
    return 0 if valid else 1


def _diagnosis(run_path: str):
    """Adds this run's diagnosis to the report page; a failed diagnosis says why instead."""
    def add(page) -> None:
        from aurora_core.diagnose import diagnose
        from aurora_core.diagnose.html import add_diagnosis, diagnose_cards

        page.h("Diagnosis")
        try:
            res = diagnose([run_path])
        except Exception as e:  # the bench result stands without it
            page.p(f"diagnosis failed: {e!r}")
            return
        add_diagnosis(page, res, diagnose_cards(res.data))
    return add


def _print(console, s: dict, tele_rows, valid, reasons, verdict_line, files, peak, capacity, wall_s) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{escape(s['scenario_desc'])}", highlight=False)
    t = Table()
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("throughput", f"{s['throughput']:.1f} queries/s")
    t.add_row("issued / achieved rate", f"{s['issued_rate']:.1f} / {s['achieved_rate']:.1f} /s")
    if capacity:
        t.add_row("calibrated capacity", f"{capacity:.1f} /s")
    if peak:
        t.add_row(f"peak rate (p99 <= {peak['slo_ms']:g} ms)", f"{peak['peak_rate']:.1f} /s")
    t.add_row("queries (ok)", f"{s['queries']} ({s['completed_ok']})")
    t.add_row("errors", ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none")
    t.add_row("send drift p99 / max", f"{s['send_drift_ms']['p99']:.2f} / {s['send_drift_ms']['max']:.2f} ms")
    if s["batch_size_mean"] is not None:
        t.add_row("mean batch size", f"{s['batch_size_mean']:.1f}")
    console.print(t)

    cols = ("p50", "p90", "p95", "p99", "p99.9", "max")
    lt = Table(title="latency (ms, from scheduled send)", title_justify="left")
    lt.add_column("")
    for c in cols:
        lt.add_column(c, justify="right")
    lt.add_row("[bold]end to end", *(f"{s['latency_ms'][c]:.2f}" for c in cols))
    for stage, v in s["stages_ms"].items():
        lt.add_row(stage, *(f"{v[c]:.2f}" for c in cols))
    console.print(lt)

    tt = Table(title="telemetry", title_justify="left")
    tt.add_column("metric")
    tt.add_column("value", justify="right")
    for k, v in tele_rows:
        tt.add_row(k, v)
    console.print(tt)

    for r in reasons:
        console.print(("  [green]" if r.startswith("ok") else "  [red]") + escape(r), highlight=False)
    console.print(f"[bold]{'[green]VALID' if valid else '[red]INVALID'}[/]  bottleneck: {escape(verdict_line)}",
                  highlight=False)
    console.print("files: " + escape(", ".join(f"{k} {v}" for k, v in files.items())), highlight=False)
    console.print(f"wall time {wall_s:.1f} s", highlight=False)
