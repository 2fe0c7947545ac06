#!/usr/bin/env bash
# shellcheck disable=SC2317 # the stage_* functions run through `timeout bash -c`
# The GPU check in one call (issue 25): maximal evidence from one command of at most DEADLINE
# seconds (default 540, so a 590 s limit on the command leaves room for a rerun) on a lent
# H100/H200 (torch 2.11 + CUDA 13.0). Stages in order of evidence per second:
#
#   env        GPU, clocks, driver, torch / CUDA / cuDNN / nvcc / compute-sanitizer versions
#   build      lean: sm_90 only, the SIMT emulator core off, -Xptxas -v; each kernel's registers,
#              spills and stack frame into resources.txt and the summary. A library already in
#              python/torch_mla/lib is used instead if it imports and holds sm_90 code.
#   smoke      benchmarks/gpu_smoke.py: every CUDA core vs the float64 reference, one line per
#              case, and the large-index case (q over 2^31 elements)
#   memcheck, racecheck, synccheck
#              compute-sanitizer on a small forward + backward of our kernels (kernel filter)
#   bench      benchmarks/bench_gpu.py --check: auto, each core, HF-style SDPA, S = 1k..8k, bf16,
#              DeepSeek-V3 heads; packed, deterministic and grid-order rows
#   tests      named tests (-v, --timeout=120): our kernels' CUDA cases first, then the rest
#
# Each stage's limit is its share of the time left (shares below), so the limits never add up past
# DEADLINE and time a stage does not use goes to the later ones; a stage whose limit falls under its
# minimum is skipped "out of time". Each stage appends its verdict line to $OUT/summary.txt the
# moment it ends (a killed command still leaves the verdicts so far), with its `summary:` output
# lines indented under it. Stages after a failed build are skipped with that reason. All stdout
# and stderr go to $OUT/gpu_check.log as well; the summary is printed last.
#
# Files in $OUT (at most 6): summary.txt, gpu_check.log, resources.txt, smoke.txt, bench.csv,
# tests.xml. Everything else (build log, junit parts) goes to a scratch folder that is removed.
#
# Usage (repo root): OUT=folder bash benchmarks/gpu_check.sh [--dry-run]
#   --dry-run   the plumbing only (no build, no GPU work): every stage takes its skip path with a
#               reason; for this CPU machine and `make test` (tests/test_gpu_check.py)
#   OUT (default: a new temp folder), DEADLINE=540, PYTHON=python3, BUILD_DIR=build/gpu,
#   STAGES="env build smoke memcheck racecheck synccheck bench tests" (a subset skips the others
#   with "not selected"), BENCH_ARGS (replace the bench's default arguments)
# Exit status: 0 when every stage passed (in a dry run: none failed, timed out or ran out of time),
# 1 otherwise, 2 on a bad argument.
set -u
cd "$(dirname "$0")/.." || exit 2

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '3,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done
case ${DEADLINE:=540} in
  ''|*[!0-9]*) echo "gpu_check.sh: DEADLINE must be whole seconds, got '$DEADLINE'" >&2; exit 2 ;;
esac

export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
BUILD_DIR=${BUILD_DIR:-build/gpu}
ALL_STAGES=(env build smoke memcheck racecheck synccheck bench tests)
STAGES=${STAGES:-${ALL_STAGES[*]}}
# Shares of the time left (percent of DEADLINE when every stage uses all of its limit; env takes at
# most 30 s before them) and the least time worth starting a stage with. RESERVE_PCT is kept for
# the summary at the end.
declare -A SHARE=([env]=0 [build]=29 [smoke]=13 [memcheck]=5 [racecheck]=6 [synccheck]=5 [bench]=22 [tests]=18)
declare -A MIN_S=([env]=5 [build]=60 [smoke]=20 [memcheck]=15 [racecheck]=15 [synccheck]=15 [bench]=30 [tests]=30)
RESERVE_PCT=2
T_START=$(date +%s)
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON OUT WORK BUILD_DIR DRY_RUN

elapsed() { echo $(( $(date +%s) - T_START )); }

# ---- the stages: each runs in `timeout bash -c`, prints `summary: ...` lines for the summary ----

