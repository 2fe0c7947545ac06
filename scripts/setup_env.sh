#!/usr/bin/env bash
# Idempotent set-up for the README's commands and CI: a venv in .venv with the pinned dev
# requirements, and torch_mla built into it: an editable install by scikit-build-core, whose CMake
# build directory (build/editable) persists, so that a rebuild compiles only what changed. It is
# the one build of the library: pytest imports it, and scripts/test_cpp.sh runs its Catch2 tests
# (TORCH_MLA_BUILD_TESTS=ON) and installs it for the C++ consumers.
# TORCH_MLA_CUDA=0/1 and TORCH_MLA_CUDA_ARCHS="80;90" reach the build when set (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.requirements-dev.stamp"
if [ ! -f "$stamp" ] || ! cmp -s requirements-dev.txt "$stamp"; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt
  cp requirements-dev.txt "$stamp"
fi
# torchtitan for tests/test_torchtitan.py, without the trainer's dependency tree (the file says why).
stamp="$VENV/.requirements-torchtitan.stamp"
if [ ! -f "$stamp" ] || ! cmp -s requirements-torchtitan.txt "$stamp"; then
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-torchtitan.txt
  cp requirements-torchtitan.txt "$stamp"
fi
# make test builds the Catch2 tests into the same build (TORCH_MLA_BUILD_TESTS=ON): Debian's catch2.
if [ "${TORCH_MLA_BUILD_TESTS:-OFF}" = ON ] && [ ! -f /usr/include/catch2/catch.hpp ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get install -y -q catch2 || { $SUDO apt-get update -q && $SUDO apt-get install -y -q catch2; }
fi
[ -z "${TORCH_MLA_CUDA_ARCHS:-}" ] || echo "setup: TORCH_MLA_CUDA_ARCHS=$TORCH_MLA_CUDA_ARCHS"
[ -z "${TORCH_MLA_CUDA:-}" ] || echo "setup: TORCH_MLA_CUDA=$TORCH_MLA_CUDA"
[ -z "${TORCH_MLA_BUILD_TESTS:-}" ] || echo "setup: TORCH_MLA_BUILD_TESTS=$TORCH_MLA_BUILD_TESTS"
export TORCH_MLA_CUDA_ARCHS TORCH_MLA_CUDA TORCH_MLA_BUILD_TESTS
export CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-$(nproc)}
"$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
