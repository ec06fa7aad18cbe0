#!/usr/bin/env bash
# The router packing the MoE input for the int4, int3 and int2 expert steps (InputPacking), on a GPU,
# in one device call (< 10 minutes):
#
#   OUT=out BASES="before=bench-base" bash benchmarks/router_packing_check.sh
#
# 1. GPU tests: the router's packing at real router shapes (test_fused), and whole models decoding
#    through the packed steps (mapped decode, the graph decode, the fused decode kernels, the engine);
# 2. benchmarks/step_phases.py on the packed formats: the step with and without its input packed
#    ahead, the router with and without packing, and the two chained each way (plus a bit-for-bit
#    check of the packed words and the step's output);
# 3. end to end (`dymoe bench`, synthetic MODEL (default qwen3-30b-a3b), 8 layers, 25%, 64 tokens,
#    SUITE (default resident,static-int4)): each tree of BASES ("name=DIR ...", DIR another
#    revision's dymoe/ package: `git archive REV dymoe | tar -x -C DIR`) and this one, alternated
#    REPEAT times (default 2).
# STAGES="1 2 3" picks stages. Logs under $OUT; a summary last. Shared steps: check_common.sh.
STAGES=${STAGES:-1 2 3}
source "$(dirname "$0")/check_common.sh"
if stage 1; then
  gpu_tests tests/models/test_fused.py tests/runtime/test_mapped.py tests/runtime/test_kernels_decode.py \
    tests/models/test_decode_graphs.py tests/engine/test_engine_runtime.py
fi
if stage 2; then
  echo "== step_phases $(elapsed)"
  (cd benchmarks && timeout 240 "$PYTHON" step_phases.py --out "$OUT" \
    --models qwen3-30b-a3b olmoe deepseek-v2-lite mixtral-8x7b --formats int4/g128 int3/g128 int2/g64) \
    > "$OUT/step_phases.txt" 2>&1
  echo "-- rc=$? $(elapsed)"
fi
if stage 3; then
  for round in $(seq "${REPEAT:-2}"); do
    for entry in ${BASES:-} this=$PWD; do
      e2e "e2e-${entry%%=*}-$round" "${entry#*=}"
    done
  done
fi
echo "== summary $(elapsed)"
[ -f "$OUT/tests.txt" ] && tail -n 3 "$OUT/tests.txt"
[ -f "$OUT/step_phases.txt" ] && sed -n '/^one-token/,$p' "$OUT/step_phases.txt" | cut -c1-170
bench_summary "$OUT"/e2e*.txt