stage_env() {
  echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname), $(nproc) cores, deadline ${DEADLINE}s"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
      --format=csv
    echo "summary: $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | head -1)"
  else
    echo "summary: no nvidia-smi (no GPU driver)"
  fi
  "$PYTHON" - <<'EOF'
import importlib.util, torch
cuda = torch.cuda.is_available()
cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
dev = f"{torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}" if cuda else "no CUDA device"
plugins = ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'NO'}" for m in ("pytest", "pytest_timeout"))
print(f"summary: torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}); {dev}; {plugins}")
open(__import__("os").environ["WORK"] + "/have_gpu", "w").write("1" if cuda else "0")
EOF
  local nvcc_v sanitizer_v
  nvcc_v=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo "none")
  sanitizer_v=$(compute-sanitizer --version 2>/dev/null | grep -o 'Version [0-9.]*' | head -1 || true)
  echo "summary: nvcc ${nvcc_v}; compute-sanitizer ${sanitizer_v:-none}"
}

LIB=python/torch_mla/lib/libtorch_mla.so

# A library carried in is used when it imports under this torch and holds sm_90 code.
prebuilt_ok() {
  [ -f "$LIB" ] && command -v cuobjdump >/dev/null && cuobjdump --list-elf "$LIB" 2>/dev/null | grep -q sm_90 &&
    "$PYTHON" -c 'import torch_mla, sys; sys.exit(90 not in torch_mla.cores.compiled_kernel_archs())' 2>/dev/null
}

resources() {  # resources BUILD_LOG: the per-kernel table from ptxas -v, else from the binary
  if grep -q "Compiling entry function" "$1" 2>/dev/null; then
    "$PYTHON" scripts/kernel_resources.py --from-log "$1"
  else  # nothing recompiled (or a prebuilt library): what cuobjdump reads off the binary
    cuobjdump --dump-resource-usage "$LIB" | grep -E "Function|REG" | grep -B1 -E "REG:" | grep -v '^--$'
    echo "summary: resources from cuobjdump (no ptxas log: nothing compiled in this run)"
  fi
}

stage_build() {
  if prebuilt_ok; then
    echo "summary: prebuilt $LIB used (imports, has sm_90)"
    resources /dev/null >"$OUT/resources.txt"
    sed 's/^\(summary: \)\{0,1\}/summary: /' "$OUT/resources.txt"
    return 0
  fi
  local root
  root=$("$PYTHON" python/torch_mla/cmake.py --cuda-root --dir "$BUILD_DIR/cuda-root")
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTORCH_MLA_CUDA=ON \
    -DTORCH_MLA_CUDA_ARCHS=90 -DTORCH_MLA_SIMT=OFF -DTORCH_MLA_BUILD_TESTS=OFF \
    -DCMAKE_CUDA_FLAGS="-Xptxas -v" \
    -DCMAKE_PREFIX_PATH="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
    ${root:+-DCUDA_TOOLKIT_ROOT_DIR=$root -DCUDAToolkit_ROOT=$root} || return 1
  local t0=$SECONDS
  # ptxas's report goes to the build log only: hundreds of lines the gpu_check.log need not hold.
  cmake --build "$BUILD_DIR" -j "$(nproc)" >"$WORK/build.log" 2>&1
  local rc=$?
  grep -v -E "^ptxas info|bytes stack frame" "$WORK/build.log" | tail -40
  echo "summary: build rc=$rc in $(( SECONDS - t0 ))s (sm_90, SIMT off)"
  [ "$rc" -eq 0 ] || return "$rc"
  cmake --install "$BUILD_DIR" --prefix python/torch_mla >/dev/null || return 1
  resources "$WORK/build.log" >"$OUT/resources.txt"
  sed 's/^\(summary: \)\{0,1\}/summary: /' "$OUT/resources.txt"  # the table goes into the summary
  # the checked-in resource gate, on this build's report
  "$PYTHON" scripts/kernel_resources.py --check --from-log "$WORK/build.log" | tail -5
  echo "summary: resource gate (scripts/kernel_resources.py --check) rc=${PIPESTATUS[0]}"
  "$PYTHON" -c 'import torch, torch_mla; print("summary: CUDA kernels for", torch_mla.cores.compiled_kernel_archs())'
}

