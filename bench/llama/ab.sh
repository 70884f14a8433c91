#!/usr/bin/env bash
# A/B of two tp_llama binaries (two commits' `cargo build --release --example tp_llama`, copied aside):
# REPS interleaved pairs per layout (A, then B, then A ...), so that load from elsewhere hits both alike;
# prints each run's prefill and decode tok/s and a hash of its generated ids, then per layout the medians,
# B ÷ A, the median of the paired ratios and how many pairs B won.
#
#   A=/tmp/tp_llama.before B=/tmp/tp_llama.after REPS=12 bench/llama/ab.sh
#   CFGS="1:2:--int8 2:1:--int8" ...     # tp:threads-per-rank:flag (flag empty = exact)
#
# Same workload as bench/llama/run.sh: a 64-token prompt, then 64 decoded tokens.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-.deps/models/SmolLM2-135M-Instruct.Q4_1.gguf}
REPS=${REPS:-12}
CFGS=${CFGS:-"1:2:--int8"}
: "${A:?A=path of the first tp_llama}" "${B:?B=path of the second tp_llama}"
[ -f "$MODEL" ] || { echo "model $MODEL is absent (scripts/setup.sh fetches it)" >&2; exit 1; }
IDS=$(python3 -c 'print(",".join(str(1000 + 37 * i % 40000) for i in range(64)))')
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
for r in $(seq "$REPS"); do
  for CFG in $CFGS; do
    IFS=: read -r TP TH FL <<< "$CFG"
    for V in A B; do
      BIN=${!V}
      "$BIN" --model "$MODEL" --tp "$TP" --threads "$TH" --prompt-ids "$IDS" --max-new-tokens 65 --ignore-eos \
        --json ${FL:+"$FL"} 2>/dev/null | tail -1 \
        | python3 -c 'import json, sys, zlib
d = json.load(sys.stdin)
print(sys.argv[1], sys.argv[2], round(d["prefill_tokens_per_s"], 1), round(d["decode_tokens_per_s"], 1),
      zlib.crc32(str(d["generated_ids"]).encode()))' "$CFG" "$V" | tee -a "$OUT"
    done
  done
done
python3 - "$OUT" <<'PY'
import collections, statistics as st, sys
runs = collections.defaultdict(lambda: {"A": [], "B": []})
ids = collections.defaultdict(set)
for line in open(sys.argv[1]):
    cfg, v, pre, dec, h = line.split()
    runs[cfg][v].append(float(dec))
    ids[cfg].add(h)
for cfg, r in runs.items():
    a, b = r["A"], r["B"]
    pairs = [y / x for x, y in zip(a, b)]
    print(f"{cfg}: decode median A {st.median(a):.1f}, B {st.median(b):.1f} tok/s, B/A {st.median(b) / st.median(a):.3f}; "
          f"paired median {st.median(pairs):.3f}, B faster in {sum(p > 1 for p in pairs)} of {len(pairs)}; "
          f"generated ids {'identical' if len(ids[cfg]) == 1 else 'DIFFER'} in every run")
PY
