#!/usr/bin/env bash
# One command for a lent H200 (issue 3): builds torch_mla with its CUDA kernels against the
# machine's own python3/torch, runs the CUDA tests, compute-sanitizer (memcheck, racecheck) on a
# small forward+backward, then the GPU benchmark table. Each stage is bounded by `timeout`, a
# failing stage does not stop the next, and every stage ends with a verdict line; the whole run
# stays under 8 minutes. Logs (and the benchmark CSV) go to $OUT when it is set.
#
# Usage (repo root): bash benchmarks/gpu_check.sh
#   STAGES="build tests memcheck racecheck bench bench_op" (default: all, in this order; add cpu_tests for
#   the CPU test files too), PYTHON=python3, BENCH_ARGS="--seqlens 1024 4096 16384",
#   TOTAL_LIMIT=470 (seconds for all stages: each stage's limit is cut to what is left).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-"build tests memcheck racecheck bench bench_op"}
TOTAL_LIMIT=${TOTAL_LIMIT:-470}
LOG_DIR=${OUT:-$(mktemp -d)}
BUILD_DIR=build/gpu
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
declare -a SUMMARY=()
T_START=$(date +%s)

stage() {  # stage NAME TIMEOUT_S COMMAND: runs COMMAND (a shell command line), tees NAME.log
  local name=$1 limit=$2 cmd=$3
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( TOTAL_LIMIT - ($(date +%s) - T_START) ))
  if [ "$left" -lt 20 ]; then
    SUMMARY+=("[$name] SKIPPED (out of time)")
    echo "=== [$name] SKIPPED (out of time)"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== [$name] start (limit ${limit}s, $(( $(date +%s) - T_START ))s elapsed)"
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local verdict=PASS
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT"; elif [ "$rc" -ne 0 ]; then verdict="FAIL (rc=$rc)"; fi
  local line="[$name] $verdict in $(( $(date +%s) - t0 ))s"
  echo "=== $line"
  SUMMARY+=("$line")
}

build() {
  local root
  root=$("$PYTHON" python/torch_mla/cmake.py --cuda-root --dir build/cuda-root)
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTORCH_MLA_CUDA=ON \
    -DTORCH_MLA_CUDA_ARCHS="${TORCH_MLA_CUDA_ARCHS:-90}" \
    -DCMAKE_PREFIX_PATH="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
    ${root:+-DCUDA_TOOLKIT_ROOT_DIR=$root -DCUDAToolkit_ROOT=$root} &&
  cmake --build "$BUILD_DIR" -j "$(nproc)" &&
  cmake --install "$BUILD_DIR" --prefix python/torch_mla >/dev/null &&
  "$PYTHON" -c 'import torch, torch_mla; print("torch", torch.__version__, "| device", torch.cuda.get_device_name(),
"| CUDA kernel registered:", torch._C._dispatch_has_kernel_for_dispatch_key("torch_mla::mla_attention", "CUDA"))'
}

# A small forward + backward through every kernel (atomic and deterministic backward, both tuned
# head shapes, padded and packed) for compute-sanitizer. Caching is off so that each tensor is its
# own allocation and an access past its end is reported.
SANITIZE_PY=$(mktemp --suffix=.py)
cat >"$SANITIZE_PY" <<'EOF'
import torch
import torch_mla

torch.manual_seed(0)
for dn, dr, dv, dc in [(128, 64, 128, 512), (64, 32, 64, 256)]:
    for seqlens in ([70, 1, 130], None):
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            lead = (sum(seqlens),) if seqlens else (2, 67)
            heads = 2
            q = torch.randn(*lead, heads, dn + dr, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            c = torch.randn(*lead, dc, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            kr = torch.randn(*lead, dr, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = (torch.randn(heads * (dn + dv), dc, device="cuda") * dc ** -0.5).to(torch.bfloat16).requires_grad_(True)
            cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32,
                              device="cuda") if seqlens else None
            with torch_mla.use_core("cuda"):  # our kernels are what the sanitizers check
                out = torch_mla.mla_attention(q, c, kr, w, cu_seqlens=cu)
            out.backward(torch.randn_like(out))
            torch.cuda.synchronize()
            assert all(torch.isfinite(t.grad).all() for t in (q, c, kr, w))
print("sanitizer workload done")
EOF

sanitize() {  # sanitize TOOL: only torch_mla's kernels are instrumented where the tool can filter
  local filter=()
  if compute-sanitizer --help 2>/dev/null | grep -q -- --kernel-regex; then filter=(--kernel-regex kns=mla_); fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    compute-sanitizer --tool "$1" ${filter[@]+"${filter[@]}"} --error-exitcode 1 "$PYTHON" "$SANITIZE_PY"
}

export PYTHON BUILD_DIR SANITIZE_PY CORE_TOTALS_PY LOG_DIR
export -f build sanitize
echo "gpu_check: $(nvidia-smi -L 2>/dev/null | head -1); $("$PYTHON" --version 2>&1); nvcc $(nvcc --version | grep -o 'release [0-9.]*')"
stage build 240 build
# CUDA tests: test_cuda.py (CUDA-only properties) and the shared bodies' cuda-* backends, each run
# once per CUDA core that serves it; the per-core totals are printed at the end of the stage.
CORE_TOTALS_PY=$(mktemp --suffix=.py)
cat >"$CORE_TOTALS_PY" <<'EOF'
import collections, re, sys
import xml.etree.ElementTree as ET
totals = collections.defaultdict(collections.Counter)
for path in sys.argv[1:]:
    for case in ET.parse(path).getroot().iter("testcase"):
        m = re.search(r"\b(?:cpu|cuda)-(cudnn|cuda|efficient|composed|cpu|simt)\b", case.get("name", ""))
        core = m.group(1) if m else "(no core)"
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        totals[core][kind] += 1
for core, c in sorted(totals.items()):
    print(f"core {core:<10} passed {c['passed']:>4}  failed {c['failure'] + c['error']:>4}  skipped {c['skipped']:>4}")
EOF
stage tests 200 '"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml="$LOG_DIR/tests_cuda.xml"; a=$?;
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_op.py tests/test_saved_tensors.py tests/test_errors.py tests/test_opcheck_compile.py -k "cuda-" --junitxml="$LOG_DIR/tests_shared.xml"; b=$?;
  "$PYTHON" "$CORE_TOTALS_PY" "$LOG_DIR"/tests_cuda.xml "$LOG_DIR"/tests_shared.xml; [ $a -eq 0 ] && [ $b -eq 0 ]'
stage cpu_tests 120 '"$PYTHON" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_cuda.py'
stage memcheck 75 'sanitize memcheck'
stage racecheck 75 'sanitize racecheck'
# The benchmark budget (200 s) is shared: the block-level suites (benchmarks/bench.py: memory and
# speed vs HF-style baselines, CSV + plots in $LOG_DIR/bench), then the op-level kernel table.
stage bench 100 "\"\$PYTHON\" benchmarks/bench.py all --no-progress --out \"$LOG_DIR/bench\""
stage bench_op 100 "\"\$PYTHON\" benchmarks/bench_gpu.py ${BENCH_ARGS:-}"
rm -f "$SANITIZE_PY" "$CORE_TOTALS_PY"

echo "=== gpu_check summary ($(( $(date +%s) - T_START ))s total; logs in $LOG_DIR)"
printf '%s\n' "${SUMMARY[@]}" | tee "$LOG_DIR/summary.txt"
case "${SUMMARY[*]}" in *FAIL*|*TIMEOUT*|*SKIPPED*) exit 1 ;; esac
