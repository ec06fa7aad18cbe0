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
# STAGES="1 2 3" picks stages. Logs under $OUT; a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-1 2 3}
SUITE=${SUITE:-resident,static-int4}
MODEL=${MODEL:-qwen3-30b-a3b}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # (absolute: stage 2 runs in benchmarks/)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
started=$SECONDS
stage() { [[ " $STAGES " == *" $1 "* ]]; }
if stage 1; then
  echo "== GPU tests (+$((SECONDS - started)) s)"
  timeout 240 "$PYTHON" -m pytest -q tests/models/test_fused.py tests/runtime/test_mapped.py \
    tests/runtime/test_kernels_decode.py tests/models/test_decode_graphs.py tests/engine/test_engine_runtime.py \
    > "$OUT/tests.txt" 2>&1
  echo "-- rc=$? (+$((SECONDS - started)) s)"
fi
if stage 2; then
  echo "== step_phases (+$((SECONDS - started)) s)"
  (cd benchmarks && timeout 240 "$PYTHON" step_phases.py --out "$OUT" \
    --models qwen3-30b-a3b olmoe deepseek-v2-lite mixtral-8x7b --formats int4/g128 int3/g128 int2/g64) \
    > "$OUT/step_phases.txt" 2>&1
  echo "-- rc=$? (+$((SECONDS - started)) s)"
fi
if stage 3; then
  for round in $(seq "${REPEAT:-2}"); do
    for entry in ${BASES:-} this=$PWD; do
      name=e2e-${entry%%=*}-$round
      echo "== $name (+$((SECONDS - started)) s)"
      PYTHONPATH=${entry#*=} timeout 150 "$PYTHON" -P -m dymoe bench --model "synthetic:$MODEL" --layers 8 \
        --policies "$SUITE" --device-memory 25% --prompt-len 32 --gen-len 64 --routing skewed --no-progress \
        --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
      echo "-- rc=$? (+$((SECONDS - started)) s)"
    done
  done
fi
echo "== summary (+$((SECONDS - started)) s)"
[ -f "$OUT/tests.txt" ] && tail -n 3 "$OUT/tests.txt"
[ -f "$OUT/step_phases.txt" ] && sed -n '/^one-token/,$p' "$OUT/step_phases.txt" | cut -c1-170
shopt -s nullglob
for f in "$OUT"/e2e*.txt; do
  echo "-- $f"; grep -E "^(preset|[a-z0-9-]+(@| ))" "$f" | cut -c1-120
done