stage_smoke() {
  "$PYTHON" benchmarks/gpu_smoke.py --out "$OUT/smoke.txt"
}

sanitize() {  # sanitize TOOL: only our kernels are instrumented where the tool can filter by name
  local filter=() help
  help=$(compute-sanitizer --help 2>/dev/null)
  if grep -q -- "--kernel-name " <<<"$help"; then filter=(--kernel-name kns=mla_)
  elif grep -q -- "--kernel-regex" <<<"$help"; then filter=(--kernel-regex kns=mla_)
  fi
  echo "compute-sanitizer --tool $1 ${filter[*]:-(no kernel filter)}"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    compute-sanitizer --tool "$1" ${filter[@]+"${filter[@]}"} --error-exitcode 1 \
    "$PYTHON" benchmarks/gpu_smoke.py --sanitize 2>&1 | tee "$WORK/sanitize.out"
  local rc=${PIPESTATUS[0]}
  echo "summary: $(grep -E "ERROR SUMMARY" "$WORK/sanitize.out" | tail -1 | sed 's/^=* *//')"
  return "$rc"
}
stage_memcheck() { sanitize memcheck; }
stage_racecheck() { sanitize racecheck; }
stage_synccheck() { sanitize synccheck; }

stage_bench() {
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
  "$PYTHON" benchmarks/bench_gpu.py --check --csv "$OUT/bench.csv" \
    ${BENCH_ARGS:---seqlens 1024 2048 4096 8192 --tokens 16384 --warmup 1 --reps 5}
}

stage_tests() {
  local timeout_opt=(--timeout=120)
  if ! "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then
    echo "summary: pytest-timeout not installed: tests run without the per-test timeout"
    timeout_opt=()
  fi
  local shared=(tests/test_op.py tests/test_saved_tensors.py tests/test_errors.py tests/test_opcheck_compile.py
                tests/test_max_logits.py tests/test_block.py)
  local common=(-v -p no:cacheprovider -rfE "${timeout_opt[@]}")
  # Each run gets its own share of the stage's limit and is stopped with SIGINT, on which pytest
  # still writes its junit file (a killed stage would lose it). 10 s are kept for the merge.
  local budget=$(( STAGE_LIMIT - 10 )) rc=0
  run_pytest() {  # run_pytest SECONDS JUNIT ARGS...
    local t=$1 xml=$2 code; shift 2
    if [ "$t" -lt 5 ]; then  # `timeout 0` would mean no limit at all
      echo "summary: pytest ${*: -1} not run: ${t}s left of the stage"; rc=1; return
    fi
    timeout -s INT -k 10 "$t" "$PYTHON" -m pytest "${common[@]}" --junitxml="$xml" "$@"
    code=$?
    [ "$code" -eq 0 ] || rc=1
    [ "$code" -eq 124 ] && echo "summary: pytest ${*: -1} stopped at its share of the stage (${t}s)"
  }
  # Our kernels first (the core id cuda-cuda), then the other CUDA cores and CUDA-only tests.
  run_pytest $(( budget * 45 / 100 )) "$WORK/tests_1.xml" tests/test_cuda.py "${shared[@]}" -k "cuda-cuda"
  run_pytest $(( budget * 30 / 100 )) "$WORK/tests_2.xml" tests/test_cuda.py -k "not cuda-cuda"
  run_pytest $(( STAGE_LIMIT - 10 - SECONDS )) "$WORK/tests_3.xml" "${shared[@]}" \
    -k "cuda- and not cuda-cuda"
  "$PYTHON" benchmarks/gpu_check_tools.py junit "$OUT/tests.xml" "$WORK"/tests_[123].xml
  return "$rc"
}
export -f stage_env stage_build stage_smoke sanitize stage_memcheck stage_racecheck stage_synccheck \
  stage_bench stage_tests prebuilt_ok resources
export LIB DEADLINE

# ---- why a stage does not run (empty: it runs) ---------------------------------------------------

