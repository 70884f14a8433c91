#!/usr/bin/env bash
# Speed of the engine on SmolLM2-135M (Q4_1 GGUF) at TP=1 and TP=2 on this machine, next to llama.cpp on
# the same file and thread counts, and the physical limit (memory read bandwidth ÷ bytes read per token).
#
#   bench/llama/run.sh                     # engine only (+ bandwidth)
#   LLAMA_BENCH=/work/llamacpp-build/bin/llama-bench bench/llama/run.sh
#
# llama.cpp is built OUTSIDE the project (never commit it): the PyPI sdist of llama-cpp-python vendors it:
#   pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcp && tar xzf /tmp/lcp/*.tar.gz -C /tmp/lcp
#   cmake -S /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp -B /work/llamacpp-build -DCMAKE_BUILD_TYPE=Release \
#     -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF && cmake --build /work/llamacpp-build --target llama-bench -j2
#
# Same workload on both sides: a 64-token prompt (prefill), then 64 generated tokens (decode), best of
# $REPS runs. Results go to bench/llama/results.json (git-ignored target: print only) and stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-.deps/models/SmolLM2-135M-Instruct.Q4_1.gguf}
REPS=${REPS:-3}
OUT=${OUT:-/tmp/llama_bench_results}
mkdir -p "$OUT"
[ -f "$MODEL" ] || { echo "model $MODEL is absent (scripts/setup.sh fetches it)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --example tp_llama >&2
BIN="$CARGO_TARGET_DIR/release/examples/tp_llama"
IDS=$(python3 -c 'print(",".join(str(1000 + 37 * i % 40000) for i in range(64)))')

# tp:threads-per-rank; total threads = tp × threads, compared with llama.cpp -t <total>.
for CFG in 1:1 1:2 2:1; do
  TP=${CFG%:*}; TH=${CFG#*:}
  for r in $(seq "$REPS"); do
    "$BIN" --model "$MODEL" --tp "$TP" --threads "$TH" --prompt-ids "$IDS" --max-new-tokens 65 --ignore-eos \
      --json 2>/dev/null | tail -1 > "$OUT/engine_tp${TP}_th${TH}_$r.json"
  done
done

if [ -n "${LLAMA_BENCH:-}" ]; then
  "$LLAMA_BENCH" -m "$MODEL" -t 1,2 -p 64 -n 64 -r "$REPS" -o json > "$OUT/llamacpp.json" 2>/dev/null
fi

gcc -O3 -march=native -fopenmp bench/llama/membw.c -o "$OUT/membw"
OMP_NUM_THREADS=2 "$OUT/membw" 1024 5 > "$OUT/membw.jsonl"

python3 - "$OUT" "$MODEL" <<'PY'
import glob, json, os, sys
out, model = sys.argv[1], sys.argv[2]
rows = {}
for tp, th in ((1, 1), (1, 2), (2, 1)):
    runs = [json.load(open(f)) for f in glob.glob(f"{out}/engine_tp{tp}_th{th}_*.json") if os.path.getsize(f)]
    rows[(tp, th)] = (max(r["prefill_tokens_per_s"] for r in runs), max(r["decode_tokens_per_s"] for r in runs))
lc = {}
if os.path.exists(f"{out}/llamacpp.json"):
    for r in json.load(open(f"{out}/llamacpp.json")):
        kind = "prefill" if r["n_prompt"] > 0 else "decode"
        lc[(r["n_threads"], kind)] = r["avg_ts"]
bw = {json.loads(l)["threads"]: json.loads(l)["read_GBps"] for l in open(f"{out}/membw.jsonl")}
# Bytes read per decoded token by the engine: every weight matrix once, f32 (135M params incl. the tied
# embedding used as LM head); llama.cpp reads the Q4_1 blocks (the file size is a close upper bound).
cfg = dict(h=576, f=1536, L=30, v=49152, q=576, kv=192)
params = cfg["L"] * (cfg["h"] * (cfg["q"] + 2 * cfg["kv"]) + cfg["q"] * cfg["h"] + 3 * cfg["h"] * cfg["f"]) + cfg["v"] * cfg["h"]
f32_bytes = params * 4
q_bytes = os.path.getsize(model)
print(f"| engine layout | threads (llama.cpp -t) | engine prefill tok/s | llama.cpp prefill tok/s | ratio | engine decode tok/s | llama.cpp decode tok/s | ratio | decode limit f32 (engine) | decode limit Q4_1 (llama.cpp) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (tp, th), (p, d) in rows.items():
    t = tp * th
    lp, ld = lc.get((t, "prefill")), lc.get((t, "decode"))
    fmt = lambda x: f"{x:.1f}" if x else "n/a"
    ratio = lambda a, b: f"{a / b:.2f}" if b else "n/a"
    print(f"| TP={tp}, {th} thread(s)/rank | {t} | {p:.1f} | {fmt(lp)} | {ratio(p, lp)} | {d:.1f} | {fmt(ld)} | {ratio(d, ld)} | "
          f"{bw[t] * 1e9 / f32_bytes:.1f} | {bw[t] * 1e9 / q_bytes:.1f} |")
print(f"\nread bandwidth: {', '.join(f'{t} thread(s) {g:.2f} GB/s' for t, g in sorted(bw.items()))}; "
      f"bytes per token: engine {f32_bytes / 1e6:.0f} MB (f32), llama.cpp ≤ {q_bytes / 1e6:.0f} MB (Q4_1 file)")
PY
