"""User mistakes at the ``aurora`` command line: one error line naming the option or file, exit 2, no traceback.

Exit 1 means INVALID (bench) or a regression (compare), so a crash must not end with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from test_incidents import simulate_run

from aurora_core import cli
from aurora_core.cli import main
from aurora_core.errors import DeviceLost
from aurora_core.loadgen import poisson_schedule
from aurora_core.telemetry.replay import make_synthetic_trace


def error_line(argv: list[str], capsys) -> str:
    """Runs ``aurora argv``; checks exit 2 and a single error line (after argparse's usage, if any)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    *usage, line = err.strip().splitlines()
    assert all(u.startswith(("usage:", " ")) for u in usage), err
    assert line.startswith(f"aurora {argv[0]}") and ": error: " in line, err
    return line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    return str(simulate_run(path, poisson_schedule(40.0, 4.0, seed=1) / 1e9, meta={"label": "v1"},
                            item_ms=lambda t: 6.0, seed=3))


@pytest.fixture(scope="module")
def trace_text(tmp_path_factory) -> str:
    return "".join(json.dumps(x) + "\n" for x in make_synthetic_trace("thermal", 0.2, 0.4, duration_s=0.6))


# -- top level -------------------------------------------------------------------------------------
@pytest.fixture
def command(monkeypatch):
    """``aurora boom`` runs ``raise_`` (set by the test) through a stand-in subcommand module."""
    mod = types.ModuleType("aurora_test_boom")
    mod.add_arguments = lambda parser: None
    mod.run = lambda args: mod.raise_()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(cli.COMMANDS, "boom", (mod.__name__, "test command"))
    monkeypatch.delenv("AURORA_DEBUG", raising=False)
    return mod


def test_unexpected_exception_is_one_line_exit_2(command, capsys):
    def raise_():
        raise RuntimeError("disk\non fire")

    command.raise_ = raise_
    line = error_line(["boom"], capsys)
    assert line == "aurora boom: error: RuntimeError: disk on fire (AURORA_DEBUG=1 for the traceback)"


def test_typed_error_gives_its_reason(command, capsys):
    def raise_():
        raise DeviceLost("cuda:0 fell off the bus")

    command.raise_ = raise_
    assert "error: device_lost: cuda:0 fell off the bus" in error_line(["boom"], capsys)


def test_aurora_debug_prints_the_traceback(command, capsys, monkeypatch):
    def raise_():
        raise RuntimeError("boom")

    command.raise_ = raise_
    monkeypatch.setenv("AURORA_DEBUG", "1")
    assert main(["boom"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "aurora boom: error: RuntimeError: boom"


def test_keyboard_interrupt_is_130(command, capsys):
    def raise_():
        raise KeyboardInterrupt

    command.raise_ = raise_
    assert main(["boom"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_closed_pipe_exits_quietly(tmp_path):
    trace = tmp_path / "t.jsonl"
    make_synthetic_trace("thermal", 1.0, 2.0, duration_s=60.0, out=trace)  # ~150 kB of output: > a pipe
    p = subprocess.Popen([sys.executable, "-m", "aurora_core.cli", "telemetry", "replay", str(trace)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141, err
    assert err == ""


# -- aurora telemetry ------------------------------------------------------------------------------
def test_telemetry_without_action_names_the_actions(capsys):
    line = error_line(["telemetry"], capsys)
    assert "{record,show,replay,synth}" in line and "action" not in line


@pytest.mark.parametrize("case", ["missing", "directory", "text", "sqlite", "cut", "header"])
def test_replay_bad_file(case, tmp_path, trace_text, capsys):
    path = tmp_path / "t.jsonl"
    if case == "directory":
        path.mkdir()
    elif case == "text":
        path.write_text("hello\n")
    elif case == "sqlite":
        path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    elif case == "cut":
        path.write_text(trace_text[: len(trace_text) // 2])
    elif case == "header":
        path.write_text(trace_text[:100] + "\n")
    line = error_line(["telemetry", "replay", str(path)], capsys)
    assert str(path) in line
    want = {"missing": "No such file", "directory": "Is a directory", "text": "line 1 is not a JSON object",
            "sqlite": "not a text file", "cut": "ends mid-line", "header": "line 1 is not a JSON object"}
    assert want[case] in line


def test_replay_still_works(tmp_path, trace_text, capsys):
    (tmp_path / "t.jsonl").write_text(trace_text)
    assert main(["telemetry", "replay", str(tmp_path / "t.jsonl")]) == 0
    assert "throttle_frac_thermal" in capsys.readouterr().out


@pytest.mark.parametrize("opts, names", [
    (["--kind", "bogus"], "--kind"),
    (["--period", "0"], "--period"),
    (["--period", "-1"], "--period"),
    (["--start", "3", "--end", "1"], "--end"),
    (["--start", "1", "--end", "2", "--duration", "0.5"], "--duration"),
    (["--severity", "5"], "--severity"),
    (["--duration", "nan"], "--duration"),
])
def test_synth_bad_option(opts, names, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert names in error_line(["telemetry", "synth", *opts, "--out", str(out)], capsys)
    assert not out.exists()


def test_synth_unwritable_out(tmp_path, capsys):
    out = str(tmp_path / "no" / "x.jsonl")
    assert f"--out {out}" in error_line(["telemetry", "synth", "--out", out], capsys)


@pytest.mark.parametrize("opts", [["--duration", "-1"], ["--period", "0"]])
def test_show_bad_option(opts, capsys):
    assert opts[0] in error_line(["telemetry", "show", *opts], capsys)


# -- aurora diagnose -------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["missing_dir", "directory"])
def test_diagnose_unwritable_html(where, run_dir, tmp_path, capsys):
    html = str(tmp_path / "no" / "x.html") if where == "missing_dir" else str(tmp_path)
    assert f"--html {html}" in error_line(["diagnose", run_dir, "--html", html], capsys)


@pytest.mark.parametrize("opts", [["--interval", "-1"], ["--interval", "0"], ["--min-ratio", "0"],
                                  ["--min-ratio", "0.5"]])
def test_diagnose_bad_option(opts, run_dir, capsys):
    assert opts[0] in error_line(["diagnose", run_dir, *opts], capsys)


def test_diagnose_explicit_options_still_work(run_dir, capsys):
    assert main(["diagnose", run_dir, "--interval", "0.5", "--min-ratio", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["series"][0]["interval_s"] == 0.5 and out["method"]["min_ratio"] == 1


# -- aurora trace ----------------------------------------------------------------------------------
def test_trace_negative_max_requests(run_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert "--max-requests" in error_line(["trace", run_dir, "--max-requests", "-1", "--out", str(out)], capsys)
    assert not out.exists()


# -- every command's own error line ----------------------------------------------------------------
@pytest.mark.parametrize("argv", [["compare", "/nonexistent/a", "/nonexistent/b"], ["trace", "/nonexistent/a"],
                                  ["diagnose", "/nonexistent/a"]])
def test_own_errors_use_the_common_line(argv, capsys):
    """Errors a command reports itself read like the top level's: ``aurora <cmd>: error: ...``."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"aurora {argv[0]}: error: ") and err.count("\n") == 1, err
