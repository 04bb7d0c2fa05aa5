"""The ``aurora`` command. Each subcommand lives in its own module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help). The module defines ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "bench": ("aurora_core.bench", "benchmark the whole pipeline on this hardware (the main job)"),
    "diagnose": ("aurora_core.diagnose.cli", "find latency spikes in run files and name their cause"),
    "compare": ("aurora_core.diagnose.compare_cli", "gate a deployment: compare two runs statistically"),
    "serve": ("aurora_core.server", "run the reference HTTP server"),
    "telemetry": ("aurora_core.telemetry.cli", "record or show hardware telemetry"),
    "trace": ("aurora_core.export.perfetto", "write a run file as a Chrome trace for the Perfetto UI"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="aurora", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from aurora_core import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"aurora {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