BUILD_STATE=""  # "", ok, skipped, or the build's verdict when it did not pass
skip_reason() {
  local name=$1 gpu
  gpu=$(cat "$WORK/have_gpu" 2>/dev/null || echo 0)
  case $name in
    env) return ;;
    build)
      if [ "$DRY_RUN" = 1 ]; then echo "dry run: no nvcc build"
      elif ! command -v nvcc >/dev/null && ! prebuilt_ok; then echo "no nvcc and no prebuilt sm_90 library"
      fi
      return ;;
  esac
  case $BUILD_STATE in ""|ok|skipped) ;; *) echo "the build did not pass: $BUILD_STATE"; return ;; esac
  if [ "$gpu" != 1 ]; then echo "no CUDA device"; return; fi
  if [ "$DRY_RUN" = 1 ]; then echo "dry run"; return; fi
  if [ "$BUILD_STATE" != ok ] && ! prebuilt_ok; then echo "no library with sm_90 kernels"; return; fi
  case $name in
    memcheck|racecheck|synccheck)
      command -v compute-sanitizer >/dev/null || echo "compute-sanitizer not found" ;;
    tests)
      "$PYTHON" -c 'import pytest' 2>/dev/null || echo "pytest not installed" ;;
  esac
}

# ---- the runner ----------------------------------------------------------------------------------

FAILED=0
verdict() {  # verdict NAME TEXT [DETAILS_FILE]: the stage's line (and its summary: lines) appended
  local line="[$1] $2"
  echo "=== $line"
  { echo "$line"; [ -n "${3:-}" ] && sed -n 's/^summary: /  /p' "$3"; } >>"$SUMMARY"
}

run_stage() {
  local name=$1 i share_left=0 started=0
  for i in "${ALL_STAGES[@]}"; do
    [ "$i" = "$name" ] && started=1
    [ $started = 1 ] && case " $STAGES " in *" $i "*) share_left=$(( share_left + SHARE[$i] )) ;; esac
  done
  case " $STAGES " in *" $name "*) ;; *) verdict "$name" "SKIPPED (not selected)"; return ;; esac
  local left=$(( DEADLINE * (100 - RESERVE_PCT) / 100 - $(elapsed) ))
  local limit=$(( left * SHARE[$name] / share_left ))
  [ "$name" = tests ] && limit=$left  # the last stage takes what is left
  [ "$name" = env ] && limit=$(( left < 30 ? left : 30 ))  # cheap and first: never a share
  if [ "$limit" -lt "${MIN_S[$name]}" ]; then
    verdict "$name" "SKIPPED (out of time: ${limit}s left for it, needs ${MIN_S[$name]}s; $(elapsed)s of ${DEADLINE}s used)"
    FAILED=1
    [ "$name" = build ] && BUILD_STATE=skipped
    return
  fi
  local why
  why=$(skip_reason "$name")
  if [ -n "$why" ]; then
    verdict "$name" "SKIPPED ($why; its limit would be ${limit}s)"
    [ "$name" = build ] && BUILD_STATE=skipped
    [ "$DRY_RUN" = 1 ] || FAILED=1
    return
  fi
  echo "=== [$name] start (limit ${limit}s, $(elapsed)s of ${DEADLINE}s used)"
  local t0=$SECONDS rc
  STAGE_LIMIT=$limit timeout --kill-after=5 "$limit" bash -c "stage_$name" 2>&1 |
    tee "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  local text="PASS"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then text="TIMEOUT"; elif [ "$rc" -ne 0 ]; then text="FAIL (rc=$rc)"; fi
  [ "$text" = PASS ] || FAILED=1
  [ "$name" = build ] && BUILD_STATE=$([ "$text" = PASS ] && echo ok || echo "$text")
  verdict "$name" "$text in $(( SECONDS - t0 ))s (limit ${limit}s)" "$WORK/$name.out"
}

echo "=== gpu_check: OUT=$OUT, DEADLINE=${DEADLINE}s$([ "$DRY_RUN" = 1 ] && echo ', dry run')"
for name in "${ALL_STAGES[@]}"; do
  run_stage "$name"
done
FILES=("$OUT"/*)
echo "=== gpu_check summary ($(elapsed)s of ${DEADLINE}s; files in $OUT: ${FILES[*]##*/})"
cat "$SUMMARY"
exit $FAILED
