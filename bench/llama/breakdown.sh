#!/usr/bin/env bash
# Where the time goes per decoded token: `perf record` of tp_llama (SmolLM2 Q4_1, 8-token prompt, TOKENS
# decoded tokens, so decode dominates) in three layouts (TP=1 with 1 thread, TP=1 with 2 compute threads, TP=2
# with 1 thread per rank), then the samples grouped by
# what the symbol does (bench/llama/breakdown.py). Shares of all samples of the run, loading included (the
# "load and prefill" row), so read the decode rows against each other.
#
#   bench/llama/breakdown.sh                   # exact decode
#   FLAG=--int8 bench/llama/breakdown.sh       # or --int16
#
# Needs perf (Debian's linux-perf) with user-space sampling allowed (perf_event_paranoid <= 2 or root).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-.deps/models/SmolLM2-135M-Instruct.Q4_1.gguf}
TOKENS=${TOKENS:-256}
[ -f "$MODEL" ] || { echo "model $MODEL is absent (scripts/setup.sh fetches it)" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
# BIN=path/to/tp_llama: profile that binary instead of building this tree's (before/after two commits).
if [ -z "${BIN:-}" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
  cargo build --release --example tp_llama >&2
  BIN="$CARGO_TARGET_DIR/release/examples/tp_llama"
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# name:tp:threads per rank (the names sort in column order for breakdown.py)
for L in tp1t1:1:1 tp1t2:1:2 tp2t1:2:1; do
  IFS=: read -r NAME TP THR <<< "$L"
  perf record -q -F 1999 -o "$OUT/$NAME.data" "$BIN" --model "$MODEL" --tp "$TP" --threads "$THR" \
    --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens "$TOKENS" --ignore-eos --json ${FLAG:-} 2>/dev/null \
    | tail -1 > "$OUT/$NAME.json"
  perf report -q -i "$OUT/$NAME.data" --no-children --sort symbol 2>/dev/null > "$OUT/$NAME.txt"
done
python3 bench/llama/breakdown.py "$OUT"
