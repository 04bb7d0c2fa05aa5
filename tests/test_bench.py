"""``aurora bench``: end-to-end CLI runs on the CPU, and the evidence rules behind the bottleneck verdict."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from aurora_core import bench
from aurora_core import loadgen as lg
from aurora_core.records import RequestRecord

# Small batches keep the pipeline's warm-up short on a 2-core machine.
FAST = ["--max-batch-size", "4", "--calibrate-s", "1.5", "--quiet"]


def _bench(out, *extra, timeout=600):
    cmd = [sys.executable, "-m", "aurora_core.cli", "bench", "--out", str(out), *FAST, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def invalid_run(tmp_path_factory):
    """A Server run that cannot meet --min-queries: INVALID whatever the machine's speed."""
    out = tmp_path_factory.mktemp("bench") / "run"
    return out, _bench(out, "--duration", "3", "--min-queries", "1000000", "--label", "v-test", "--region", "ci")


def test_bench_short_run_writes_table_run_file_and_report(invalid_run):
    out, p = invalid_run
    assert p.returncode == 1, p.stdout + p.stderr
    # the table, the telemetry summary and the verdict line
    for needle in ("throughput", "latency (ms, from scheduled send)", "end to end", "compute", "telemetry",
                   "GPU SM clock", "n/a (no GPU)", "CPU steal", "INVALID", "bottleneck:", "wall time"):
        assert needle in p.stdout, (needle, p.stdout)
    doc = json.loads((out / "summary.json").read_text())
    assert doc["verdict"] == "INVALID" and any(r.startswith("FAILED") and "queries" in r for r in doc["reasons"])
    s = doc["summary"]
    assert s["scenario"] == "server" and doc["capacity"] > 0
    assert doc["rate"] == pytest.approx(0.5 * doc["capacity"])
    assert s["completed_ok"] > 0 and set(s["stages_ms"]) >= {"queue", "decode", "preprocess", "compute"}
    assert doc["bottleneck"].split(":")[0] in ("preprocessing-bound", "compute-bound", "queueing/load-bound",
                                                "hardware-throttled", "CPU-contended")
    # the run file holds exactly the measured requests (not the calibration) and the telemetry
    from aurora_core.recorder import load_run

    run = load_run(str(out))
    assert run.n_requests == s["queries"]
    assert run.meta["label"] == "v-test" and run.meta["region"] == "ci"
    assert run.meta["bench"]["verdict"] == "INVALID"
    assert ("cpu", "cpu_util_pct") in run.samples
    html = (out / "report.html").read_text()
    assert "id='aurora-data'" in html and "Latency CDF" in html
    assert "INVALID" in html


def test_bench_report_opens_in_chromium(invalid_run, tmp_path):
    from test_report_browser import CHROMIUM, assert_plots_drawn, load_in_chromium

    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    page = load_in_chromium(invalid_run[0] / "report.html", tmp_path)
    assert page["errors"] == []
    assert_plots_drawn(page, at_least=4)
    assert {q for q, _, _ in page["cards"]} >= {"Spike"} or {q for q, _, _ in page["cards"]} >= {"Deployment"}


def test_bench_valid_run_exits_zero(tmp_path):
    """Rules loose enough that only an error could fail them: exit code 0 and VALID."""
    p = _bench(tmp_path / "ok", "--scenario", "closed_loop", "--concurrency", "4", "--duration", "2",
               "--min-duration", "0", "--min-queries", "1", "--stability-tol", "1e9", "--min-window-queries", "0", "--slo-ms", "1e9",
               "--no-report")
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert doc["verdict"] == "VALID" and doc["summary"]["scenario"] == "closed_loop"
    assert not (tmp_path / "ok" / "report.html").exists()


def test_bench_usage_error_exits_two(tmp_path):
    p = _bench(tmp_path / "x", "--scenario", "replay")
    assert p.returncode == 2 and "--replay PATH" in p.stderr


