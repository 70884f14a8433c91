#!/usr/bin/env bash
# Where the time goes per decoded token: `perf record` of tp_llama (SmolLM2 Q4_1, 8-token prompt, TOKENS
# decoded tokens, so decode dominates) at TP=1 and TP=2 with 1 thread per rank, then the samples grouped by
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
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --example tp_llama >&2
BIN="$CARGO_TARGET_DIR/release/examples/tp_llama"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for TP in 1 2; do
  perf record -q -F 1999 -o "$OUT/tp$TP.data" "$BIN" --model "$MODEL" --tp "$TP" --threads 1 \
    --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens "$TOKENS" --ignore-eos --json ${FLAG:-} 2>/dev/null \
    | tail -1 > "$OUT/tp$TP.json"
  perf report -q -i "$OUT/tp$TP.data" --no-children --sort symbol 2>/dev/null > "$OUT/tp$TP.txt"
done
python3 bench/llama/breakdown.py "$OUT"
