#!/usr/bin/env bash
# The packed float16 decode path (int4, int3, int2 at one token) in one device call, < 10 minutes:
#
#   OUT=out bash benchmarks/packed_check.sh
#
# 1. correctness: benchmarks/check_decode_kernels.py --quick (the packed path against the float32
#    reference, massive-activation inputs, Qwen3-30B-A3B and Mixtral-8x7B shapes, g64 and g128;
#    four steps back to back with programmatic dependent launch, then in one launch) and
#    check_dense_kernels.py;
# 2. end to end: `dymoe bench` on the synthetic Qwen3-30B-A3B shape (8 layers), resident and the
#    static int4/int2 presets with room for every expert (the step is the kernels, not transfers),
#    once as before (DYMOE_FUSED_DENSE=0 DYMOE_PACKED_DECODE=0 DYMOE_PDL=0, gathered resident
#    decode), once with fused dense kernels and packed low-bit kernels, once with DYMOE_PDL=1 too
#    and once more (resident and lru only) with DYMOE_RESIDENT_DECODE=grouped: today's defaults on
#    this shape (lru's bf16 slots: its KL against resident shows whether offloading stays
#    invisible, invariant 2, at 100% with 1024 slots decoded gathered, at 50% with 512 decoded
#    grouped); E2E="1 1 0 gather,1 1 1 grouped" picks runs (fused packed pdl decode);
# 3. kernel timings, in the time left: benchmarks/kernels.py --variants (FORMATS=..., MODELS=...
#    for others, e.g. olmoe and deepseek-v2-lite; KERNEL_BUDGET seconds): tiled, choose_config,
#    packed and float32 split-K, the packed path per group (block steps are the default) and
#    programmatic dependent launch against the default's setting side by side, then packed variations;
#    then (its own stage) the one-launch step against choose_config's (kernels.py --one-launch).
# Each stage has its own time limit, so a slow one cannot take the others' time. Logs: $OUT/*.txt
# (check, kernels, e2e), $OUT/kernels/variants.json, $OUT/e2e-*.json (8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PYTHON=${PYTHON:-python}
MODELS=${MODELS:-qwen3-30b-a3b mixtral-8x7b}  # kernel stage: olmoe and deepseek-v2-lite too
FORMATS=${FORMATS:-int4/g128 int4/g64 int3/g128 int3/g64 int2/g64 int2/g128 int8}
KERNEL_BUDGET=${KERNEL_BUDGET:-110}  # seconds of kernel variants (the first pass may take 1.5x)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/check.txt"
started=$SECONDS
stage() {  # log name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (+$((SECONDS - started)) s)"
  timeout "$limit" "$@" >> "$OUT/$name.txt" 2>&1
  echo "-- $name rc=$? (+$((SECONDS - started)) s)"
}
stage check 150 "$PYTHON" benchmarks/check_decode_kernels.py --quick
stage check 45 "$PYTHON" benchmarks/check_dense_kernels.py
tail -24 "$OUT/check.txt"
# end to end: the old path (no fused dense kernels, packed off), fused dense + packed (the defaults),
# that with programmatic dependent launch, and resident decode through grouped GEMMs
# (E2E: runs as "fused packed pdl decode" separated by commas)
IFS=, read -ra e2e_runs <<< "${E2E:-0 0 0 gather,1 1 0 gather,1 1 1 gather,1 1 1 grouped}"
for run in "${e2e_runs[@]}"; do
  set -- $run
  name=e2e-fused$1-packed$2-pdl$3-$4
  policies=resident,lru,static-int4,static-int2  # lru at 100%: bf16 slots, KL vs resident = invariant 2
  budgets=100%
  # grouped: lru at 50% too (512 slots, decoded grouped; at 100% its 1024+ slots decode gathered)
  [ "$4" = grouped ] && policies=resident,lru budgets=100%,50%
  echo "### DYMOE_FUSED_DENSE=$1 DYMOE_PACKED_DECODE=$2 DYMOE_PDL=$3 DYMOE_RESIDENT_DECODE=$4" >> "$OUT/e2e.txt"
  DYMOE_FUSED_DENSE=$1 DYMOE_PACKED_DECODE=$2 DYMOE_PDL=$3 DYMOE_RESIDENT_DECODE=$4 stage e2e 60 "$PYTHON" -m dymoe \
    bench --model synthetic:qwen3-30b-a3b --layers 8 --policies $policies \
    --device-memory $budgets --prompt-len 32 --gen-len 32 --routing skewed --no-progress --json "$OUT/$name.json"
done
stage kernels $((KERNEL_BUDGET * 2 - 20)) "$PYTHON" benchmarks/kernels.py --out "$OUT/kernels" --variants \
  --budget-s "$KERNEL_BUDGET" --models $MODELS --formats $FORMATS
# the one-launch step (LaunchConfig.one_launch) apart, last: new, so a kernel that never ends costs
# only this stage (its log joins kernels.txt; its json stays on the machine)
stage kernels 60 "$PYTHON" benchmarks/kernels.py --out "${TMPDIR:-/tmp}/one-launch" --variants --one-launch \
  --budget-s 30 --models $MODELS --formats int8 int4/g128 int3/g128 int2/g64
echo "== kernels: choose_config, packed/float32 split-K and pdl per shape, then the summary"
grep -E "split packed|split float32|split default|choose_config|split pdl|split no pdl|one launch" "$OUT/kernels.txt" | cut -c1-150
tail -18 "$OUT/kernels.txt"
echo "== end to end"
grep -v "^\s*$" "$OUT/e2e.txt" | tail -60 | cut -c1-160