# --- evidence rules ----------------------------------------------------------------------------


def test_parse_steps():
    assert bench.parse_steps("0:40,60:+20%", 100, 120) == [(0.0, 40.0), (60.0, 120.0)]
    assert bench.parse_steps("30:-50%", 100, 60) == [(0.0, 100.0), (30.0, 50.0)]
    assert bench.parse_steps(None, 50, 60) == [(0.0, 50.0), (30.0, 60.0)]
    for bad, needle in [("0:40,60:+20%", "step at 60 s"), ("garbage", "'garbage'"), ("0:40,10:", "'10:'"),
                        ("10:40,5:50", "must increase"), ("0:-5", "rate >= 0")]:
        with pytest.raises(bench.UsageError, match="--steps") as e:
            bench.parse_steps(bad, 100, 30)
        assert needle in str(e.value)


def test_busy_is_union_of_intervals():
    recs = [RequestRecord(compute_start_ns=a, compute_end_ns=b) for a, b in [(1, 10), (5, 20), (30, 40), (35, 38)]]
    assert bench._busy(recs, "compute_start_ns", "compute_end_ns", 0, 100) == pytest.approx(0.29)
    assert bench._busy(recs, "compute_start_ns", "compute_end_ns", 10, 35) == pytest.approx(15 / 25)


def _run(stage_ms: dict[str, float], n=200, rate=100.0, errors=0):
    """A RunResult whose records spend ``stage_ms`` in each stage, sent at ``rate``."""
    t0 = 10**9
    sched = t0 + (np.arange(n) * 1e9 / rate).astype(np.int64)
    recs = []
    for s in sched:
        t = int(s)
        r = RequestRecord(arrival_ns=t, enqueue_ns=t)
        t += int(stage_ms.get("queue", 0) * 1e6)
        r.batch_closed_ns = r.decode_start_ns = t
        t += int(stage_ms.get("decode", 0) * 1e6)
        r.decode_end_ns = r.preprocess_start_ns = t
        t += int(stage_ms.get("preprocess", 0) * 1e6)
        r.preprocess_end_ns = r.compute_start_ns = t
        t += int(stage_ms.get("compute", 0) * 1e6)
        r.compute_end_ns = r.d2h_end_ns = r.completion_ns = t
        recs.append(r)
    done = np.array([r.completion_ns for r in recs], np.int64)
    status = ["overloaded" if i < errors else "ok" for i in range(n)]
    return lg.RunResult(lg.Scenario.server(rate, n / rate), t0, int(done.max()), sched, sched, done, status, recs)


def _tele(**kw):
    _, n = bench.telemetry_summary({})
    n.update(kw)
    return n


def test_bottleneck_saturating_scenarios_name_the_draining_stage():
    res = _run({"queue": 40, "decode": 2, "preprocess": 1, "compute": 9})
    res.scenario = lg.Scenario.offline(len(res.status))
    line, _ = bench.bottleneck(lg.summarize(res), res, _tele(), capacity=None)
    assert line.startswith("compute-bound"), line


def test_bottleneck_saturated_decode_feeding_large_batches_is_preprocessing_bound():
    """Offline run with batches of 16: each request waits for its whole batch's compute (per-request compute
    mean 30 ms > decode 3.75 ms), yet the compute thread idles half the time and decoding never stops: the
    decode side limits throughput (issue 17's compiled model: compute busy 55%, decode+preprocess 99%)."""
    t0, recs = 10**9, []
    t = t0
    for _ in range(40):  # decoding back to back; one 30 ms compute per 16 images (60 ms of decode)
        first = t
        batch = []
        for _ in range(16):
            r = RequestRecord(arrival_ns=t0, enqueue_ns=t0, batch_closed_ns=first, decode_start_ns=t)
            t += 3_750_000
            r.decode_end_ns = r.preprocess_start_ns = r.preprocess_end_ns = t
            batch.append(r)
        for r in batch:
            r.compute_start_ns = t
            r.compute_end_ns = r.d2h_end_ns = r.completion_ns = t + 30_000_000
        recs += batch
    sched = np.full(len(recs), t0, np.int64)
    done = np.array([r.completion_ns for r in recs], np.int64)
    res = lg.RunResult(lg.Scenario.offline(len(recs)), t0, int(done.max()), sched, sched, done, ["ok"] * len(recs),
                       recs)
    line, ev = bench.bottleneck(lg.summarize(res), res, _tele(), capacity=None)
    assert ev["compute_busy"] < 0.6 and ev["preprocess_busy"] > 0.95
    assert line.startswith("preprocessing-bound") and "compute idles" in line, line


