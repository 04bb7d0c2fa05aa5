#!/usr/bin/env bash
# Wheels for the GPU suite's machine (an H200 image with Python 3.12, torch, triton, numpy, scipy, pillow,
# psutil, rich, matplotlib, nvidia-ml-py and pytest, but no network): aurora_core's core dependencies that
# image lacks, for CPython 3.12 manylinux x86_64, into .wheels/ (git-ignored), which gpu_suite.py's setup
# section installs with --no-index --no-deps. Run it here, where PyPI is reachable, before the GPU run:
#     bash benchmarks/fetch_wheels.sh && ls .wheels
# Versions are this dev venv's; pbr is hdrhistogram's own requirement. The serve extra (fastapi, ...) is
# left out: the suite runs no server test that needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .wheels \
    simplejpeg==1.9.0 pyspng==0.1.4 hdrhistogram==0.10.8 pbr ruptures==1.1.10
ls -1 .wheels
