#!/usr/bin/env bash
# The one-token expert step traced program by program, and a change to the step timed against a
# base tree, on a GPU, in one device call (< 10 minutes):
#
#   OUT=out BASE=bench-base bash benchmarks/timeline_check.sh
#
# 1. benchmarks/step_timeline.py on Qwen3-30B-A3B, OLMoE and DeepSeek-V2-Lite at int4/g128,
#    int2/g64 and int3/g128 (TIMELINE_MODELS, TIMELINE_FORMATS), the default step and one other
#    config (TIMELINE_SET, default "--set-down split_k=1 --set-down block_n=64": down in one K slice);
# 2. benchmarks/expert_kernels.py --variants --chosen (choose_config's step, hot and cold, checked
#    against the float32 reference) of BASE's package (another revision's dymoe/: `git archive REV
#    dymoe | tar -x -C DIR`) and of this one, alternated, on the same shapes at int4/g128 and int2/g64;
# 3. GPU tests: the traced step (tests/bench/test_step_timeline.py; GPU_TESTS adds others, e.g.
#    tests/runtime/test_kernels_decode.py, models decoding through the expert kernels);
# 4. benchmarks/step_phases.py on the same shapes and formats: the step against one read of its
#    bytes (read) and two chained reads (read+read, the floor of a two-launch step).
# STAGES="1 4 2 3" picks stages (that order by default). Logs under $OUT; a summary last. Shared
# steps: check_common.sh.
STAGES=${STAGES:-1 4 2 3}
source "$(dirname "$0")/check_common.sh"
SHAPES=${TIMELINE_MODELS:-qwen3-30b-a3b olmoe deepseek-v2-lite}
if stage 1; then
  echo "== step_timeline $(elapsed)"
  (cd benchmarks && timeout 200 "$PYTHON" step_timeline.py --out "$OUT" --models $SHAPES \
    --formats ${TIMELINE_FORMATS:-int4/g128 int2/g64 int3/g128} \
    ${TIMELINE_SET:---set-down split_k=1 --set-down block_n=64}) > "$OUT/step_timeline.txt" 2>&1
  echo "-- rc=$? $(elapsed)"
fi
if stage 4; then
  echo "== step_phases $(elapsed)"
  (cd benchmarks && timeout 120 "$PYTHON" step_phases.py --out "$OUT" --models $SHAPES \
    --formats ${TIMELINE_FORMATS:-int4/g128 int2/g64 int3/g128}) > "$OUT/step_phases.txt" 2>&1
  echo "-- rc=$? $(elapsed)"
fi
if stage 2; then
  for entry in ${BASE:+base=$PWD/$BASE} this=$PWD; do
    echo "== chosen ${entry%%=*} $(elapsed)"
    (cd benchmarks && PYTHONPATH="${entry#*=}:$PWD" timeout 100 "$PYTHON" -P expert_kernels.py \
      --out "$OUT/chosen-${entry%%=*}" --variants --chosen --models $SHAPES --formats int4/g128 int2/g64) \
      > "$OUT/chosen-${entry%%=*}.txt" 2>&1
    echo "-- rc=$? $(elapsed)"
  done
fi
if stage 3; then
  gpu_tests tests/bench/test_step_timeline.py ${GPU_TESTS:-}
fi
echo "== summary $(elapsed)"
[ -f "$OUT/step_timeline.txt" ] && sed -n '/^one-token/,$p' "$OUT/step_timeline.txt" | cut -c1-200
[ -f "$OUT/step_phases.txt" ] && sed -n '/^one-token/,/^$/p' "$OUT/step_phases.txt" | cut -c1-200
for f in "$OUT"/chosen-*.txt; do
  [ -f "$f" ] && echo "-- $f" && grep -E "^variant" "$f" | cut -c1-170
done
[ -f "$OUT/tests.txt" ] && tail -n 3 "$OUT/tests.txt"
