# The README's two commands: `make demo` (the main job) and `make test` (every test).
# Both set everything up first (scripts/setup_env.sh: venv, pinned torch, build).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench bench-cpu
setup:
	VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	$(PY) examples/demo.py

# C++ (ctest, the out-of-tree example) first, so that pytest's summary line closes the output.
test: setup
	VENV=$(VENV) bash scripts/test_cpp.sh
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m torch_mla.bench all

bench-cpu: setup
	$(PY) benchmarks/bench_cpu.py
