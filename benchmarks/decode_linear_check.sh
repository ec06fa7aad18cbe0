#!/usr/bin/env bash
# A decode token's dense projections and router through linear_decode on a GPU, in one device call
# (< 10 minutes):
#
#   OUT=out bash benchmarks/decode_linear_check.sh
#
# 1. GPU tests that decode whole models (mapped decode, fused decode kernels, the engine) and
#    benchmarks/check_dense_kernels.py (KERNEL_CHECK=1: benchmarks/check_decode_kernels.py --quick too);
# 2. benchmarks/decode_linear.py: its checks, and linear_decode against cuBLAS per shape (with
#    SWEEP="shape names", a grid of cuts on those shapes);
# 3. end to end (`dymoe bench`, synthetic MODEL (default qwen3-30b-a3b), 8 layers, 25%, 64 tokens;
#    SUITE=...): with BASE=DIR (another revision's dymoe/ package: `git archive REV dymoe | tar -x -C
#    bench-base`, run with its defaults) that one first, then this tree with
#    DYMOE_DECODE_LINEAR=cublas and with the default,
#    alternated REPEAT times (default 2);
# 4. benchmarks/profile_decode.py --graphs of the resident step, with each setting.
# STAGES="1 2 3 4" picks stages. Logs under $OUT; a summary last.
STAGES=${STAGES:-1 2 3 4}
source "$(dirname "$0")/check_common.sh"
if stage 1; then
  gpu_tests tests/runtime/test_mapped.py tests/runtime/test_kernels_decode.py tests/models/test_decode_graphs.py \
    tests/engine/test_engine_runtime.py
  timeout 120 "$PYTHON" benchmarks/check_dense_kernels.py > "$OUT/dense_check.txt" 2>&1
  if [ -n "${KERNEL_CHECK:-}" ]; then
    timeout 200 "$PYTHON" benchmarks/check_decode_kernels.py --quick > "$OUT/decode_kernels_check.txt" 2>&1
    echo "-- check_decode_kernels rc=$? $(elapsed)"
  fi
fi
if stage 2; then
  echo "== decode_linear $(elapsed)"
  timeout 300 "$PYTHON" benchmarks/decode_linear.py --out "$OUT" > "$OUT/decode_linear.txt" 2>&1
  echo "-- rc=$? $(elapsed)"
  if [ -n "${SWEEP:-}" ]; then
    timeout 240 "$PYTHON" benchmarks/decode_linear.py --out "$OUT/sweep" --sweep --shapes $SWEEP \
      > "$OUT/decode_linear_sweep.txt" 2>&1
    echo "-- sweep rc=$? $(elapsed)"
  fi
fi
if stage 3; then
  for round in $(seq "${REPEAT:-2}"); do
    for setting in ${BASE:+base} cublas triton; do
      tree=$([ "$setting" = base ] && echo "$BASE" || echo "$PWD")
      linear=$([ "$setting" = cublas ] && echo cublas || echo triton)  # (base: its own default)
      e2e "e2e-$setting-$round" "$tree" DYMOE_DECODE_LINEAR=$linear
    done
  done
fi
if stage 4; then
  for setting in cublas triton; do
    echo "== profile $setting $(elapsed)"
    DYMOE_DECODE_LINEAR=$setting timeout 120 "$PYTHON" benchmarks/profile_decode.py --policy resident --budget 1.0 \
      --graphs --steps 8 --out "$OUT/profile-$setting" > "$OUT/profile_$setting.txt" 2>&1
  done
fi
echo "== summary $(elapsed)"
[ -f "$OUT/tests.txt" ] && tail -n 3 "$OUT/tests.txt"
[ -f "$OUT/dense_check.txt" ] && tail -n 2 "$OUT/dense_check.txt"
[ -f "$OUT/decode_kernels_check.txt" ] && tail -n 3 "$OUT/decode_kernels_check.txt"
[ -f "$OUT/decode_linear.txt" ] && cut -c1-150 "$OUT/decode_linear.txt"
[ -f "$OUT/decode_linear_sweep.txt" ] && grep -o "^.\{32\}.*best.*" "$OUT/decode_linear_sweep.txt"
bench_summary "$OUT"/e2e*.txt
shopt -s nullglob
for f in "$OUT"/profile_*.txt; do
  echo "-- $f"; grep -E "^resident|nvjet|linear_decode|route_kernel|splitK" "$f" | cut -c1-62,150-200
done
