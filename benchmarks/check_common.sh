# Sourced by the GPU check scripts (decode_linear_check.sh, dense_decode_check.sh,
# router_packing_check.sh) after they set STAGES' default: the settings they share, and the steps
# they run alike. Works from the repository root; OUT (default bench-out) becomes absolute.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python}
SUITE=${SUITE:-resident,static-int4}
MODEL=${MODEL:-qwen3-30b-a3b}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
started=$SECONDS

stage() { [[ " $STAGES " == *" $1 "* ]]; }

elapsed() { echo "(+$((SECONDS - started)) s)"; }

# gpu_tests FILE...: pytest on those files into $OUT/tests.txt (pyproject's -q: progress and a count line)
gpu_tests() {
  echo "== GPU tests $(elapsed)"
  timeout 240 "$PYTHON" -m pytest "$@" > "$OUT/tests.txt" 2>&1
  echo "-- rc=$? $(elapsed)"
}

# e2e NAME TREE [VAR=VALUE...]: `dymoe bench` of the package at TREE (synthetic MODEL, 8 layers,
# SUITE at 25%, a 32-token prompt, 64 tokens, skewed routing) into $OUT/NAME.txt and .json
e2e() {
  local name=$1 tree=$2
  shift 2
  echo "== $name $(elapsed)"
  env PYTHONPATH="$tree" "$@" timeout 150 "$PYTHON" -P -m dymoe bench --model "synthetic:$MODEL" --layers 8 \
    --policies "$SUITE" --device-memory 25% --prompt-len 32 --gen-len 64 --routing skewed --no-progress \
    --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  echo "-- rc=$? $(elapsed)"
}

# bench_summary FILE...: each dymoe bench table's preset rows
bench_summary() {
  local f
  for f in "$@"; do
    [ -f "$f" ] || continue
    echo "-- $f"; grep -E "^(preset|[a-z0-9-]+(@| ))" "$f" | cut -c1-120
  done
}