@pytest.mark.parametrize("stages,tele,errors,label", [
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9}, {}, 0, "compute-bound"),
    ({"queue": 1, "decode": 8, "preprocess": 3, "compute": 4}, {}, 0, "preprocessing-bound"),
    ({"queue": 40, "decode": 2, "preprocess": 1, "compute": 9}, {}, 0, "queueing/load-bound"),
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9}, {}, 20, "queueing/load-bound"),
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9},
     {"throttle": {"thermal": 0.4, "low_util": 0.9}, "sm_clock_p50": 1400.0, "sm_clock_max": 1980.0,
      "gpu_busy_pct": 95.0}, 0, "hardware-throttled"),
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9}, {"steal": 22.0}, 0, "CPU-contended"),
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9},
     {"cpu_util": 100.0, "proc_cpu": 60.0, "cores": 2, "load1": 7.5}, 0, "CPU-contended"),
    # this process using the whole machine is not contention
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9},
     {"cpu_util": 100.0, "proc_cpu": 195.0, "cores": 2, "load1": 2.5}, 0, "compute-bound"),
    # an idle GPU at low clocks (low_util only) is not throttling
    ({"queue": 1, "decode": 2, "preprocess": 1, "compute": 9},
     {"throttle": {"low_util": 0.9}, "sm_clock_p50": 600.0, "sm_clock_max": 1980.0, "gpu_busy_pct": 10.0}, 0,
     "compute-bound"),
])
def test_bottleneck_rules(stages, tele, errors, label):
    res = _run(stages, errors=errors)
    s = lg.summarize(res)
    line, ev = bench.bottleneck(s, res, _tele(**tele), capacity=150.0)
    assert line.split(":")[0] == label, line
    assert "compute_busy" in ev


def test_telemetry_summary_reads_gpu_and_cpu():
    ts = np.arange(5, dtype=np.int64)
    series = {("gpu0", "sm_clock_mhz"): (ts, np.array([1980, 1980, 1500, 1500, 1500.0])),
              ("gpu0", "sm_clock_max_mhz"): (ts, np.full(5, 1980.0)),
              ("gpu0", "throttle_frac_power"): (ts, np.array([0, 0, 1, 1, 1.0])),
              ("gpu0", "temp_margin_c"): (ts, np.array([10, 8, 6, 5, 4.0])),
              ("gpu0", "temp_c"): (ts, np.full(5, 80.0)),
              ("cpu", "cpu_util_pct"): (ts, np.full(5, 50.0)),
              ("cpu", "steal_pct"): (ts, np.zeros(5))}
    rows, n = bench.telemetry_summary(series)
    d = dict(rows)
    assert d["GPU SM clock (p50 / max)"].startswith("1500 / 1980 MHz")
    assert d["GPU throttled fraction"] == "power 60.0%"
    assert d["GPU temperature margin (min)"].startswith("4 °C")
    assert d["GPU power (mean / limit)"] == "n/a (not reported by this GPU)"
    assert n["cpu_util"] == 50.0
    rows, _ = bench.telemetry_summary({("cpu", "cpu_util_pct"): (ts, np.full(5, 50.0))})
    assert dict(rows)["GPU SM clock (p50 / max)"] == "n/a (no GPU)"



# --- options, errors and interruptions, without building a model ---------------------------------


