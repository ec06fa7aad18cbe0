#!/usr/bin/env bash
# The packed float16 decode path (int4, int3, int2 at one token) in one device call, < 10 minutes:
#
#   OUT=out bash benchmarks/packed_check.sh
#
# 1. correctness: benchmarks/check_decode_kernels.py --quick (the packed path against the float32
#    reference, massive-activation inputs, Qwen3-30B-A3B and Mixtral-8x7B shapes, g64 and g128;
#    four steps back to back with programmatic dependent launch, then in one launch) and
#    check_dense_kernels.py;
# 2. end to end: `dymoe bench` on the synthetic Qwen3-30B-A3B shape (8 layers), resident, lru and
#    the static int4/int2 presets at 100% and 50% of the experts' bf16 bytes, with today's defaults
#    and once more with DYMOE_ONE_LAUNCH=1 (lru's bf16 slots: its KL against resident shows that
#    offloading stays invisible, invariant 2); E2E="1 1 0 gather 0,1 1 - grouped 1" picks runs
#    (DYMOE_FUSED_DENSE, DYMOE_PACKED_DECODE, DYMOE_PDL, DYMOE_RESIDENT_DECODE, DYMOE_ONE_LAUNCH;
#    "-" for the pdl or one-launch switch leaves it unset, i.e. per shape);
# 3. kernel timings, in the time left: benchmarks/expert_kernels.py --variants (FORMATS=..., MODELS=...
#    for others, e.g. olmoe and deepseek-v2-lite; KERNEL_BUDGET seconds): tiled, choose_config,
#    packed and float32 split-K, the packed path per group (block steps are the default) and
#    programmatic dependent launch against the default's setting side by side, then packed variations;
#    then (its own stage) the step's other launch forms against choose_config's (expert_kernels.py --forms).
# Each stage has its own time limit, so a slow one cannot take the others' time. Logs: $OUT/*.txt
# (check, kernels, e2e), $OUT/kernels/variants.json, $OUT/e2e-*.json (6 files by default).
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
# end to end (E2E: runs as "fused packed pdl decode one_launch" separated by commas; "-" leaves
# DYMOE_PDL or DYMOE_ONE_LAUNCH unset, i.e. per shape): by default today's defaults, then the same
# with every step in one launch
IFS=, read -ra e2e_runs <<< "${E2E:-1 1 - grouped -,1 1 - grouped 1}"
for run in "${e2e_runs[@]}"; do
  set -- $run
  name=e2e-fused$1-packed$2-pdl${3/-/auto}-$4-one${5/-/auto}
  # lru's bf16 slots at 100% and 50% (1024 slots decoded gathered, 512 grouped): its KL against
  # resident shows whether offloading stays invisible (invariant 2)
  pdl_env=(); [ "$3" != "-" ] && pdl_env=(DYMOE_PDL=$3)
  one_env=(); [ "$5" != "-" ] && one_env=(DYMOE_ONE_LAUNCH=$5)
  echo "### DYMOE_FUSED_DENSE=$1 DYMOE_PACKED_DECODE=$2 ${pdl_env[*]:-DYMOE_PDL unset} DYMOE_RESIDENT_DECODE=$4 ${one_env[*]:-DYMOE_ONE_LAUNCH unset}" >> "$OUT/e2e.txt"
  env DYMOE_FUSED_DENSE=$1 DYMOE_PACKED_DECODE=$2 "${pdl_env[@]}" DYMOE_RESIDENT_DECODE=$4 "${one_env[@]}" \
    timeout 90 "$PYTHON" -m dymoe bench --model synthetic:qwen3-30b-a3b --layers 8 \
    --policies resident,lru,static-int4,static-int2 --device-memory 100%,50% --prompt-len 32 --gen-len 32 \
    --routing skewed --no-progress --json "$OUT/$name.json" >> "$OUT/e2e.txt" 2>&1
  echo "-- e2e $name rc=$? (+$((SECONDS - started)) s)"
done
stage kernels $((KERNEL_BUDGET * 2 - 20)) "$PYTHON" benchmarks/expert_kernels.py --out "$OUT/kernels" --variants \
  --budget-s "$KERNEL_BUDGET" --models $MODELS --formats $FORMATS
# the other launch forms (one launch or apart, preload or not) apart, last: a kernel that never ends costs
# only this stage (its log joins kernels.txt; its json stays on the machine)
stage kernels 60 "$PYTHON" benchmarks/expert_kernels.py --out "${TMPDIR:-/tmp}/one-launch" --variants --forms \
  --budget-s 30 --models $MODELS --formats int8 int4/g128 int3/g128 int2/g64
echo "== kernels: choose_config, packed/float32 split-K and pdl per shape, then the summary"
grep -E "split packed|split float32|split default|choose_config|split pdl|split no pdl|one launch" "$OUT/kernels.txt" | cut -c1-150
tail -18 "$OUT/kernels.txt"
echo "== end to end"
grep -v "^\s*$" "$OUT/e2e.txt" | tail -60 | cut -c1-160
