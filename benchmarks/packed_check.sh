#!/usr/bin/env bash
# The packed float16 decode path (int4, int3, int2 at one token) in one device call, < 10 minutes:
#
#   OUT=out bash benchmarks/packed_check.sh
#
# 1. correctness: benchmarks/check_decode_kernels.py --quick (the packed path against the float32
#    reference, massive-activation inputs, Qwen3-30B-A3B and Mixtral-8x7B shapes, g64 and g128);
# 2. kernel timings: benchmarks/kernels.py --variants for the three formats on the same two shapes
#    (MODELS=... for others; int8 too, whose default is unmeasured outside Mixtral): tiled,
#    choose_config, packed and float32 split-K and the packed path in block steps side by side,
#    then packed variations;
# 3. end to end: `dymoe bench` on the synthetic Qwen3-30B-A3B shape (8 layers), resident and the
#    static int4/int2 presets with room for every expert (the step is the kernels, not transfers),
#    once with DYMOE_PACKED_DECODE=0 and once with =1.
# Each stage has its own time limit, so a slow one cannot take the others' time. Logs: $OUT/*.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PYTHON=${PYTHON:-python}
MODELS=${MODELS:-qwen3-30b-a3b mixtral-8x7b}  # kernel stage: olmoe and deepseek-v2-lite too
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
started=$SECONDS
stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (+$((SECONDS - started)) s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "-- $name rc=$? (+$((SECONDS - started)) s)"
}
stage check 90 "$PYTHON" benchmarks/check_decode_kernels.py --quick
tail -3 "$OUT/check.txt"
stage kernels 170 "$PYTHON" benchmarks/kernels.py --out "$OUT/kernels" --variants --budget-s 100 \
  --models $MODELS --formats int4/g128 int4/g64 int3/g128 int3/g64 int2/g64 int2/g128 int8
for packed in 0 1; do
  export DYMOE_PACKED_DECODE=$packed
  stage "e2e-packed$packed" 75 "$PYTHON" -m dymoe bench \
    --model synthetic:qwen3-30b-a3b --layers 8 --policies resident,static-int4,static-int2 \
    --device-memory 100% --prompt-len 32 --gen-len 32 --routing skewed --no-progress \
    --json "$OUT/e2e-packed$packed.json"
done
unset DYMOE_PACKED_DECODE
echo "== kernels: packed and float32 split-K per shape, then the summary"
grep -E "split packed|split float32|split default|choose_config" "$OUT/kernels.txt" | cut -c1-150
tail -18 "$OUT/kernels.txt"
for packed in 0 1; do
  echo "== end to end, DYMOE_PACKED_DECODE=$packed"
  tail -12 "$OUT/e2e-packed$packed.txt"
done
