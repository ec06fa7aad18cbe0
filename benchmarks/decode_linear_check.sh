#!/usr/bin/env bash
# A decode token's dense projections and router through linear_decode on a GPU, in one device call
# (< 10 minutes):
#
#   OUT=out bash benchmarks/decode_linear_check.sh
#
# 1. GPU tests that decode whole models (mapped decode, fused decode kernels, the engine) and
#    benchmarks/check_dense_kernels.py (KERNEL_CHECK=1: benchmarks/check_decode_kernels.py --quick too);
# 2. benchmarks/decode_linear.py: its checks, and linear_decode against cuBLAS per shape (with
#    SWEEP="shape names", a grid of cuts on those shapes; with RANKED=1, again under
#    DYMOE_ROUTER_TOPK=ranked, the routers' top-k ranked at once);
# 3. end to end (`dymoe bench`, synthetic MODEL (default qwen3-30b-a3b), 8 layers, 25%, 64 tokens;
#    SUITE=...): with BASE=DIR (another revision's dymoe/ package: `git archive REV dymoe | tar -x -C
#    bench-base`, run with its defaults) that one first, then this tree with
#    DYMOE_DECODE_LINEAR=cublas and with the default (RANKED=1: and with DYMOE_ROUTER_TOPK=ranked),
#    alternated REPEAT times (default 2);
# 4. benchmarks/profile_decode.py --graphs of the resident step, with each setting.
# STAGES="1 2 3 4" picks stages. Logs under $OUT; a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-1 2 3 4}
SUITE=${SUITE:-resident,static-int4}
MODEL=${MODEL:-qwen3-30b-a3b}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
started=$SECONDS
stage() { [[ " $STAGES " == *" $1 "* ]]; }
if stage 1; then
  echo "== GPU tests (+$((SECONDS - started)) s)"
  timeout 240 "$PYTHON" -m pytest -q tests/runtime/test_mapped.py tests/runtime/test_kernels_decode.py \
    tests/models/test_decode_graphs.py tests/engine/test_engine_runtime.py > "$OUT/tests.txt" 2>&1
  echo "-- rc=$? (+$((SECONDS - started)) s)"
  timeout 120 "$PYTHON" benchmarks/check_dense_kernels.py > "$OUT/dense_check.txt" 2>&1
  if [ -n "${KERNEL_CHECK:-}" ]; then
    timeout 200 "$PYTHON" benchmarks/check_decode_kernels.py --quick > "$OUT/decode_kernels_check.txt" 2>&1
    echo "-- check_decode_kernels rc=$? (+$((SECONDS - started)) s)"
  fi
fi
if stage 2; then
  echo "== decode_linear (+$((SECONDS - started)) s)"
  timeout 300 "$PYTHON" benchmarks/decode_linear.py --out "$OUT" > "$OUT/decode_linear.txt" 2>&1
  echo "-- rc=$? (+$((SECONDS - started)) s)"
  if [ -n "${RANKED:-}" ]; then
    DYMOE_ROUTER_TOPK=ranked timeout 300 "$PYTHON" benchmarks/decode_linear.py --out "$OUT/ranked" \
      > "$OUT/decode_linear_ranked.txt" 2>&1
    echo "-- ranked rc=$? (+$((SECONDS - started)) s)"
  fi
  if [ -n "${SWEEP:-}" ]; then
    timeout 240 "$PYTHON" benchmarks/decode_linear.py --out "$OUT/sweep" --sweep --shapes $SWEEP \
      > "$OUT/decode_linear_sweep.txt" 2>&1
    echo "-- sweep rc=$? (+$((SECONDS - started)) s)"
  fi
fi
if stage 3; then
  for round in $(seq "${REPEAT:-2}"); do
    for setting in ${BASE:+base} cublas triton ${RANKED:+ranked}; do
      name=e2e-$setting-$round
      tree=$([ "$setting" = base ] && echo "$BASE" || echo "$PWD")
      echo "== $name (+$((SECONDS - started)) s)"
      topk=$([ "$setting" = ranked ] && echo ranked || echo rounds)
      linear=$([ "$setting" = cublas ] && echo cublas || echo triton)  # (base: its own default)
      PYTHONPATH=$tree DYMOE_DECODE_LINEAR=$linear DYMOE_ROUTER_TOPK=$topk timeout 150 "$PYTHON" -P -m dymoe bench \
        --model "synthetic:$MODEL" --layers 8 --policies "$SUITE" --device-memory 25% --prompt-len 32 --gen-len 64 \
        --routing skewed --no-progress --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
      echo "-- rc=$? (+$((SECONDS - started)) s)"
    done
  done
fi
if stage 4; then
  for setting in cublas triton; do
    echo "== profile $setting (+$((SECONDS - started)) s)"
    DYMOE_DECODE_LINEAR=$setting timeout 120 "$PYTHON" benchmarks/profile_decode.py --policy resident --budget 1.0 \
      --graphs --steps 8 --out "$OUT/profile-$setting" > "$OUT/profile_$setting.txt" 2>&1
  done
fi
echo "== summary (+$((SECONDS - started)) s)"
[ -f "$OUT/tests.txt" ] && tail -n 3 "$OUT/tests.txt"
[ -f "$OUT/dense_check.txt" ] && tail -n 2 "$OUT/dense_check.txt"
[ -f "$OUT/decode_kernels_check.txt" ] && tail -n 3 "$OUT/decode_kernels_check.txt"
[ -f "$OUT/decode_linear.txt" ] && cut -c1-150 "$OUT/decode_linear.txt"
[ -f "$OUT/decode_linear_ranked.txt" ] && echo "-- ranked top-k" \
  && grep router "$OUT/decode_linear_ranked.txt" | cut -c1-150
[ -f "$OUT/decode_linear_sweep.txt" ] && grep -o "^.\{32\}.*best.*" "$OUT/decode_linear_sweep.txt"
shopt -s nullglob
for f in "$OUT"/e2e*.txt; do
  echo "-- $f"; grep -E "^(preset|[a-z0-9-]+(@| ))" "$f" | cut -c1-120
done
for f in "$OUT"/profile_*.txt; do
  echo "-- $f"; grep -E "^resident|nvjet|linear_decode|route_kernel|splitK" "$f" | cut -c1-62,150-200
done
