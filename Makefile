# The README's two commands: `make demo` (the main job) and `make test` (every test).
# Both set everything up first (scripts/setup_env.sh: venv, pinned torch, build).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-cpu
setup:
	VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	$(PY) -m torch_mla.demo

test: setup
	$(PY) -m pytest -q tests
	VENV=$(VENV) bash scripts/test_cpp.sh

bench-cpu: setup
	$(PY) benchmarks/bench_cpu.py
