#!/usr/bin/env bash
# Load benchmark of the serve example (SmolLM2-135M Q4_1) on loopback, and optionally llama.cpp's
# llama-server on the same model, driven by the same load generator (bench/serve/load.py) in the same run.
#
#   bench/serve/run.sh                                          # our server only
#   LLAMA_SERVER=/work/llamacpp-build/bin/llama-server bench/serve/run.sh
#
# llama-server is built OUTSIDE the project like llama-bench (see bench/llama/run.sh; target llama-server).
# Both get the same threads (THREADS, default 2) and as many slots as the largest concurrency level; both
# run side by side and take turns at every level, after warm-up requests, so load from elsewhere hits both.
# Bounded: every level sends concurrency × REQS requests of MAX_TOKENS tokens; servers are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-.deps/models/SmolLM2-135M-Instruct.Q4_1.gguf}
LEVELS=${LEVELS:-1,4,16,64}
MAX_TOKENS=${MAX_TOKENS:-32}
REQS=${REQS:-2}
THREADS=${THREADS:-2}
TP=${TP:-1}
DP=${DP:-1}
# PROCS=1: our ranks as processes (--nprocs TP, needs DP=1) instead of threads. SERVE_ARGS: more flags for
# our server (e.g. --int16).
PROCS=${PROCS:-}
[ -f "$MODEL" ] || { echo "model $MODEL is absent (scripts/setup.sh fetches it)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --example serve >&2
BIN="$CARGO_TARGET_DIR/release/examples/serve"
MAXC=$(python3 -c "print(max(int(x) for x in '$LEVELS'.split(',')))")
LOG=$(mktemp)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$LOG"; }
trap cleanup EXIT

# Ours: tp × dp ranks sharing THREADS threads.
PROC_ARGS=()
if [ -n "$PROCS" ]; then PROC_ARGS=(--nprocs "$TP"); fi
"$BIN" --model "$MODEL" --model-name smollm2 --tp "$TP" --dp "$DP" --threads $(( THREADS / (TP * DP) > 0 ? THREADS / (TP * DP) : 1 )) \
  --max-batch "$MAXC" --port 0 "${PROC_ARGS[@]}" ${SERVE_ARGS:-} > "$LOG" 2>/dev/null &
pids+=($!)
for _ in $(seq 600); do grep -q "listening on" "$LOG" && break; sleep 0.1; done
URL=$(sed -n 's/^listening on \(http[^ ]*\).*/\1/p' "$LOG")
[ -n "$URL" ] || { echo "our server did not start" >&2; exit 1; }
OURS="nccl-llm tp$TP dp$DP${PROCS:+ processes}${SERVE_ARGS:+ $SERVE_ARGS}"
TARGETS=(--url "$OURS=$URL")

if [ -n "${LLAMA_SERVER:-}" ]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -t "$THREADS" -np "$MAXC" -cb \
    -c $(( MAXC * 256 )) > /dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  TARGETS+=(--url "llama-server=http://127.0.0.1:$PORT")
fi
# Both servers stay up (idle servers cost nothing) and take turns at every level.
uptime >&2
python3 bench/serve/load.py "${TARGETS[@]}" --model smollm2 --levels "$LEVELS" --max-tokens "$MAX_TOKENS" \
  --requests-per-client "$REQS" --table
uptime >&2
