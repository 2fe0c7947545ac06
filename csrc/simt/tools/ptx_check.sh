#!/usr/bin/env bash
# Compiles the four kernel instantiation files with nvcc for sm_90 (flags of CMakeLists.txt) and
# prints, per kernel, ptxas' registers and spills; with a directory argument also writes the PTX
# there (compare two trees' PTX with diff). Needs the venv's torch headers (c10 macros).
#   csrc/simt/tools/ptx_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../../.."
TI=${TORCH_INCLUDE:-.venv/lib/python3.11/site-packages/torch/include}
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
flags=(-std=c++20 --expt-relaxed-constexpr -arch=sm_90 -Icsrc -I"$TI" -I"$TI/torch/csrc/api/include")
for f in forward_bf16 backward_bf16 forward_fp16 backward_fp16; do
  nice nvcc "${flags[@]}" -ptx "csrc/torch_mla/cores/cuda/mla_$f.cu" -o "$OUT/$f.ptx"
  nice nvcc "${flags[@]}" -Xptxas -v -c "csrc/torch_mla/cores/cuda/mla_$f.cu" -o "$OUT/$f.o" 2> "$OUT/$f.ptxas.txt"
  awk '/Compiling entry function/ { match($0, /_Z[A-Za-z0-9_]+/); name = substr($0, RSTART, RLENGTH) }
       /spill stores/ { spill = $0; sub(/^ +/, "", spill) }
       /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15);
                                  print name "\t" regs " regs\t" spill }' "$OUT/$f.ptxas.txt" |
    while IFS=$'\t' read -r name regs spill; do
      printf '%-14s %-40s %s, %s\n' "$f" "$(echo "$name" | c++filt | sed 's/torch_mla::cuda:://g; s/(.*//')" "$regs" "$spill"
    done
done