def _args(*argv):
    p = argparse.ArgumentParser(prog="aurora bench")
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def _run_inproc(capsys, *argv):
    """bench.run in this process: (exit code, stderr). An argparse error counts as its exit code."""
    try:
        rc = bench.run(_args(*argv))
    except SystemExit as e:
        rc = e.code
    except KeyboardInterrupt:
        rc = "KeyboardInterrupt escaped"
    return rc, capsys.readouterr().err


def _no_build(*a, **kw):
    raise AssertionError("the target was built before the options were checked")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "notrun.txt").write_text("not a model\n")
    (tmp_path / "arrivals.txt").write_text("0\n0.5\n1.0\n")
    return tmp_path


@pytest.mark.parametrize("argv,needles", [
    (["--duration", "-5"], ["--duration"]),
    (["--duration", "0"], ["--duration"]),
    (["--rate", "0"], ["--rate"]),
    (["--rate", "-3"], ["--rate"]),
    (["--calibrate-s", "0"], ["--calibrate-s"]),
    (["--buckets", "4,x"], ["--buckets", "4,x"]),
    (["--buckets", "1,32"], ["--buckets", "--max-batch-size"]),
    (["--scenario", "replay", "--replay", "/nonexistent"], ["--replay /nonexistent"]),
    (["--scenario", "step", "--steps", "garbage"], ["--steps", "garbage"]),
    (["--scenario", "step", "--steps", "0:40,60:+20%", "--rate", "40", "--duration", "6"],
     ["--steps", "step at 60 s", "--duration 6"]),
    (["--replay", "{files}/arrivals.txt", "--count", "5", "--concurrency", "3", "--rate", "10", "--duration", "2"],
     ["--count", "--concurrency", "--rate", "--duration"]),
    (["--scenario", "closed_loop", "--rate", "5"], ["--rate"]),
    (["--scenario", "offline", "--count", "10", "--duration", "3"], ["--duration"]),
    (["--find-peak", "--scenario", "offline"], ["--find-peak"]),
    (["--url", "http://127.0.0.1:1/v1/classify", "--buckets", "1,2"], ["--buckets", "--url"]),
    (["--url", "ftp://host/x"], ["--url"]),
    (["--model", "{files}/notrun.txt"], ["--model", "notrun.txt"]),
    (["--model", "bogusnet"], ["--model bogusnet"]),
    (["--weights", "/nonexistent.pt"], ["--weights /nonexistent.pt"]),
    (["--device", "gpu"], ["--device gpu"]),
])
def test_bad_options_fail_before_anything_is_built(monkeypatch, capsys, files, argv, needles):
    """Each bad or conflicting option: exit 2 with a line naming it, no target built, no run file left."""
    monkeypatch.setattr(bench, "_build_target", _no_build)
    out = files / "run"
    rc, err = _run_inproc(capsys, "--out", str(out), *(a.format(files=files) for a in argv))
    assert rc == 2, err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err
    assert not out.exists()


def test_out_that_is_a_file_or_holds_a_run_is_rejected_first(monkeypatch, capsys, files):
    monkeypatch.setattr(bench, "_build_target", _no_build)
    rc, err = _run_inproc(capsys, "--out", str(files / "notrun.txt"))
    assert rc == 2 and "--out" in err and "not a directory" in err, err
    (files / "old").mkdir()
    (files / "old" / "run.aurora.sqlite").write_bytes(b"")
    rc, err = _run_inproc(capsys, "--out", str(files / "old"))
    assert rc == 2 and "--out" in err and "already holds a run" in err, err


