#!/usr/bin/env bash
# The split-K step's launch forms on every shape, where an offloading preset's decode step spends
# its host time, and end to end, in one device call (< 10 minutes with every stage):
#
#   OUT=out bash benchmarks/decode_host_check.sh
#
# 0. CHECK=1: benchmarks/check_decode_kernels.py --quick (the packed path, pdl, one launch and
#    preload against the float32 reference, several steps back to back);
# 1. benchmarks/expert_kernels.py --variants --forms: choose_config's pick against the same step's other
#    launch forms (one launch or apart, each with and without preload), Qwen3-30B-A3B,
#    Mixtral-8x7B, OLMoE and DeepSeek-V2-Lite shapes (MODELS=...), every low-bit format
#    (FORMATS=... for fewer); BLOCKS="N ..." also times split-K's defaults sized for N blocks per
#    SM; with BASE=DIR (below) first the same with that package (its choose_config and whichever
#    forms it has; KERNEL_BASE=0: not), so both trees' steps are timed on one machine;
#    KERNELS=0 skips this stage;
# 2. benchmarks/profile_host.py for static-int4 with every expert fitting (all hits after the
#    warm-up), static-int4, lru and dymoe at 25% (POLICIES="policy:budget ..."), synthetic
#    Qwen3-30B-A3B shape, 8 layers: host microseconds per MoE layer waiting for the GPU, in the
#    runtime's bookkeeping between graph replays, and in the replays' launch calls, then a cProfile.
#    POLICIES=none skips it;
# 3. end to end: `dymoe bench` on the same shape at 25% (SUITE=policies, SUITE=none skips it),
#    64 generated tokens; with BASE=DIR (a copy of another revision's dymoe/ package: `git archive
#    REV dymoe | tar -x -C bench-base`, a path git ignores, so the device tool needs
#    carry=["bench-base"]) first with that package, then with this tree's, side by side on one
#    machine (python -P: the working directory does not shadow PYTHONPATH); REPEAT=N runs the pair
#    N times (base, this, base, this, ...: the first run of a call tends to be slower, so one pair
#    alone favours the second). ENVS="A=1 A=2" runs each tree once per environment setting
#    ("-": none), e.g. ENVS="DYMOE_RESIDENT_DECODE=grouped DYMOE_RESIDENT_DECODE=kernels" REPEAT=2.
# Logs: $OUT/check.txt, $OUT/kernels*.txt, $OUT/kernels*/variants.json, $OUT/host.txt,
# $OUT/profile_host_*.txt, $OUT/e2e*.txt and .json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PYTHON=${PYTHON:-python}
MODELS=${MODELS:-qwen3-30b-a3b mixtral-8x7b olmoe deepseek-v2-lite}
FORMATS=${FORMATS:-int8 int4/g128 int4/g64 int3/g128 int3/g64 int2/g64 int2/g128}
POLICIES=${POLICIES:-static-int4:1.0 static-int4:0.25 lru:0.25 dymoe:0.25}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
started=$SECONDS
if [ "${CHECK:-0}" = 1 ]; then
  echo "== decode kernel checks (+0 s)"
  timeout 240 "$PYTHON" benchmarks/check_decode_kernels.py --quick > "$OUT/check.txt" 2>&1
  echo "-- rc=$? (+$((SECONDS - started)) s)"
fi
if [ "${KERNELS:-1}" = 1 ]; then
  bases=()
  [ "${KERNEL_BASE:-1}" = 1 ] && bases=(${BASE:+"$BASE"})
  for tree in "${bases[@]}" "$PWD"; do
    name=kernels$([ "$tree" = "$PWD" ] || echo -base)
    echo "== launch forms: $tree (+$((SECONDS - started)) s)"
    PYTHONPATH=$tree timeout "${KERNEL_TIMEOUT:-240}" "$PYTHON" -P benchmarks/expert_kernels.py --out "$OUT/$name" \
      --variants --forms ${BLOCKS:+--blocks-per-sm $BLOCKS} --budget-s "${KERNEL_BUDGET:-150}" --models $MODELS \
      --formats $FORMATS > "$OUT/$name.txt" 2>&1
    echo "-- rc=$? (+$((SECONDS - started)) s)"
  done
fi
for run in ${POLICIES/none/}; do
  echo "== host time: ${run%%:*} at ${run##*:} (+$((SECONDS - started)) s)" | tee -a "$OUT/host.txt"
  timeout 90 "$PYTHON" benchmarks/profile_host.py --steps 32 --layers 8 --policy "${run%%:*}" \
    --budget "${run##*:}" --top 14 --out "$OUT" >> "$OUT/host.txt" 2>&1
  echo "-- rc=$? (+$((SECONDS - started)) s)"
done
SUITE=${SUITE:-resident,lru,lru-prefetch,static-int4,least-stale-int4,fate,dymoe,dynaexq}
runs=()  # tree|environment
for round in $(seq "${REPEAT:-1}"); do
  for tree in ${BASE:+"$BASE"} "$PWD"; do
    for env in ${ENVS:--}; do runs+=("$tree|$env"); done
  done
done
round=0
[ "$SUITE" = none ] && runs=()
for run in "${runs[@]}"; do
  round=$((round + 1))
  tree=${run%%|*} env=${run#*|}
  name=e2e${BASE:+-$([ "$tree" = "$PWD" ] && echo this || echo base)}$([ "$env" = - ] || echo "-${env//[^A-Za-z0-9]/_}")
  name=$name$([ "${#runs[@]}" -gt 1 ] && echo "-$round")
  echo "== $name: $tree ${env/#-/} (+$((SECONDS - started)) s)"
  env ${env/#-/} PYTHONPATH=$tree timeout 200 "$PYTHON" -P -m dymoe bench --model synthetic:qwen3-30b-a3b --layers 8 \
    --policies "$SUITE" --device-memory 25% --prompt-len 32 --gen-len 64 --routing skewed --no-progress \
    --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  echo "-- rc=$? (+$((SECONDS - started)) s)"
done
shopt -s nullglob
[ -f "$OUT/check.txt" ] && tail -n 1 "$OUT/check.txt"
for f in "$OUT"/kernels*.txt; do
  echo "== $f"; grep -E "^variant" "$f" | sed -E 's/^variant +//; s/ +split n[^ ]+ k[^ ]+ w[0-9] s[0-9] slices [0-9/]+//' | cut -c1-110
done
[ -f "$OUT/host.txt" ] && grep -E -A5 "^== host time|host us per MoE layer" "$OUT/host.txt" | grep -v "^--"
for f in "$OUT"/e2e*.txt; do echo "== $f"; grep -E "^(preset|[a-z0-9-]+(@| ))" "$f" | cut -c1-150; done
