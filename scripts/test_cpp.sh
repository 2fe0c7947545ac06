#!/usr/bin/env bash
# The C++ half of `make test`, on the one build of the library (build/editable, made by
# scripts/setup_env.sh with TORCH_MLA_BUILD_TESTS=ON; nothing of libtorch_mla is compiled here):
#   1. ctest in that build: the Catch2 tests of the C++ API (tests/cpp) and of the SIMT emulator
#      with our CUDA kernels on it (csrc/simt/tests);
#   2. builds examples/cpp as a separate project against the installed package
#      (torch_mla.cmake_prefix_path) and runs a short training that must bring the loss down
#      (train_mla exits non-zero otherwise);
#   3. builds tests/cpp/consumer against the same package: a consumer that uses the ops by name
#      only must still load them;
#   4. where nvcc exists: the resource gate of our CUDA kernels (scripts/kernel_resources.py
#      --check: ptxas -v of every kernel for sm_80 and sm_90 against the checked-in table).
# (A `cmake --install` into another prefix is tested by tests/test_packaging.py's wheel.)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
LIB_BUILD=build/editable
BUILD=build/cpp
JOBS=${MAX_JOBS:-2}
STEPS=${TRAIN_MLA_STEPS:-200}

[ -f "$LIB_BUILD/CTestTestfile.cmake" ] || {
  echo "test_cpp: $LIB_BUILD has no tests: build it with TORCH_MLA_BUILD_TESTS=ON (make test does)" >&2
  exit 1
}
TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
# A CUDA build of torch makes find_package(Torch) want a whole CUDA toolkit: the installed
# package's helper makes one from the torch wheel's CUDA libraries where nvcc stands alone.
CUDA_ROOT=$("$PY" -m torch_mla.cmake --cuda-root --dir "$(pwd)/$BUILD/cuda-root")
common=(-DCMAKE_BUILD_TYPE=Release)
[ -z "$CUDA_ROOT" ] || common+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCUDAToolkit_ROOT="$CUDA_ROOT")
command -v ninja >/dev/null && common+=(-G Ninja)

echo "== C++: Catch2 tests of the library build ($LIB_BUILD)"
(cd "$LIB_BUILD" && ctest --output-on-failure -j "$JOBS")

# The library as pip installed it (torch_mla.cmake_prefix_path: lib/, include/, lib/cmake/TorchMLA in
# site-packages, whose RUNPATH finds torch's libraries beside it), as a user's C++ build finds it.
PACKAGE_PREFIX=$("$PY" -c 'import torch_mla; print(torch_mla.cmake_prefix_path)')
echo "== C++: examples/cpp/train_mla built against the installed package"
cmake -S examples/cpp -B "$BUILD/example" "${common[@]}" \
  -DCMAKE_PREFIX_PATH="$PACKAGE_PREFIX;$TORCH_PREFIX" >/dev/null
cmake --build "$BUILD/example" -j "$JOBS"
"$BUILD/example/train_mla" --steps "$STEPS"

echo "== C++: a dispatcher-only consumer of the same package"
cmake -S tests/cpp/consumer -B "$BUILD/consumer" "${common[@]}" \
  -DCMAKE_PREFIX_PATH="$PACKAGE_PREFIX;$TORCH_PREFIX" >/dev/null
cmake --build "$BUILD/consumer" -j "$JOBS"
"$BUILD/consumer/dispatcher_only"

NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
if [ -n "$NVCC" ]; then
  echo "== CUDA: resource gate (ptxas -v of every kernel, sm_80 and sm_90, against the checked-in table)"
  start=$SECONDS
  "$PY" scripts/kernel_resources.py --check --nvcc "$NVCC"
  echo "== CUDA: resource gate took $((SECONDS - start)) s"
else
  echo "== CUDA: resource gate skipped: no nvcc (on PATH or in \${CUDA_HOME:-/usr/local/cuda}/bin)"
fi
echo "== C++: all passed"