@pytest.mark.parametrize("content,needle", [
    ("text", "not a state_dict file"),
    ("wrong_shape", "do not fit the model"),
])
def test_bad_weights_exit_two_naming_the_option(capsys, tmp_path, content, needle):
    """A --weights file that is not a state_dict, or one for another model: exit 2, one line, no run file."""
    import torch

    w = tmp_path / "w.pt"
    if content == "text":
        w.write_text("not weights\n")
    else:
        torch.save({"fc.weight": torch.zeros(10, 2048)}, w)
    out = tmp_path / "run"
    rc, err = _run_inproc(capsys, "--out", str(out), "--device", "cpu", "--weights", str(w), "--quiet")
    assert rc == 2, err
    assert f"--weights {w}" in err and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_url_where_every_request_fails_is_an_error_not_invalid(capsys, tmp_path):
    """A server answering 500 to everything: exit 2 naming the failure, no nan, no run file kept."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "run"
        rc, err = _run_inproc(capsys, "--url", f"http://127.0.0.1:{srv.server_address[1]}/v1/classify",
                              "--rate", "20", "--duration", "0.5", "--out", str(out), "--quiet", "--no-report")
    finally:
        srv.shutdown()
        srv.server_close()
    assert rc == 2, err
    assert "all" in err and "queries failed" in err and "--url" in err, err
    assert "nan" not in err and "INVALID" not in capsys.readouterr().out
    assert not out.exists()


def test_url_with_nothing_listening_is_an_error(capsys, tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    rc, err = _run_inproc(capsys, "--url", f"http://127.0.0.1:{port}/v1/classify", "--rate", "10",
                          "--duration", "0.5", "--out", str(out), "--quiet")
    assert rc == 2 and "--url" in err and "cannot connect" in err, err
    assert not out.exists()


class _FakeTarget:
    """Answers at once (ok, or failing every request), feeding the bench's gate as a Pipeline would."""

    def __init__(self, gate, fail: bool):
        self.gate, self.fail = gate, fail

    def submit(self, payload):
        time.sleep(0.002)  # bounds a closed loop's request count
        from aurora_core.records import now_ns

        f = cf.Future()
        if self.fail:
            f.set_exception(RuntimeError("boom"))
        else:
            t = now_ns()
            rec = RequestRecord(arrival_ns=t, enqueue_ns=t, completion_ns=t + 1000)
            self.gate(rec)
            f.set_result(SimpleNamespace(timings=rec))
        return f

    def close(self):
        pass


def _fake_build(fail: bool):
    def build(args, device, model, buckets, gate):
        return _FakeTarget(gate, fail), SimpleNamespace(close=lambda: None)
    return build


def test_run_that_measures_nothing_leaves_no_run_file(monkeypatch, capsys, tmp_path):
    """Every calibration query failed: exit 2 naming the cause, and the same --out works again."""
    out = tmp_path / "run"
    monkeypatch.setattr(bench, "_build_target", _fake_build(fail=True))
    rc, err = _run_inproc(capsys, "--out", str(out), "--device", "cpu", "--calibrate-s", "0.3", "--quiet")
    assert rc == 2 and "calibration" in err and "RuntimeError" in err, err
    assert not out.exists()
    monkeypatch.setattr(bench, "_build_target", _fake_build(fail=False))
    rc, err = _run_inproc(capsys, "--out", str(out), "--device", "cpu", "--scenario", "closed_loop",
                          "--concurrency", "2", "--duration", "0.3", "--quiet", "--no-report", "--calibrate-s", "1")
    assert rc in (0, 1), err
    assert (out / "run.aurora.sqlite").exists()
    # tuning a phase this run skips (closed loop does not calibrate) only warns
    assert "warning: --calibrate-s" in err, err


