#!/usr/bin/env bash
# The C++ half of `make test`:
#   1. builds libtorch_mla (CPU kernels) with the Catch2 tests in build/cpp and runs them with ctest;
#   2. installs that build (lib/, include/, lib/cmake/TorchMLA) into build/cpp/install;
#   3. builds examples/cpp as a separate project against the installed package and runs a short
#      training that must bring the loss down (train_mla exits non-zero otherwise);
#   4. builds tests/cpp/consumer against the Python package's copy of the package
#      (torch_mla.cmake_prefix_path): a consumer that uses the ops by name only must still load them.
#   5. builds the SIMT emulator standalone (csrc/simt, no torch) with its Catch2 tests, which also
#      run our CUDA kernels on it, and runs them with ctest (build/cpp/simt).
# Expects the venv of scripts/setup_env.sh (torch, and torch_mla installed into it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
BUILD=${TORCH_MLA_CPP_BUILD:-build/cpp}
JOBS=${MAX_JOBS:-2}
STEPS=${TRAIN_MLA_STEPS:-200}

if [ ! -f /usr/include/catch2/catch.hpp ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get install -y -q catch2 || { $SUDO apt-get update -q && $SUDO apt-get install -y -q catch2; }
fi

TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
# A CUDA build of torch makes find_package(Torch) want a whole CUDA toolkit: the installed
# package's helper makes one from the torch wheel's CUDA libraries where nvcc stands alone.
CUDA_ROOT=$("$PY" -m torch_mla.cmake --cuda-root --dir "$(pwd)/$BUILD/cuda-root")
common=(-DCMAKE_BUILD_TYPE=Release)
[ -z "$CUDA_ROOT" ] || common+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCUDAToolkit_ROOT="$CUDA_ROOT")
command -v ninja >/dev/null && common+=(-G Ninja)

echo "== C++: library and Catch2 tests ($BUILD)"
cmake -S . -B "$BUILD" "${common[@]}" -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DTORCH_MLA_CUDA=OFF -DTORCH_MLA_BUILD_TESTS=ON >/dev/null
cmake --build "$BUILD" -j "$JOBS"
(cd "$BUILD" && ctest --output-on-failure -j "$JOBS")

echo "== C++: install, and examples/cpp/train_mla built against the installed package"
INSTALL=$(pwd)/$BUILD/install
cmake --install "$BUILD" --prefix "$INSTALL" >/dev/null
cmake -S examples/cpp -B "$BUILD/example" "${common[@]}" \
  -DCMAKE_PREFIX_PATH="$INSTALL;$TORCH_PREFIX" >/dev/null
cmake --build "$BUILD/example" -j "$JOBS"
"$BUILD/example/train_mla" --steps "$STEPS"

echo "== C++: a dispatcher-only consumer of the Python package's TorchMLA"
PACKAGE_PREFIX=$("$PY" -c 'import torch_mla; print(torch_mla.cmake_prefix_path)')
cmake -S tests/cpp/consumer -B "$BUILD/consumer" "${common[@]}" \
  -DCMAKE_PREFIX_PATH="$PACKAGE_PREFIX;$TORCH_PREFIX" >/dev/null
cmake --build "$BUILD/consumer" -j "$JOBS"
"$BUILD/consumer/dispatcher_only"
echo "== C++: the SIMT emulator and our CUDA kernels on it (csrc/simt, Catch2)"
cmake -S csrc/simt -B "$BUILD/simt" "${common[@]}" >/dev/null
cmake --build "$BUILD/simt" -j "$JOBS"
(cd "$BUILD/simt" && ctest --output-on-failure -j "$JOBS")
echo "== C++: all passed"
