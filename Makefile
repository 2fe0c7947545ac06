# The README's two commands: `make demo` (the main job) and `make test` (every test).
# Both set everything up first (scripts/setup_env.sh: venv, pinned torch, the one build).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench bench-cpu
setup:
	VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	$(PY) examples/demo.py

# The library is built once, with its Catch2 tests; C++ (ctest, the out-of-tree example) first,
# so that pytest's summary line closes the output.
test: export TORCH_MLA_BUILD_TESTS = ON
test: setup
	VENV=$(VENV) bash scripts/test_cpp.sh
	$(PY) -m pytest tests --durations=15

bench: setup
	$(PY) benchmarks/bench.py all

bench-cpu: setup
	$(PY) benchmarks/bench_cpu.py