def test_interrupted_run_is_marked_in_its_run_file(monkeypatch, capsys, tmp_path):
    """Ctrl-C during the measured run: exit 130, the path printed, meta["interrupted"] in the run file."""
    from aurora_core.recorder import load_run

    real = bench._progress_run

    def progress_then_ctrl_c(gen, scenario, title, quiet):
        res = real(gen, scenario, title, quiet)
        if title == scenario.kind:  # the measured run, not the calibration
            raise KeyboardInterrupt
        return res

    monkeypatch.setattr(bench, "_build_target", _fake_build(fail=False))
    monkeypatch.setattr(bench, "_progress_run", progress_then_ctrl_c)
    out = tmp_path / "run"
    rc, err = _run_inproc(capsys, "--out", str(out), "--device", "cpu", "--scenario", "closed_loop",
                          "--concurrency", "2", "--duration", "0.3", "--quiet")
    assert rc == 130, err
    assert "interrupted" in err and str(out / "run.aurora.sqlite") in err, err
    run = load_run(str(out))
    assert run.meta["interrupted"] is True and run.n_requests > 0


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    class Gen:
        def run(self, scenario):
            time.sleep(0.6)
            return "result"

        def progress(self):
            return {"elapsed_s": 1.0, "issued": 10, "completed": 9, "expected": 0, "throughput": 9.0,
                    "p99_ms": 3.0}

    monkeypatch.setattr(bench, "PROGRESS_EVERY_S", 0.1)
    assert bench._progress_run(Gen(), lg.Scenario.server(10, 5), "server", quiet=False) == "result"
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("server: ")]
    assert lines and "p99 3.0 ms" in lines[0], lines


def test_help_shows_the_defaults():
    p = argparse.ArgumentParser(prog="aurora bench")
    bench.add_arguments(p)
    helps = {a.option_strings[0]: a.help for a in p._actions if a.option_strings}
    for opt, default in [("--max-batch-size", "16"), ("--max-queue-delay-us", "2000"), ("--min-queries", "256"),
                         ("--duration", "25"), ("--calibrate-s", "4"), ("--connections", "64")]:
        assert f"default {default}" in helps[opt], (opt, helps[opt])


def test_defaults_are_filled_in_for_meta_config(tmp_path):
    """Options parse as None to tell given from defaulted; the run's meta.config still holds the values,
    and --replay alone picks the replay scenario."""
    args = _args("--out", str(tmp_path / "r"), "--device", "cpu")
    assert bench.check_args(args)["replay"] is None
    assert args.duration == 25.0 and args.max_batch_size == 16 and args.scenario == "server"
    (tmp_path / "a.txt").write_text("0 1 2")
    args = _args("--replay", str(tmp_path / "a.txt"), "--device", "cpu")
    assert bench.check_args(args)["replay"].kind == "replay" and args.scenario == "replay"


@pytest.mark.parametrize("fault", [BrokenPipeError, RuntimeError])
def test_a_run_cut_short_by_an_error_is_marked_and_a_closed_pipe_is_not_invalid(monkeypatch, capsys, tmp_path, fault):
    """A closed pipe or an error during the measured run: the partial run file is marked interrupted (diagnose
    and compare warn), and the exception reaches the aurora command, which exits 141 or 2 (never 1, INVALID)."""
    from aurora_core.cli import main
    from aurora_core.recorder import load_run

    real = bench._progress_run

    def progress_then_fail(gen, scenario, title, quiet):
        res = real(gen, scenario, title, quiet)
        if title == scenario.kind:
            raise fault("stdout closed" if fault is BrokenPipeError else "a bug")
        return res

    monkeypatch.setattr(bench, "_build_target", _fake_build(fail=False))
    monkeypatch.setattr(bench, "_progress_run", progress_then_fail)
    out = tmp_path / "run"
    argv = ["bench", "--out", str(out), "--device", "cpu", "--scenario", "closed_loop", "--concurrency", "2",
            "--duration", "0.3", "--quiet"]
    if fault is BrokenPipeError:
        with pytest.raises(BrokenPipeError):
            bench.run(_args(*argv[1:]))
    else:
        assert main(argv) == 2
    run = load_run(str(out))
    assert run.meta["interrupted"] is True and run.n_requests > 0


def test_bench_console_raises_on_a_closed_pipe():
    """rich's own Console exits 1 on a closed pipe, which reads as INVALID."""
    with pytest.raises(BrokenPipeError):
        bench._console().on_broken_pipe()
