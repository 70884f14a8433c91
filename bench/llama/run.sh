#!/usr/bin/env bash
# Speed of the engine on SmolLM2-135M (Q4_1 GGUF) at TP=1 and TP=2 on this machine, next to llama.cpp on
# the same file and thread counts, and the physical limit (memory read bandwidth ÷ bytes read per token).
#
#   bench/llama/run.sh                     # engine only (+ bandwidth)
#   LLAMA_BENCH=/work/llamacpp-build/bin/llama-bench bench/llama/run.sh
#
# llama.cpp is built OUTSIDE the project (never commit it): the PyPI sdist of llama-cpp-python vendors it:
#   (not `pip download --no-binary :all:`, which builds cmake from source just to read the sdist's metadata)
#   url=$(curl -s https://pypi.org/simple/llama-cpp-python/ | grep -o 'https://[^"#]*llama_cpp_python-0.3.36.tar.gz' | head -1)
#   mkdir -p /tmp/lcp && curl -sL "$url" | tar xz -C /tmp/lcp
#   pip install --target /tmp/cmake cmake && export PATH=/tmp/cmake/bin:$PATH PYTHONPATH=/tmp/cmake
#   cmake -S /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp -B /work/llamacpp-build -DCMAKE_BUILD_TYPE=Release \
#     -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF && cmake --build /work/llamacpp-build --target llama-bench -j2
#
# Same workload on both sides: a 64-token prompt (prefill), then 64 generated tokens (decode), best of
# $REPS runs. The engine runs three decode paths: exact f32 (the default), --int16 and --int8 (int16 / int8
# activations, integer dot products); the repetitions are interleaved (rep 1 of every configuration, then rep 2, ...) so
# that a burst of load from elsewhere hits all of them alike. Results go to $OUT and stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-.deps/models/SmolLM2-135M-Instruct.Q4_1.gguf}
REPS=${REPS:-3}
OUT=${OUT:-/tmp/llama_bench_results}
rm -rf "$OUT"
mkdir -p "$OUT"
[ -f "$MODEL" ] || { echo "model $MODEL is absent (scripts/setup.sh fetches it)" >&2; exit 1; }
# BIN=path/to/tp_llama: bench that binary instead of building this tree's (an A/B of two commits).
if [ -z "${BIN:-}" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
  cargo build --release --example tp_llama >&2
  BIN="$CARGO_TARGET_DIR/release/examples/tp_llama"
fi
IDS=$(python3 -c 'print(",".join(str(1000 + 37 * i % 40000) for i in range(64)))')
uptime > "$OUT/uptime_start.txt"

# tp:threads-per-rank; total threads = tp × threads, compared with llama.cpp -t <total>.
for r in $(seq "$REPS"); do
  for CFG in 1:1 1:2 2:1; do
    TP=${CFG%:*}; TH=${CFG#*:}
    for DP in exact int16 int8; do
      FLAG=(); [ "$DP" != exact ] && FLAG=(--"$DP")
      "$BIN" --model "$MODEL" --tp "$TP" --threads "$TH" --prompt-ids "$IDS" --max-new-tokens 65 --ignore-eos \
        --json "${FLAG[@]}" 2>/dev/null | tail -1 > "$OUT/engine_${DP}_tp${TP}_th${TH}_$r.json"
    done
  done
done
uptime > "$OUT/uptime_engine.txt"

if [ -n "${LLAMA_BENCH:-}" ]; then
  "$LLAMA_BENCH" -m "$MODEL" -t 1,2 -p 64 -n 64 -r "$REPS" -o json > "$OUT/llamacpp.json" 2>/dev/null
fi
uptime > "$OUT/uptime_llamacpp.txt"

gcc -O3 -march=native -fopenmp bench/llama/membw.c -o "$OUT/membw"
OMP_NUM_THREADS=2 "$OUT/membw" 1024 5 > "$OUT/membw.jsonl"
uptime > "$OUT/uptime_end.txt"

python3 - "$OUT" "$MODEL" <<'PY'
import glob, json, os, sys
out, model = sys.argv[1], sys.argv[2]
def best(dp, tp, th):
    runs = [json.load(open(f)) for f in glob.glob(f"{out}/engine_{dp}_tp{tp}_th{th}_*.json") if os.path.getsize(f)]
    if not runs:
        return None
    paths = {r.get("decode_path", "exact") for r in runs}
    ids = {tuple(r["generated_ids"]) for r in runs}
    return dict(p=max(r["prefill_tokens_per_s"] for r in runs), d=max(r["decode_tokens_per_s"] for r in runs),
                path="/".join(sorted(paths)), ids=ids, n=len(runs))
lc = {}
if os.path.exists(f"{out}/llamacpp.json"):
    for r in json.load(open(f"{out}/llamacpp.json")):
        kind = "prefill" if r["n_prompt"] > 0 else "decode"
        lc[(r["n_threads"], kind)] = r["avg_ts"]
bw = {json.loads(l)["threads"]: json.loads(l)["read_GBps"] for l in open(f"{out}/membw.jsonl")}
# Bytes of weights read per decoded token. SmolLM2-135M: every layer matrix is Q4_1, the tied embedding (the
# LM head) Q8_0. The engine keeps each block's scales as f32 next to the quants (Q4_1: 16 B of nibbles + 8 B
# = 24 B per 32 weights; Q8_0: 32 + 4 = 36 B), llama.cpp the GGUF blocks (20 B and 34 B).
cfg = dict(h=576, f=1536, L=30, v=49152, q=576, kv=192)
layer = cfg["L"] * (cfg["h"] * (cfg["q"] + 2 * cfg["kv"]) + cfg["q"] * cfg["h"] + 3 * cfg["h"] * cfg["f"])
head = cfg["v"] * cfg["h"]
engine_bytes = layer * 24 / 32 + head * 36 / 32 + cfg["L"] * 2 * cfg["h"] * 4
lc_bytes = layer * 20 / 32 + head * 34 / 32
fmt = lambda x: f"{x:.1f}" if x else "n/a"
ratio = lambda a, b: f"{a / b:.2f}" if a and b else "n/a"
print("| layout | threads in all | prefill exact | llama.cpp prefill | decode exact | decode int16 | decode int8 "
      "| llama.cpp decode | int16 ÷ llama.cpp | int8 ÷ llama.cpp | int16 ÷ exact | int16 ÷ ceiling | int8 ÷ ceiling |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
notes = []
for tp, th in ((1, 1), (1, 2), (2, 1)):
    e, i16, i8 = best("exact", tp, th), best("int16", tp, th), best("int8", tp, th)
    if not e or not i16 or not i8:
        print(f"| TP={tp}, {th}/rank | missing runs |")
        continue
    t = tp * th
    lp, ld = lc.get((t, "prefill")), lc.get((t, "decode"))
    ceil = bw[t] * 1e9 / engine_bytes
    print(f"| TP={tp}, {th} thread(s)/rank | {t} | {e['p']:.1f} | {fmt(lp)} | {e['d']:.1f} | {i16['d']:.1f} | {i8['d']:.1f} | "
          f"{fmt(ld)} | {ratio(i16['d'], ld)} | {ratio(i8['d'], ld)} | {ratio(i16['d'], e['d'])} | "
          f"{i16['d'] / ceil * 100:.0f} % | {i8['d'] / ceil * 100:.0f} % |")
    for name, f in (("int16", i16), ("int8", i8)):
        same = len(e["ids"]) == 1 and e["ids"] == f["ids"]
        notes.append(f"TP={tp} {th} thread(s)/rank {name}: paths {e['path']} / {f['path']}, runs {e['n']}+{f['n']}, "
                     f"64 generated ids identical to the exact path's in every run: {'yes' if same else 'NO'}; "
                     f"prefill {f['p']:.1f} tok/s (exact {e['p']:.1f})")
    notes.append(f"TP={tp} {th} thread(s)/rank: decode ceiling {ceil:.0f} tok/s")
print()
for n in notes:
    print("- " + n)
print(f"- read bandwidth (bench/llama/membw.c): {', '.join(f'{t} thread(s) {g:.2f} GB/s' for t, g in sorted(bw.items()))}; "
      f"weights read per token: engine {engine_bytes / 1e6:.0f} MB, llama.cpp {lc_bytes / 1e6:.0f} MB; "
      f"ceiling = bandwidth ÷ engine bytes")
for f in ("start", "engine", "llamacpp", "end"):  # before the engine, after it, after llama.cpp, after membw
    print(f"- uptime ({f}): {open(f'{out}/uptime_{f}.txt').read().strip()}")
PY
