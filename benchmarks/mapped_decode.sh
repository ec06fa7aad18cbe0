#!/usr/bin/env bash
# The mapped decode (DYMOE_MAPPED_DECODE, dymoe/runtime/mapped.py: one CUDA graph per offloaded decode
# step, experts read wherever they lie, the cache kept a step behind) against the segmented decode
# (one host synchronisation per MoE layer), side by side in one device call:
#
#   OUT=out bash benchmarks/mapped_decode.sh
#
# `dymoe bench` on the synthetic Qwen3-30B-A3B shape (8 layers, skewed routing, 32-token prompt, GEN
# generated tokens), each POINTS entry (policy:budget) with DYMOE_MAPPED_DECODE=0 then 1, the whole
# list REPEAT times (alternated: the first run of a call tends to be slower). BASE=DIR runs a copy of
# another revision's package instead of this tree's (as benchmarks/decode_host_check.sh). Logs and
# JSON per run in $OUT; a table of TPOT, hit rate, link bytes per token and the decode steps the
# mapped decode ran (- where the runtime has none) last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PYTHON=${PYTHON:-python}
POINTS=${POINTS:-static-int4:25% static-int4:15% lru:100% lru:50%}
GEN=${GEN:-64}
mkdir -p "$OUT"
export PYTHONPATH=${BASE:-$PWD}${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
started=$SECONDS
for round in $(seq "${REPEAT:-2}"); do
  for point in $POINTS; do
    for setting in 0 1; do
      name="${point%%:*}-${point##*:}-mapped$setting-$round"
      name=${name//%/pct}
      echo "== $name (+$((SECONDS - started)) s)"
      DYMOE_MAPPED_DECODE=$setting timeout 150 "$PYTHON" -P -m dymoe bench --model synthetic:qwen3-30b-a3b --layers 8 \
        --policies "${point%%:*}" --device-memory "${point##*:}" --prompt-len 32 --gen-len "$GEN" --routing skewed \
        --no-progress --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 || echo "-- failed: see $OUT/$name.txt"
    done
  done
done
"$PYTHON" - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

print(f"{'preset':<18}{'budget':>7}{'mapped':>7}{'round':>6}{'TPOT ms':>9}{'mean ms':>9}{'hit %':>7}{'H2D MiB/tok':>12}"
      f"{'mapped steps':>13}")
runs = []
for path in Path(sys.argv[1]).glob("*-mapped*-*.json"):
    report = json.loads(path.read_text())
    setting = report["environment"]["settings"].get("DYMOE_MAPPED_DECODE", "auto")  # (unset: the default)
    for row in report["rows"]:
        runs.append((row["preset"], row["budget"], setting, path.stem.rsplit("-", 1)[1], row))
def cell(value, scale=1.0, digits=2):
    return "-" if value is None else f"{scale * value:.{digits}f}"


for preset, budget, setting, rnd, row in sorted(runs, key=lambda r: tuple(map(str, r[:4]))):
    print(f"{preset:<18}{budget or '-':>7}{setting:>7}{rnd:>6}{cell(row.get('tpot_median_s'), 1e3):>9}"
          f"{cell(row.get('tpot_mean_s'), 1e3):>9}{cell(row.get('hit_rate'), 100, 1):>7}"
          f"{cell(row.get('h2d_bytes_per_token'), 2**-20):>12}{row.get('mapped_decode_steps', '-'):>13}")
PY
