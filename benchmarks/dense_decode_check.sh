#!/usr/bin/env bash
# The graph decode's dense kernels and the start-up warm-up on a GPU, in one device call (< 10 minutes):
#
#   OUT=out BASE=bench-base bash benchmarks/dense_decode_check.sh
#
# 1. the GPU tests of the dense decode kernels (qkv_decode, split attention), the mapped decode, the
#    expert kernels and the engine (warm-up), and benchmarks/check_dense_kernels.py;
# 2. end to end (`dymoe bench`, synthetic Qwen3-30B-A3B shape, 8 layers, 25%, 64 tokens; SUITE=...):
#    with BASE=DIR (another revision's dymoe/ package: `git archive REV dymoe | tar -x -C bench-base`)
#    base and this tree alternated REPEAT times (default 2);
# 3. benchmarks/compile_log.py on the demo model (dynaexq at 6 MiB): without warm-up on an empty
#    Triton cache, then a warm one, then with warm-up on an empty and a warm cache;
# 4. benchmarks/decode_attention.py (split attention against SDPA, every shape incl. GPT-OSS);
# 5. GPT-OSS-20B's shape, 4 layers, resident: DYMOE_DECODE_ATTENTION=sdpa against the default.
# STAGES="1 2 3 4 5" picks stages. Logs under $OUT; a summary last.
STAGES=${STAGES:-1 2 3 4 5}
MODEL=qwen3-30b-a3b
source "$(dirname "$0")/check_common.sh"
if stage 1; then
  gpu_tests tests/models/test_qkv_decode.py tests/models/test_decode_attention.py tests/runtime/test_mapped.py \
    tests/quant/test_kernels.py tests/engine/test_engine_runtime.py
  timeout 120 "$PYTHON" benchmarks/check_dense_kernels.py > "$OUT/dense_check.txt" 2>&1
fi
if stage 2; then
  for round in $(seq "${REPEAT:-2}"); do
    for tree in ${BASE:+"$BASE"} "$PWD"; do
      e2e "e2e-$([ "$tree" = "$PWD" ] && echo this || echo base)-$round" "$tree"
    done
  done
fi
if stage 3; then
  i=0
  for flags in "--no-warmup --cold" "--no-warmup" "--cold" ""; do
    i=$((i + 1))
    echo "== compile log $i: $flags $(elapsed)" | tee -a "$OUT/compile_log.txt"
    timeout 120 "$PYTHON" benchmarks/compile_log.py -m models/dymoe-demo-moe --policy dynaexq --device-memory 6MiB \
      -n 64 --no-progress $flags --out "$OUT/compile$i" >> "$OUT/compile_log.txt" 2>&1
  done
fi
if stage 4; then
  echo "== decode attention $(elapsed)"
  timeout 180 "$PYTHON" benchmarks/decode_attention.py --out "$OUT/attention" > "$OUT/attention.txt" 2>&1
fi
if stage 5; then
  for setting in sdpa split; do
    echo "== gpt-oss $setting $(elapsed)"
    DYMOE_DECODE_ATTENTION=$setting timeout 150 "$PYTHON" -m dymoe bench --model synthetic:gpt-oss-20b --layers 4 \
      --policies resident --prompt-len 32,2048 --gen-len 64 --no-progress --json "$OUT/gpt_oss_$setting.json" \
      > "$OUT/gpt_oss_$setting.txt" 2>&1
  done
fi
echo "== summary $(elapsed)"
[ -f "$OUT/tests.txt" ] && tail -n 3 "$OUT/tests.txt"
[ -f "$OUT/dense_check.txt" ] && grep -E "add_norm|dense kernels" "$OUT/dense_check.txt"
bench_summary "$OUT"/e2e*.txt "$OUT"/gpt_oss_*.txt
[ -f "$OUT/compile_log.txt" ] && grep -E "^(==|start-up|token|load|decode|median)" "$OUT/compile_log.txt" | cut -c1-160
[ -f "$OUT/attention.txt" ] && tail -n 16 "$OUT/attention.txt"
