#!/usr/bin/env bash
# The GPU suite on target hardware, in one command:  OUT=/some/dir bash benchmarks/gpu_suite.sh
# Everything lands in $OUT (at most 5 files); the table is printed at the end. See gpu_suite.py.
# AURORA_SUITE_BUDGET_S (default 360) is the suite's own budget; the outer timeout is a backstop.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_suite}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
budget="${AURORA_SUITE_BUDGET_S:-360}"
timeout -k 10 "$((budget + 60))" "$PY" benchmarks/gpu_suite.py --out "$OUT" --budget-s "$budget" "$@"
rc=$?
[ "$rc" -eq 0 ] || echo "gpu_suite.py exited with rc=$rc; partial results in $OUT" >&2
exit "$rc"
