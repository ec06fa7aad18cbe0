#!/usr/bin/env bash
# The slab step (dymoe/quant/kernels/slab.py) on a GPU, in one device call (< 10 minutes):
#
#   OUT=out bash benchmarks/slab_check.sh
#
# 1. benchmarks/slab_step.py: the slab configs against the default split-K step and a bare read,
#    cold, checked against the float32 reference (Qwen3-30B-A3B int4/g128, int2/g64, int3/g128;
#    then OLMoE, DeepSeek-V2-Lite and Mixtral-8x7B int4/g128 where the time budget allows);
# 2. end to end (`dymoe bench`, synthetic MODEL, 8 layers, SUITE (default static-int4) at 25%):
#    DYMOE_SLAB_STEP=0 and 1 alternated REPEAT times (default 2); perplexity and KL side by side;
# 3. GPU tests: the slab step compiled (tests/quant/test_slab.py) and the decode tests.
# STAGES="1 2 3" picks stages. Logs under $OUT; a summary last. Shared steps: check_common.sh.
STAGES=${STAGES:-1 2 3}
SUITE=${SUITE:-static-int4}
source "$(dirname "$0")/check_common.sh"
if stage 1; then
  echo "== slab_step $(elapsed)"
  (cd benchmarks && timeout 300 "$PYTHON" slab_step.py --out "$OUT/qwen3" --models qwen3-30b-a3b \
    --formats int4/g128 int2/g64 int3/g128 --budget-s 200 > "$OUT/slab_qwen3.txt" 2>&1)
  echo "-- rc=$? $(elapsed)"
  (cd benchmarks && timeout "${OTHERS_S:-150}" "$PYTHON" slab_step.py --out "$OUT/others" --models olmoe \
    deepseek-v2-lite mixtral-8x7b --formats int4/g128 --budget-s 90 > "$OUT/slab_others.txt" 2>&1)
  echo "-- rc=$? $(elapsed)"
fi
if stage 2; then
  for round in $(seq "${REPEAT:-2}"); do
    e2e "e2e-split-$round" "$PWD" DYMOE_SLAB_STEP=0
    e2e "e2e-slab-$round" "$PWD" DYMOE_SLAB_STEP=1
  done
fi
if stage 3; then
  DYMOE_GPU_SLAB=1 gpu_tests tests/quant/test_slab.py tests/runtime/test_kernels_decode.py tests/runtime/test_mapped.py
fi
echo "== summary $(elapsed)"
for f in "$OUT"/slab_qwen3.txt "$OUT"/slab_others.txt; do
  [ -f "$f" ] && sed -n '/^one-token expert step/,$p' "$f"
done
bench_summary "$OUT"/e2e-*.txt
[ -f "$OUT/tests.txt" ] && tail -3 "$OUT/tests.txt"
true
