# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aurora-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CUDA build of torch runs on the CPU too; the versions are the ones this project is tested with.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# [ray] adds ~20 s of install and ~50 s of tests (tests/test_ray_serve.py); see RESULTS.md, issue 15.
	$(PY) -m pip install -q -e '.[dev,serve,ray]'
	touch $(STAMP)

# aurora bench exits 1 for an INVALID run (a measured result, printed with its reasons) and 2 on an
# error; only an error fails the demo.
demo: setup
	$(VENV)/bin/aurora bench; rc=$$?; [ $$rc -le 1 ] || exit $$rc

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benchmarks --benchmark-disable

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info aurora_core/*.so $(VENV)
