"""``aurora bench``: what this hardware sustains, where each millisecond goes, and whether it held its clocks.

With no arguments: the packaged sample photos (``samples.default_mix()``), the default model for the
device found, a short closed-loop calibration of capacity, then the Server scenario (seeded Poisson)
at 50% of that capacity. It prints the results table, the telemetry summary and a one-line
bottleneck verdict, and writes the run file (``run.aurora.sqlite``), ``summary.json`` and
``report.html`` under ``--out``. Exit code: 0 when the run is VALID, 1 when INVALID, 2 on an error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import threading
import time
from collections import defaultdict

import numpy as np

from aurora_core import loadgen as lg
from aurora_core.report import LIMITING_REASONS, THROTTLE_REASONS

SCENARIOS = ("server", "single_stream", "offline", "closed_loop", "step", "replay")
DEFAULT_SLO_MS = {"cpu": 250.0, "cuda": 15.0}  # CPU: issue 3's bound; CUDA: MLPerf Server, ResNet-50


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--model", default=None, help="torchvision name or model file (default: resnet50 on CUDA, "
                   "mobilenet_v3_small on CPU)")
    g.add_argument("--weights", default=None, help="local state_dict for --model (default: seeded random init)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default auto)")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="model dtype")
    g.add_argument("--max-batch-size", type=int, default=16)
    g.add_argument("--max-queue-delay-us", type=int, default=2000)
    g.add_argument("--buckets", default=None, help="padded batch sizes, e.g. 1,2,4,8,16")
    g.add_argument("--max-queue-size", type=int, default=None, help="admission limit (Overloaded past it)")
    g.add_argument("--url", default=None, help="benchmark an HTTP server (POST raw bytes, e.g. "
                   "http://127.0.0.1:8000/v1/classify) instead of an in-process Pipeline")
    g = p.add_argument_group("load")
    g.add_argument("--connections", type=int, default=64, help="HTTP connections (with --url)")
    g.add_argument("--scenario", default="server", choices=SCENARIOS)
    g.add_argument("--rate", type=float, default=None, help="queries/s for server/step "
                   "(default: calibrated, --load-factor of capacity)")
    g.add_argument("--load-factor", type=float, default=0.5,
                   help="calibrated rate = this x capacity (0.5: a closed-loop probe with 32 in flight "
                        "overstates what an open-loop arrival stream can get within the SLO)")
    g.add_argument("--calibrate-s", type=float, default=4.0, help="closed-loop capacity probe length")
    g.add_argument("--duration", type=float, default=25.0, help="seconds of measured load (default 25)")
    g.add_argument("--concurrency", type=int, default=None, help="closed_loop in flight (default 2x batch)")
    g.add_argument("--count", type=int, default=None, help="offline queries (default ~duration of work)")
    g.add_argument("--steps", default=None, help="step scenario: T:RATE or T:+PCT%% items, e.g. 0:40,60:+20%%")
    g.add_argument("--replay", default=None, help="replay arrivals: a run dir/.sqlite, .npy (ns) or text (s)")
    g.add_argument("--replay-speed", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--find-peak", action="store_true", help="bisect for the highest Poisson rate with p99 <= SLO, "
                   "then run --duration at it")
    g.add_argument("--peak-trial-s", type=float, default=8.0, help="length of each --find-peak trial")
    g = p.add_argument_group("verdict")
    g.add_argument("--slo-ms", type=float, default=None, help="p99 bound (default 250 ms CPU, 15 ms CUDA)")
    g.add_argument("--min-duration", type=float, default=None, help="default: 80%% of --duration")
    g.add_argument("--min-queries", type=int, default=256)
    g.add_argument("--stability-tol", type=float, default=0.10,
                   help="last three windows' throughput within this fraction of each other (default 0.10)")
    g.add_argument("--min-window-queries", type=int, default=20,
                   help="queries each of the last three windows needs for the stability rule to be judged")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default ./aurora-runs/<UTC time>)")
    g.add_argument("--label", default=None, help="deployment/version label stored in the run")
    g.add_argument("--region", default=None, help="region label stored in the run")
    g.add_argument("--no-report", action="store_true", help="skip report.html")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


class _Gate:
    """Pipeline sink that forwards to the recorder only while the measured run is on, so calibration
    and peak-search trials do not enter the run file."""

    def __init__(self, sink):
        self.sink = sink
        self.on = False

    def __call__(self, record):
        if self.on:
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
    """"0:40,60:+20%" -> [(0, 40), (60, 48)]. Relative items scale ``base_rate``. Default: +20% halfway."""
    if not text:
        return [(0.0, base_rate), (duration_s / 2, base_rate * 1.2)]
    out = []
    for item in text.split(","):
        t, _, r = item.strip().partition(":")
        r = r.strip()
        rate = base_rate * (1 + float(r[:-1]) / 100) if r.endswith("%") else float(r)
        out.append((float(t), rate))
    if not out or out[0][0] != 0:
        out.insert(0, (0.0, base_rate))
    return out


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

    limiting = {r: v for r, v in tele["throttle"].items() if r in LIMITING_REASONS and v > 0.05}
    clock_ratio = (tele["sm_clock_p50"] / tele["sm_clock_max"]) if tele["sm_clock_p50"] and tele["sm_clock_max"] else None
    if limiting or (clock_ratio is not None and clock_ratio < 0.85 and (tele["gpu_busy_pct"] or 0) > 50):
        why = ", ".join(f"{r} {v:.0%} of the time" for r, v in limiting.items()) or "no reason reported"
        ratio = f"SM clock p50 at {clock_ratio:.0%} of max" if clock_ratio is not None else "SM clock not reported"
        return f"hardware-throttled: {ratio}; throttled by {why}", ev
    parts = []
    if (tele["steal"] or 0) > 5:
        parts.append(f"CPU steal {tele['steal']:.1f}% mean (the hypervisor ran someone else)")
    if (tele["cgroup_throttled"] or 0) > 0.05:
        parts.append(f"cgroup CPU quota throttled {tele['cgroup_throttled']:.0%} of periods")
    cores = tele.get("cores") or 1
    if not remote and tele["cpu_util"] is not None and tele["proc_cpu"] is not None:
        others = tele["cpu_util"] - tele["proc_cpu"] / cores  # % of all cores used by other processes
        ev["other_processes_cpu_pct"] = others
        if tele["cpu_util"] > 90 and others > 25:
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
    if pre > comp:
        return (f"preprocessing-bound: decode+preprocess {pre:.1f} ms of {total:.1f} ms mean latency vs compute "
                f"{comp:.1f} ms{busy}{cpu}", ev)
    return (f"compute-bound: compute {comp:.1f} ms of {total:.1f} ms mean latency vs decode+preprocess "
            f"{pre:.1f} ms{busy}{cpu}", ev)


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def _progress_run(gen: lg.LoadGenerator, scenario: lg.Scenario, title: str, quiet: bool) -> lg.RunResult:
    """Run with a rich progress bar showing live throughput and p99 (over the last 2 s)."""
    if quiet:
        return gen.run(scenario)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    box: dict = {}

    def work():
        try:
            box["r"] = gen.run(scenario)
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    th = threading.Thread(target=work, name="aurora-bench-issuer", daemon=True)
    console = Console(stderr=True)
    total = float(scenario.count) if scenario.kind == "offline" else max(scenario.duration_s, 1e-3)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[live]}"),
                  TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task(title, total=total, live="")
        th.start()
        while th.is_alive():
            th.join(0.25)
            p = gen.progress()
            done = p["completed"] if scenario.kind == "offline" else min(p["elapsed_s"], total)
            p99 = f"{p['p99_ms']:.1f} ms" if p["p99_ms"] == p["p99_ms"] else "-"
            prog.update(task, completed=done,
                        live=f"{p['throughput']:6.1f}/s  p99 {p99}  done {p['completed']}/{p['issued']}")
    if "error" in box:
        raise box["error"]
    return box["r"]


def _build_target(args, device: str, gate: _Gate):
    if args.url:
        return lg.HttpTarget(args.url, connections=args.connections), None
    from aurora_core.batching import BatchingConfig
    from aurora_core.pipeline import Pipeline

    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else None
    kw = {"max_batch_size": args.max_batch_size, "max_queue_delay_us": args.max_queue_delay_us,
          "bucket_sizes": buckets}
    if args.max_queue_size is not None:
        kw["max_queue_size"] = args.max_queue_size
    elif args.scenario == "offline":
        # Offline issues every query at t=0; the SUT must take them all (MLPerf), not shed them.
        kw["max_queue_size"] = 1 << 20
    pipe = Pipeline(model=args.model, batching=BatchingConfig(**kw), device=device, dtype=args.dtype,
                    weights=args.weights, sink=gate)
    return lg.PipelineTarget(pipe), pipe


def _record_client_side(rec, result: lg.RunResult) -> None:
    """A remote target's requests as the client saw them, so the run file can be diagnosed: arrival is
    the scheduled send (the latency every statistic uses) and completion the response."""
    from aurora_core.records import RequestRecord

    for i, (sched, done, status) in enumerate(zip(result.scheduled_ns, result.done_ns, result.status, strict=True)):
        rec(RequestRecord(request_id=i, arrival_ns=int(sched), completion_ns=int(done), status=status,
                          device="remote"))


def _device(arg: str) -> str:
    if arg != "auto":
        return arg
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from aurora_core.errors import AuroraError

    try:
        return _run(args)
    except (AuroraError, ValueError, OSError) as e:
        print(f"aurora bench: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from aurora_core import report, samples
    from aurora_core.recorder import Recorder
    from aurora_core.telemetry.sampler import TelemetrySampler

    wall0 = time.monotonic()
    if args.scenario == "replay" and not args.replay:
        raise ValueError("--scenario replay needs --replay PATH")
    if args.steps and args.scenario != "step":
        raise ValueError("--steps applies to --scenario step only")
    console = Console()
    if not console.is_terminal:  # logs and CI: do not wrap the tables at 80 columns
        console = Console(width=130)
    device = _device(args.device)
    slo_ms = args.slo_ms if args.slo_ms is not None else DEFAULT_SLO_MS["cuda" if device.startswith("cuda") else "cpu"]
    out = args.out or os.path.join("aurora-runs", _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    os.makedirs(out, exist_ok=True)
    payloads = samples.default_mix()

    meta = {"label": args.label, "region": args.region, "tool": "aurora bench",
            "model": (args.model or "the server's") if args.url else
                     (args.model or ("resnet50" if device.startswith("cuda") else "mobilenet_v3_small")),
            "config": {k: v for k, v in vars(args).items() if k not in ("quiet", "no_report")}}
    meta = {k: v for k, v in meta.items() if v is not None}
    rec = Recorder(path=out, meta=meta)
    gate = _Gate(rec)
    mem = _Samples()
    sampler = TelemetrySampler(callbacks=[rec.add_sample, mem], event_callbacks=[rec.add_event], period_s=0.1)
    target = pipe = None
    finished = False
    try:
        sampler.start()
        console.print(f"[bold]aurora bench[/]: device {device}, model {meta['model']}, "
                      f"{'HTTP ' + args.url if args.url else 'in-process Pipeline'}; output {out}")
        t_build = time.monotonic()
        with console.status("building the target (model load, warm-up of every batch bucket)"):
            target, pipe = _build_target(args, device, gate)
        console.print(f"target ready in {time.monotonic() - t_build:.1f} s")
        if pipe is not None:
            rec.set_meta("model", pipe.model_name)
            meta["model"] = pipe.model_name
        gen = lg.LoadGenerator(target, payloads)

        conc = args.concurrency or 2 * args.max_batch_size
        capacity = None
        need_capacity = args.find_peak or (args.rate is None and args.scenario in ("server", "step")) \
            or (args.scenario == "offline" and args.count is None)
        if need_capacity:
            cal = _progress_run(gen, lg.Scenario.closed_loop(conc, args.calibrate_s), "calibrating", args.quiet)
            cs = lg.summarize(cal)
            capacity = cs["throughput"]
            if capacity <= 0:
                raise ValueError(f"calibration completed no query (errors: {cs['errors']})")
            console.print(f"capacity (closed loop, {conc} in flight, {args.calibrate_s:g} s): "
                          f"{capacity:.1f} queries/s")
        rate = args.rate if args.rate is not None else (capacity or 0) * args.load_factor

        peak = None
        if args.find_peak:
            def measure(r: float) -> dict:
                res = _progress_run(gen, lg.Scenario.server(r, args.peak_trial_s, args.seed), f"peak trial {r:.1f}/s",
                                    args.quiet)
                s = lg.summarize(res)
                console.print(f"  trial {r:7.1f}/s: p99 {s['latency_ms']['p99']:8.1f} ms, "
                              f"errors {s['error_frac']:.1%}")
                return s
            pr = lg.find_peak(measure, slo_ms, 0.0, capacity * 1.1)
            peak = {"peak_rate": pr.peak_rate, "slo_ms": slo_ms, "trials": [
                {"rate": r, "passed": ok, "p99_ms": s["latency_ms"]["p99"], "error_frac": s["error_frac"]}
                for r, ok, s in pr.trials]}
            if pr.peak_rate <= 0:
                raise ValueError(f"find-peak: no rate met p99 <= {slo_ms:g} ms")
            rate = pr.peak_rate
            console.print(f"peak: {rate:.1f}/s; confirming for {args.duration:g} s")
            scenario = lg.Scenario.server(rate, args.duration, args.seed)
        elif args.scenario == "server":
            scenario = lg.Scenario.server(rate, args.duration, args.seed)
        elif args.scenario == "step":
            scenario = lg.Scenario.step(parse_steps(args.steps, rate, args.duration), args.duration, args.seed)
        elif args.scenario == "offline":
            scenario = lg.Scenario.offline(args.count or max(1, int(capacity * args.duration)))
        elif args.scenario == "closed_loop":
            scenario = lg.Scenario.closed_loop(conc, args.duration)
        elif args.scenario == "single_stream":
            scenario = lg.Scenario.single_stream(args.duration)
        else:
            scenario = lg.Scenario.replay(args.replay, args.replay_speed)

        if scenario.kind == "server":
            # aurora compare matches load on the offered rate when both runs carry it.
            rec.set_meta("offered_rate_per_s", float(rate))
        gate.on = True
        result = _progress_run(gen, scenario, scenario.kind, args.quiet)
        gate.on = False
        if pipe is None:
            _record_client_side(rec, result)
        finished = True
    finally:
        gate.on = False
        if pipe is not None:
            pipe.close()
        if target is not None:
            target.close()
        sampler.stop()
        if not finished:
            rec.close()  # keep what was recorded readable even when the run failed

    summary = lg.summarize(result)
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

    if not args.no_report:
        files["report"] = os.path.join(out, "report.html")
        report.render(files["report"], result=result, summary=summary, valid=valid, reasons=reasons,
                      bottleneck=verdict_line, telemetry=tele_rows, samples=series, slo_ms=slo_ms, peak=peak,
                      meta={**{k: v for k, v in rec.meta.items() if k != "capabilities"}, **hw,
                            "scenario": scenario.describe(), "capacity_qps": capacity},
                      extra_sections=_diagnosis_section(files["run"]))
    doc["wall_s"] = time.monotonic() - wall0
    with open(files["summary"], "w") as f:
        json.dump(doc, f, indent=2, default=str)

    _print(console, summary, tele_rows, valid, reasons, verdict_line, files, peak, capacity, doc["wall_s"])
    return 0 if valid else 1


def _diagnosis_section(run_path: str) -> list[tuple[str, str]]:
    """The diagnosis of this run, when ``aurora_core.diagnose`` provides an HTML section."""
    try:
        from aurora_core.diagnose import diagnose
        from aurora_core.diagnose.report import render_section
    except ImportError:
        return []
    try:
        return [("", render_section(diagnose([run_path])))]
    except Exception as e:  # the bench result stands without it; say why it is missing
        import html

        return [("Diagnosis", f"<p>diagnosis failed: {html.escape(repr(e))}</p>")]


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
