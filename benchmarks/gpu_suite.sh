#!/usr/bin/env bash
# The published benchmark table in one device call (under 10 minutes on the lent H100):
#
#   bash benchmarks/gpu_suite.sh            # writes under $OUT (default: bench-out/)
#
# Every preset, two budgets (25% and 50% of the bf16 expert bytes), two synthetic real shapes
# (Qwen3-30B-A3B cut to 8 layers, Mixtral-8x7B cut to 4), each in one `dymoe bench` process (resident
# first, the others teacher-forced with its tokens); then the replay of the recorded Qwen3 trace
# through the simulator (oracle / Belady hit rate and the floor per link), and the transformers +
# accelerate CPU-offload baseline for the Qwen3 shape. Tables go to stdout and $OUT/*.txt, full
# reports to $OUT/*.json. Knobs (environment): POLICIES, GEN_LEN (128), MIXTRAL_GEN_LEN (64: a Mixtral expert
# is 336 MiB, so on-demand decode moves ~2.6 GiB a token), PROMPTS (32,512,2048), PYTHON, ROUTING (skewed:
# the synthetic models route with the labelled skewed, local stand-in for a trained router of docs/routing.md;
# ROUTING=uniform gives the random routers' own near-uniform routing, the earlier tables; any
# `dymoe bench --routing` value works, e.g. skewed:s=1.2,r=0.2). Every table and trace says which it was.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
GEN_LEN=${GEN_LEN:-128}
MIXTRAL_GEN_LEN=${MIXTRAL_GEN_LEN:-64}
PROMPTS=${PROMPTS:-32,512,2048}
POLICIES=${POLICIES:-resident,on-demand,on-demand-prefetch,lru,lru-prefetch,least-stale,static-int4,least-stale-int4,fate,dymoe,dynaexq}
PARTS=${PARTS:-qwen3 mixtral accelerate}  # a subset runs in a shorter device call
ROUTING=${ROUTING:-skewed}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv \
  | tee "$OUT/gpu.txt" || true

started=$SECONDS
bench() {  # name, then dymoe bench arguments
  local name=$1; shift
  echo "== dymoe bench $* ($(date -u +%FT%TZ))"
  "$PYTHON" -m dymoe bench --policies "$POLICIES" --device-memory 25%,50% --prompt-len "$PROMPTS" \
    --routing "$ROUTING" --no-progress --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"
  echo "-- $name done at +$((SECONDS - started)) s"
}

if [[ " $PARTS " == *" qwen3 "* ]]; then
  bench qwen3-30b-a3b-8l --model synthetic:qwen3-30b-a3b --layers 8 --gen-len "$GEN_LEN" \
    --record-trace "$OUT/qwen3-30b-a3b-8l.trace"
  # the oracle (Belady) hit rate and the modelled floor per link, on the very routing just measured
  "$PYTHON" -m dymoe simulate "$OUT/qwen3-30b-a3b-8l.trace" --policy lru,lfu,least-stale --device-memory 25% \
    | tee "$OUT/qwen3-30b-a3b-8l.simulate-25.txt"
  "$PYTHON" -m dymoe simulate "$OUT/qwen3-30b-a3b-8l.trace" --policy lru,lfu,least-stale --device-memory 50% \
    | tee "$OUT/qwen3-30b-a3b-8l.simulate-50.txt"
fi
if [[ " $PARTS " == *" mixtral "* ]]; then
  bench mixtral-8x7b-4l --model synthetic:mixtral-8x7b --layers 4 --gen-len "$MIXTRAL_GEN_LEN"
fi

# peer baseline: transformers + accelerate offloading (device_map / max_memory), same shape and budgets;
# it routes with transformers' own random routers (near uniform) whatever ROUTING says
if [[ " $PARTS " != *" accelerate "* ]]; then
  echo "accelerate baseline not in PARTS"
elif "$PYTHON" -c "import accelerate, transformers" 2>/dev/null; then
  echo "== transformers + accelerate CPU offload ($(date -u +%FT%TZ))"
  left=$((570 - (SECONDS - started))); [ "$left" -gt 30 ] || left=30
  timeout "$left" "$PYTHON" benchmarks/accelerate_offload.py --out "$OUT" \
    --layers 8 --budgets 25,50 --prompt-len "$PROMPTS" --gen-len 8 | tee "$OUT/accelerate.txt" \
    || echo "accelerate baseline did not finish (status $?)"
else
  echo "accelerate or transformers not installed: no peer baseline"
fi
echo "suite done in $((SECONDS - started)) s; results in $OUT"
