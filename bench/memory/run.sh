#!/usr/bin/env bash
# Peak host memory of a tensor-parallel load against the rank's shard, on a generated Llama-shaped checkpoint.
#
#   bench/memory/run.sh                      # Llama-3-8B shape, 4 layers (3.85 GB bf16), TP 1, 2 and 4
#   LAYERS=2 SHAPE=llama3-70b TPS="4" bench/memory/run.sh
#   BIN=/path/to/other/tp_llama bench/memory/run.sh   # the same measurement for another build (an A/B)
#
# Writes the checkpoint with `llm/examples/gen_checkpoint.rs` (once, into $DIR), then for each TP degree runs
# `tp_llama --nprocs TP` (one process per rank, 3 prompt ids, 2 new tokens) under GNU time and prints the
# largest process's peak resident set (ru_maxrss: the waited-for rank processes included) against one rank's
# f32 shard as the config implies it (the safetensors are bf16; the CPU engine keeps f32). The ratio is the
# figure to report: absolute sizes follow the shape.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHAPE=${SHAPE:-llama3-8b}
LAYERS=${LAYERS:-4}
TPS=${TPS:-1 2 4}
DIR=${DIR:-${TMPDIR:-/tmp}/nccl-rs-gen-$SHAPE-$LAYERS}
BIN=${BIN:-target/release/examples/tp_llama}
[[ -x /usr/bin/time ]] || { echo "bench/memory: needs GNU time at /usr/bin/time" >&2; exit 1; }
cargo build --release -q -p nccl-llm --example gen_checkpoint
[[ "$BIN" != target/release/examples/tp_llama ]] || cargo build --release -q --example tp_llama
[[ -f "$DIR/config.json" ]] || target/release/examples/gen_checkpoint --shape "$SHAPE" --layers "$LAYERS" --out "$DIR"
echo "checkpoint $DIR ($(du -sh "$DIR" | cut -f1)), binary $BIN"
printf '%-4s %14s %14s %8s\n' tp shard_f32_GB peak_rss_GB ratio
for tp in $TPS; do
  log=$(mktemp)
  /usr/bin/time -f "maxrss_kb %M" "$BIN" --model "$DIR" --prompt-ids 1,2,3 --max-new-tokens 2 --ignore-eos \
    --tp "$tp" --nprocs "$tp" > "$log" 2>&1 || { cat "$log" >&2; exit 1; }
  rss_kb=$(awk '/^maxrss_kb/ {print $2}' "$log")
  python3 - "$DIR/config.json" "$tp" "$rss_kb" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); tp = int(sys.argv[2]); rss = int(sys.argv[3]) * 1024
h, f, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
hd = c.get("head_dim", h // c["num_attention_heads"]); q = c["num_attention_heads"] * hd
kv = c["num_key_value_heads"] * hd
# Rank 0's shard: its heads' rows of q/k/v and columns of o, its MLP rows/columns, its vocabulary rows of
# the embedding and the head; norms replicated.
layer = (q // tp) * h * 2 + (kv // tp) * h * 2 + 3 * (f // tp) * h + 2 * h
shard = 4 * (L * layer + 2 * (-(-v // tp)) * h + h)
print(f"{tp:<4} {shard / 1e9:14.3f} {rss / 1e9:14.3f} {rss / shard:8.3f}")
PY
  rm -f "$log"
done
