"""``aurora telemetry``: record an NVML trace on a GPU, watch live telemetry, replay or synthesise traces.

    aurora telemetry record --out gpu.jsonl --duration 30 [--period 0.1] [--load matmul]
    aurora telemetry show [--duration 5] [--period 0.5] [--json]
    aurora telemetry replay tests/data/nvml/synthetic_thermal.jsonl [--json]
    aurora telemetry synth --kind thermal --start 1 --end 2 --out thermal.jsonl

``record`` runs the real sampler against the real pynvml through ``replay.RecordingNvml``: every NVML
call, its raw return or error code and its time go to the trace (format: ``aurora_core.telemetry.replay``).
``--load matmul`` keeps the GPU busy with fp16 matmuls on another thread so the trace shows a loaded GPU.
At the end it prints the sampler's own CPU time as a percentage of one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from aurora_core.cli import number
from aurora_core.records import Event, Sample

SHOWN = ("util_gpu_busy_pct", "sm_clock_mhz", "sm_clock_max_mhz", "temp_c", "temp_margin_c", "power_w",
         "power_limit_w", "clocks_event_reasons", "idle_clocks", "stale_age_s", "cpu_util_pct", "steal_pct",
         "load1", "psi_cpu_some_avg10")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aurora_core.telemetry.replay import EPISODES

    seconds = number(gt=0)
    # metavar: argparse names a missing subcommand by it ("required: action" said nothing to a user)
    sub = parser.add_subparsers(dest="action", required=True, metavar="{record,show,replay,synth}")
    rec = sub.add_parser("record", help="capture an NVML trace on this machine's GPUs")
    rec.add_argument("--out", required=True, help="trace file to write (JSON Lines)")
    rec.add_argument("--duration", type=seconds, default=10.0, help="seconds to record (default 10)")
    rec.add_argument("--period", type=seconds, default=0.1, help="sampling period in seconds (default 0.1)")
    rec.add_argument("--load", choices=("none", "matmul"), default="none",
                     help="generate GPU load while recording (needs torch with CUDA)")
    rec.add_argument("--note", default="", help="free text stored in the trace header (e.g. the card)")
    show = sub.add_parser("show", help="print live telemetry samples")
    show.add_argument("--duration", type=seconds, default=3.0, help="seconds to watch (default 3)")
    show.add_argument("--period", type=seconds, default=0.5, help="sampling period in seconds (default 0.5)")
    show.add_argument("--json", action="store_true", help="one JSON object per sample")
    rep = sub.add_parser("replay", help="print the samples a recorded trace produces")
    rep.add_argument("trace", help="trace file (JSON Lines)")
    rep.add_argument("--json", action="store_true", help="one JSON object per sample")
    syn = sub.add_parser("synth", help="write a synthetic trace with one throttle episode")
    syn.add_argument("--kind", default="thermal", choices=sorted(EPISODES), help="the episode (default thermal)")
    syn.add_argument("--start", type=number(ge=0), default=1.0, help="episode start, s")
    syn.add_argument("--end", type=seconds, default=2.0, help="episode end, s (after --start)")
    syn.add_argument("--duration", type=seconds, default=None, help="trace length, s (default end + 1)")
    syn.add_argument("--period", type=seconds, default=0.1, help="sampling period, s")
    syn.add_argument("--severity", type=number(ge=0, le=1), default=1.0,
                     help="throttled share of the episode, 0..1")
    syn.add_argument("--out", required=True, help="trace file to write")


def run(args: argparse.Namespace) -> int:
    return {"record": _record, "show": _show, "replay": _replay, "synth": _synth}[args.action](args)


def format_sample(s: Sample, t0_ns: int) -> str:
    """One line: time since t0, source, the main metrics, and every non-zero throttle fraction."""
    parts = [f"{(s.ts_ns - t0_ns) / 1e9:8.2f}s", f"{s.source:5s}"]
    for k in SHOWN:
        if k in s.values:
            x = s.values[k]
            parts.append(f"{k}={int(x):#x}" if k == "clocks_event_reasons" else f"{k}={x:.4g}")
    for k, x in sorted(s.values.items()):
        if k.startswith("throttle_frac_") and x > 0:
            parts.append(f"{k}={x:.3f}")
    return " ".join(parts)


def _emit(s: Sample, t0: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ts_ns": s.ts_ns, "source": s.source, "values": s.values}))
    else:
        print(format_sample(s, t0))


def _replay(args) -> int:
    from aurora_core.telemetry.replay import replay_trace

    try:
        samples, events, caps = replay_trace(args.trace, base_ns=0)
    except OSError as e:
        print(f"aurora telemetry replay: error: cannot read {args.trace}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"aurora telemetry replay: error: {args.trace}: {e}", file=sys.stderr)
        return 2
    for s in samples:
        _emit(s, 0, args.json)
    for e in events:
        print(f"{e.ts_ns / 1e9:8.2f}s event {e.source} {e.kind} value={e.value:g} {e.detail}")
    if not args.json:
        for src, c in caps.items():
            print(f"{src}: {c['info']}; {len(c['supported'])} metrics read, {len(c['missing'])} missing")
            for m, why in c["missing"].items():
                print(f"  missing {m}: {why}")
    return 0


def _show(args) -> int:
    from aurora_core.records import now_ns
    from aurora_core.telemetry.sampler import TelemetrySampler

    t0 = now_ns()
    lock = threading.Lock()

    def out(s: Sample) -> None:
        with lock:
            _emit(s, t0, args.json)

    def ev(e: Event) -> None:
        with lock:
            print(f"event {e.source} {e.kind} value={e.value:g} {e.detail}", file=sys.stderr)

    with TelemetrySampler(callbacks=[out], event_callbacks=[ev], period_s=args.period) as sampler:
        time.sleep(args.duration)
    for k, why in sampler.missing().items():
        print(f"missing {k}: {why}", file=sys.stderr)
    return 0


def _synth(args) -> int:
    from aurora_core.telemetry.replay import make_synthetic_trace

    if args.end <= args.start:
        print(f"aurora telemetry synth: error: --end ({args.end:g}) must be after --start ({args.start:g})",
              file=sys.stderr)
        return 2
    if args.duration is not None and args.duration < args.end:
        print(f"aurora telemetry synth: error: --duration ({args.duration:g}) must be >= --end ({args.end:g}): "
              "the episode would be cut off", file=sys.stderr)
        return 2
    try:
        lines = make_synthetic_trace(args.kind, args.start, args.end, duration_s=args.duration,
                                     period_s=args.period, severity=args.severity, out=args.out)
    except OSError as e:
        print(f"aurora telemetry synth: error: cannot write --out {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {sum(1 for x in lines if 'tick' in x)} ticks, {len(lines)} lines")
    return 0


def _matmul_load(stop: threading.Event) -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    while not stop.is_set():
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()


def _record(args) -> int:
    import pynvml

    from aurora_core.telemetry.nvml import nvml_error_text
    from aurora_core.telemetry.replay import RecordingNvml
    from aurora_core.telemetry.sampler import TelemetrySampler

    try:
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        names = [str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(n)]
        pynvml.nvmlShutdown()
    except Exception as exc:
        print(f"aurora telemetry record: error: NVML is not usable here ({nvml_error_text(exc)}); "
              "run this on a machine with an NVIDIA GPU and driver.", file=sys.stderr)
        return 2
    rec = RecordingNvml(pynvml, out=args.out, header={"period_s": args.period, "duration_s": args.duration,
                                                      "gpus": names, "load": args.load, "note": args.note})
    counts = {"samples": 0, "stale": 0, "events": 0}

    def on_sample(s: Sample) -> None:
        counts["samples"] += 1
        counts["stale"] += s.values.get("stale_age_s", 0.0) > 0

    def on_event(e: Event) -> None:
        counts["events"] += 1
        print(f"event {e.source} {e.kind} value={e.value:g} {e.detail}", file=sys.stderr)

    stop_load = threading.Event()
    loader = None
    if args.load == "matmul":
        loader = threading.Thread(target=_matmul_load, args=(stop_load,), daemon=True)
        loader.start()
    sampler = TelemetrySampler(callbacks=[on_sample], event_callbacks=[on_event], period_s=args.period,
                               gpu=True, cpu=False, nvml_api=rec)
    t_start = time.monotonic()
    with sampler:
        time.sleep(args.duration)
    wall = time.monotonic() - t_start
    stop_load.set()
    if loader is not None:
        loader.join(5.0)
    rec.close()
    cpu_s = sampler.sampler_cpu_s
    print(f"wrote {args.out}: GPUs {names}, {counts['samples']} samples ({counts['stale']} stale), "
          f"{counts['events']} events, {len(rec.lines)} trace lines")
    print(f"sampler CPU time {cpu_s:.4f} s over {wall:.2f} s = {100 * cpu_s / wall:.3f}% of one core "
          f"at period {args.period} s (recording to the trace included)")
    for k, why in sampler.missing().items():
        print(f"missing {k}: {why}")
    return 0
