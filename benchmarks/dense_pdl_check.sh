#!/usr/bin/env bash
# The fused dense kernels chained by programmatic dependent launch (DYMOE_DENSE_PDL) on a GPU, in one
# device call (< 10 minutes):
#
#   OUT=out bash benchmarks/dense_pdl_check.sh
#
# 1. GPU tests: chained and plain launches give the same logits bit for bit (tiny models, graphs and
#    eager), the dense kernels' own GPU tests, and benchmarks/check_dense_kernels.py;
# 2. end to end (`dymoe bench`, synthetic MODEL (default qwen3-30b-a3b), 8 layers, 25%, 64 tokens,
#    SUITE (default resident,static-int4)): "off" (DYMOE_DENSE_PDL=0 DYMOE_EARLY_STEP=0: plain
#    launches but inside the expert step), "dense" (DYMOE_EARLY_STEP=0: the dense kernels chained)
#    and "both" (the defaults: the expert step's first launch early too), alternated REPEAT times
#    (default 2); perplexity and KL must not move;
# 3. benchmarks/profile_decode.py --graphs of the resident step, "off" and "both" (kernel time and
#    wall per step);
# 4. benchmarks/decode_linear.py: linear_decode and route_decode per shape, chained and unchained.
# STAGES="1 2 3 4" picks stages. Logs under $OUT; a summary last. Shared steps: check_common.sh.
STAGES=${STAGES:-1 2 3 4}
source "$(dirname "$0")/check_common.sh"
if stage 1; then
  gpu_tests tests/models/test_dense_pdl.py tests/models/test_fused.py tests/models/test_decode_attention.py \
    tests/models/test_qkv_decode.py tests/runtime/test_kernels_decode.py tests/runtime/test_mapped.py \
    tests/engine/test_engine_runtime.py
  timeout 120 "$PYTHON" benchmarks/check_dense_kernels.py > "$OUT/dense_check.txt" 2>&1
fi
if stage 2; then
  for round in $(seq "${REPEAT:-2}"); do
    e2e "e2e-off-$round" "$PWD" DYMOE_DENSE_PDL=0 DYMOE_EARLY_STEP=0
    e2e "e2e-dense-$round" "$PWD" DYMOE_DENSE_PDL=1 DYMOE_EARLY_STEP=0
    e2e "e2e-both-$round" "$PWD" DYMOE_DENSE_PDL=1 DYMOE_EARLY_STEP=1
  done
fi
if stage 3; then
  for setting in 0 1; do
    echo "== profile pdl=$setting $(elapsed)"
    DYMOE_DENSE_PDL=$setting DYMOE_EARLY_STEP=$setting timeout 120 "$PYTHON" benchmarks/profile_decode.py --policy resident --budget 1.0 \
      --graphs --steps 8 --out "$OUT/profile-pdl$setting" > "$OUT/profile_pdl$setting.txt" 2>&1
  done
fi
if stage 4; then
  echo "== decode_linear $(elapsed)"
  timeout 240 "$PYTHON" benchmarks/decode_linear.py --out "$OUT" > "$OUT/decode_linear.txt" 2>&1
  echo "-- rc=$? $(elapsed)"
fi
echo "== summary $(elapsed)"
[ -f "$OUT/tests.txt" ] && tail -n 3 "$OUT/tests.txt"
[ -f "$OUT/dense_check.txt" ] && tail -n 2 "$OUT/dense_check.txt"
bench_summary "$OUT"/e2e*.txt
[ -f "$OUT/decode_linear.txt" ] && cut -c1-40,100-200 "$OUT/decode_linear.txt"
shopt -s nullglob
for f in "$OUT"/profile_*.txt; do
  echo "-- $f"; grep -E "^resident|linear_decode|add_rms_norm|_split_kernel|qkv_decode" "$f" | cut -c1-62,150-200
done
