#!/usr/bin/env bash
# The one-command GPU check, in two halves:
#
#   bash scripts/gpu-check.sh build      (here, with cargo; the default)
#       Builds, for CUDA 13.0, in release mode and stripped, everything the GPU run needs into gpu-bundle/
#       (git-ignored; refused over 60 MiB): the kernel-vs-twin test (llm/tests/kernels_gpu.rs), the CUDA
#       engine's test (llm/tests/engine_gpu.rs), the NCCL GPU tests (nccl/tests/nccl_gpu.rs), each test list
#       with the GPUs each test needs, nccl-perf, tp_llama, gen_checkpoint, this script and a MANIFEST (commit,
#       build commands, sizes).
#
#   bash gpu-bundle/gpu-check.sh run     (on the GPU machine: no cargo, no network)
#       Finds the CUDA 13 user-space libraries (cuBLAS 13, NVRTC 13, NCCL) in the Python environment, checks
#       that a GPU is there (and says so clearly, exit 3, when it is not), runs every kernel against its CPU
#       twin, every engine and NCCL test that the visible GPUs allow, `nccl-perf -g 1` (eager and -G), then
#       generates a SmolLM2-shaped and a Llama-3-8B-shaped checkpoint on the machine and reports tp_llama's
#       prefill and decode tokens/s on them (TP=1; PP=2, TP=2/4/8 and 2-D where there are enough GPUs) with
#       the decode ceiling on paper, writes one report file
#       (GPU_CHECK_REPORT, default gpu-check-report.txt beside the bundle, or $OUT/ when OUT is set) and exits
#       non-zero on any failure.
#
# Why a CUDA 13 build, and how: cudarc 0.19.10 loads libraries by name, and the names it tries come from its
# CUDA version feature at build time (get_lib_name_candidates: `libcublas.so`, `libcublas.so.<major>`, then
# `.12`, `.11`, ...). A build for 12.9 (the workspace's `cuda` feature) never asks for `libcublas.so.13`, and
# loading 13.x libraries through 12.9 bindings is not an ABI cudarc promises. The version features are mutually
# exclusive (both at once define the same items twice), so `cuda-13000` cannot be a second cargo feature of
# ours: `clippy --all-features` would turn both on. The build below therefore compiles an exact copy of the
# working tree's tracked files whose only difference is the cudarc version feature in the workspace
# Cargo.toml (`cuda-12090` -> `cuda-13000`, checked to be exactly one substitution), in its own target folder.
# Environment (build): GPU_CHECK_TARGET_DIR (cargo's target folder, default target/gpu-check),
# GPU_CHECK_BUNDLE (default gpu-bundle).
set -euo pipefail

mode="${1:-build}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf 'gpu-check: %s\n' "$*" >&2; }
max_bundle_mib=60

build() {
    local root bundle target src
    root="$(cd "$here/.." && pwd)"
    bundle="${GPU_CHECK_BUNDLE:-$root/gpu-bundle}"
    target="${GPU_CHECK_TARGET_DIR:-$root/target/gpu-check}"
    src="$target/src"
    command -v cargo >/dev/null || { log "error: cargo is needed to build (the run half needs none)"; exit 1; }

    log "copying the tracked files of $root to $src (CUDA 13.0 variant)"
    rm -rf "$src"
    mkdir -p "$src"
    (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$src"
    [ -e "$root/.deps" ] && ln -sfn "$(cd "$root/.deps" && pwd -P)" "$src/.deps"
    local n
    n="$(grep -c '"cuda-12090"' "$src/Cargo.toml" || true)"
    [ "$n" = "1" ] || { log "error: expected exactly one \"cuda-12090\" in Cargo.toml, found $n"; exit 1; }
    sed -i 's/"cuda-12090"/"cuda-13000"/' "$src/Cargo.toml"
    touch -r "$root/Cargo.toml" "$src/Cargo.toml" # tar kept every mtime: an unchanged tree rebuilds nothing

    rm -rf "$bundle"
    mkdir -p "$bundle/bin"
    local t0=$SECONDS
    # Each cargo command prints JSON messages; the executables are read from them.
    run_cargo() { # <name in bundle> <cargo args...>
        local name="$1"; shift
        log "cargo $* (CUDA 13.0, release)"
        local exe
        exe="$(cd "$src" && CARGO_TARGET_DIR="$target/cargo" cargo "$@" --release --message-format=json \
            | python3 -c '
import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable")]
print(exes[-1] if exes else "")')"
        [ -n "$exe" ] && [ -f "$exe" ] || { log "error: cargo $* produced no executable"; exit 1; }
        # Stripped, then xz-compressed (python's lzma, so the run half needs no xz binary): nccl_gpu's read-only
        # data alone is 75 MB stripped (mostly zeros), 0.6 MB compressed.
        cp "$exe" "$bundle/bin/$name"
        strip "$bundle/bin/$name"
        python3 -c 'import lzma, sys; open(sys.argv[1] + ".xz", "wb").write(lzma.compress(open(sys.argv[1], "rb").read(), preset=6))' \
            "$bundle/bin/$name"
        echo "$name: cargo $* --release (CUDA 13.0), stripped $(stat -c %s "$bundle/bin/$name") bytes, xz $(stat -c %s "$bundle/bin/$name.xz")" \
            >>"$bundle/MANIFEST"
        rm "$bundle/bin/$name"
    }
    {
        echo "commit: $(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD || echo ' + uncommitted changes')"
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
        echo "cudarc: cuda-13000 (the workspace's cuda-12090 replaced in a copy of the tree)"
    } >"$bundle/MANIFEST"
    run_cargo kernels_gpu test -p nccl-llm --features cuda --test kernels_gpu --no-run
    # --- engine_gpu (issue 13: the CUDA engine against the CPU engine), build half; run half below ---
    run_cargo engine_gpu test -p nccl-llm --features cuda --test engine_gpu --no-run
    # --- end engine_gpu ---
    run_cargo nccl_gpu test -p nccl-rs --features cuda --test nccl_gpu --no-run
    run_cargo nccl-perf build -p nccl-stack --features cuda --bin nccl-perf
    # The engine on generated models (tokens/s, layouts over several GPUs) and their generator.
    run_cargo tp_llama build -p nccl-stack --features cuda --example tp_llama
    run_cargo gen_checkpoint build -p nccl-llm --example gen_checkpoint
    # Every GPU test with the GPUs it needs, from its #[ignore = "needs N GPU(s)..."] reason: "N name".
    local t
    for t in nccl_gpu:nccl/tests/nccl_gpu.rs engine_gpu:llm/tests/engine_gpu.rs; do
        awk '/#\[ignore = "needs [0-9]+\+? GPU/ { n = $0; sub(/.*needs /, "", n); sub(/[^0-9].*/, "", n);
                getline; sub(/^fn /, ""); sub(/\(.*/, ""); print n, $0 }' \
            "$src/${t#*:}" >"$bundle/${t%%:*}.tests"
        [ -s "$bundle/${t%%:*}.tests" ] || { log "error: found no GPU test in ${t#*:}"; exit 1; }
    done
    cp "$here/gpu-check.sh" "$bundle/gpu-check.sh"
    local bytes
    bytes="$(du -sb "$bundle" | cut -f1)"
    {
        echo "build seconds: $((SECONDS - t0))"
        echo "bundle bytes: $bytes"
        (cd "$bundle" && ls -l bin)
        echo "unpacked by the run half into bin/ (python3's lzma)"
    } >>"$bundle/MANIFEST"
    if [ "$bytes" -gt $((max_bundle_mib * 1024 * 1024)) ]; then
        log "error: the bundle is $bytes bytes, over ${max_bundle_mib} MiB"
        exit 1
    fi
    log "bundle ready: $bundle ($((bytes / 1024 / 1024)) MiB); on the GPU machine: bash $(basename "$bundle")/gpu-check.sh run"
}

# ----------------------------------------------------------------------------------------------------------
# The run half: plain bash and python3, nothing built.

# Folders holding the CUDA 13 libraries and NCCL in the Python environment (pip wheels: nvidia/cu13/lib for
# the CUDA 13 toolkit wheels, nvidia/<name>/lib for the older layout, nvidia/nccl/lib for NCCL).
find_libs() {
    local py="${PYTHON:-python3}"
    "$py" - <<'EOF'
import glob, os, site, sys
roots = []
for p in list(sys.path) + site.getsitepackages() + [site.getusersitepackages()]:
    if p and os.path.isdir(os.path.join(p, "nvidia")) and p not in roots:
        roots.append(p)
wanted = ["libcublas.so.13", "libcublasLt.so.13", "libnvrtc.so.13", "libnccl.so.2"]
dirs = []
for r in roots:
    for name in wanted:
        for f in glob.glob(os.path.join(r, "nvidia", "**", name), recursive=True):
            d = os.path.dirname(f)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
EOF
}

# Decode and prefill tokens/s of the CUDA engine on generated models (made here: nothing large travels),
# against the CPU engine's greedy tokens on the tiny model, and every layout the visible GPUs allow.
# GPU_CHECK_WORK: where the models go (default /tmp/gpu-check-models); GPU_CHECK_LLAMA_LAYERS: layers of the
# Llama-3-8B-shaped model (default 8; the full model has 32).
models() {
    local work="${GPU_CHECK_WORK:-/tmp/gpu-check-models}" layers="${GPU_CHECK_LLAMA_LAYERS:-8}"
    local tp="$bundle/bin/tp_llama" gen="$bundle/bin/gen_checkpoint"
    if [ ! -x "$tp" ] || [ ! -x "$gen" ]; then
        say "FAIL models: tp_llama or gen_checkpoint is not in the bundle (rebuild it)"
        status=1
        return
    fi
    mkdir -p "$work"
    rm -f "$work/speeds.tsv"
    local ids
    ids="$(seq -s, 11 74)" # 64 prompt tokens
    # <label> <timeout> <tp_llama args...>: one --json run; its line goes to the report, tokens/s to the summary.
    gen_run() {
        local label="$1" limit="$2"; shift 2
        say ""
        say "## tp_llama $label: $*"
        local t0=$SECONDS rc=0 out
        out="$(timeout "$limit" "$tp" "$@" --json 2>>"$report")" || rc=$?
        printf '%s\n' "$out" >>"$report"
        if [ "$rc" != 0 ] || [ -z "$out" ]; then
            say "FAIL tp_llama $label (exit $rc after $((SECONDS - t0)) s)"
            status=1
            return
        fi
        printf '%s\n' "$out" | python3 -c '
import json, sys
v = json.loads(sys.stdin.read().strip().splitlines()[-1])
print("PASS tp_llama %s: prefill %.1f tok/s, decode %.1f tok/s (%d prompt, %d generated; tp %s x pp %s)" % (
    sys.argv[1], v["prefill_tokens_per_s"], v["decode_tokens_per_s"], len(v["prompt_ids"]),
    len(v["generated_ids"]), v["tp"], v["pp"]))
with open(sys.argv[2], "a") as f:
    f.write("%s\t%f\t%f\n" % (sys.argv[1], v["prefill_tokens_per_s"], v["decode_tokens_per_s"]))' "$label" "$work/speeds.tsv" | tee -a "$report"
    }
    local gpu=(--backend nccl --device cuda --ignore-eos)

    # The tiny model: the GPU engine's greedy ids next to the CPU engine's (bf16 may flip a near tie, so
    # this is shown, not judged; engine_gpu above judges logits with margins).
    gen_run "tiny, CPU engine" 120 --tiny --prompt-ids 1,17,42,99,5,230 --max-new-tokens 16 --ignore-eos --tp 1
    gen_run "tiny, CUDA TP=1" 120 --tiny --prompt-ids 1,17,42,99,5,230 --max-new-tokens 16 "${gpu[@]}" --tp 1

    local smol="$work/smollm2" llama="$work/llama3-8b-$layers"
    step "generate a SmolLM2-shaped checkpoint" 300 "$gen" --shape smollm2 --out "$smol"
    step "generate a Llama-3-8B-shaped checkpoint, $layers layers" 600 "$gen" --shape llama3-8b --layers "$layers" --out "$llama"
    python3 - "$smol" "$llama" <<'PY' | tee -a "$report"
import json, subprocess, sys
# The decode ceiling on paper: every weight matrix read once per token (bf16), at the GPU's HBM bandwidth.
bw = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
try:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.splitlines()[0]
except Exception:
    name = "unknown"
hbm = next((b for k, b in bw.items() if k in name), None)
for d in sys.argv[1:]:
    c = json.load(open(d + "/config.json"))
    h, i, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_token = 2 * (L * (h * q + 2 * h * kv + q * h + 3 * h * i) + v * h)
    line = "ceiling on paper, %s: %.2f GB of bf16 matrices read per decoded token" % (d.rsplit("/", 1)[-1], per_token / 1e9)
    if hbm:
        line += "; at %s's %.2f TB/s: %.0f tok/s on one GPU (N GPUs of TP: about N times, less the all-reduces)" % (
            name, hbm / 1e12, hbm / per_token)
    print(line)
PY
    gen_run "SmolLM2 shape, CUDA TP=1" 300 --model "$smol" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 1
    gen_run "Llama-3-8B shape ($layers layers), CUDA TP=1" 600 --model "$llama" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 1
    # The same decodes through a recorded CUDA graph (--cuda-graph): decode tokens/s next to the eager runs
    # above (engine_gpu's tp1_graph_decode_equals_eager_decode judges the tokens).
    gen_run "SmolLM2 shape, CUDA TP=1, --cuda-graph" 300 --model "$smol" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 1 --cuda-graph
    gen_run "Llama-3-8B shape ($layers layers), CUDA TP=1, --cuda-graph" 600 --model "$llama" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 1 --cuda-graph
    # Layouts over several GPUs (SmolLM2's 9 heads allow no TP of 2, 4 or 8; the 8B shape's 32/8 do).
    if [ "$gpus" -ge 2 ]; then
        gen_run "SmolLM2 shape, CUDA PP=2" 300 --model "$smol" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 1 --pp 2
        gen_run "Llama-3-8B shape, CUDA TP=2" 600 --model "$llama" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 2
        gen_run "Llama-3-8B shape, CUDA TP=2, --cuda-graph" 600 --model "$llama" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 2 --cuda-graph
        # Micro-batched prefill, one stream and then the collectives on their own (--overlap-comm): the
        # prefill tokens/s of the two is the overlap's gain (engine_gpu's tp2_overlapped_prefill_* judges values).
        # A 1024-token prompt, so that each all-reduce (1024 x 4096 f32 = 16 MiB) is worth hiding.
        local long
        long="$(seq -s, 11 1034)"
        gen_run "Llama-3-8B shape, CUDA TP=2, 1024-token prompt in 2 micro-batches" 600 --model "$llama" --prompt-ids "$long" --max-new-tokens 8 "${gpu[@]}" --tp 2 --micro-batches 2
        gen_run "Llama-3-8B shape, CUDA TP=2, 1024-token prompt, --overlap-comm" 600 --model "$llama" --prompt-ids "$long" --max-new-tokens 8 "${gpu[@]}" --tp 2 --overlap-comm
        gen_run "Llama-3-8B shape, CUDA TP=2 as processes" 600 --model "$llama" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 2 --nprocs 2
    else
        say "not run: PP=2, TP=2 and the process layouts need 2 GPUs, $gpus visible"
    fi
    if [ "$gpus" -ge 4 ]; then
        gen_run "Llama-3-8B shape, CUDA TP=4" 600 --model "$llama" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 4
        gen_run "Llama-3-8B shape, CUDA TP=2 x PP=2" 600 --model "$llama" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 2 --pp 2
    fi
    if [ "$gpus" -ge 8 ]; then
        gen_run "Llama-3-8B shape, CUDA TP=8" 600 --model "$llama" --prompt-ids "$ids" --max-new-tokens 64 "${gpu[@]}" --tp 8
    fi
    # Ratios within this run: graph-captured decode over eager decode, --overlap-comm prefill over one stream.
    [ -f "$work/speeds.tsv" ] || return 0
    python3 - "$work/speeds.tsv" <<'PY' | tee -a "$report" || say "ratios: the summary failed (the PASS lines above have the figures)"
import sys
runs = {}
for line in open(sys.argv[1]):
    label, pre, dec = line.rstrip("\n").split("\t")
    runs[label] = (float(pre), float(dec))
pairs = [(l, l[: -len(", --cuda-graph")], 1, "decode") for l in runs if l.endswith(", --cuda-graph")]
pairs += [(l, l.replace(", --overlap-comm", " in 2 micro-batches"), 0, "prefill")
          for l in runs if l.endswith(", --overlap-comm")]
for new, base, i, what in pairs:
    if base in runs and runs[base][i] > 0:
        print("ratio %s: %s %.2fx of %s" % (new, what, runs[new][i] / runs[base][i], base))
    else:
        print("ratio %s: no reference run %r" % (new, base))
PY
}

run() {
    local bundle report status=0
    bundle="$here"
    local x
    for x in "$bundle"/bin/*.xz; do
        [ -e "$x" ] || continue
        [ -x "${x%.xz}" ] && continue
        python3 -c 'import lzma, os, sys; open(sys.argv[2], "wb").write(lzma.decompress(open(sys.argv[1], "rb").read())); os.chmod(sys.argv[2], 0o755)' \
            "$x" "${x%.xz}"
    done
    [ -x "$bundle/bin/kernels_gpu" ] || { log "error: $bundle/bin has no kernels_gpu: run the build half first"; exit 1; }
    if [ -n "${GPU_CHECK_REPORT:-}" ]; then
        report="$GPU_CHECK_REPORT"
    elif [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        report="$OUT/gpu-check-report.txt"
    else
        report="$bundle/gpu-check-report.txt"
    fi
    : >"$report"
    say() { printf '%s\n' "$*" | tee -a "$report"; }
    say "# gpu-check report, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
    sed 's/^/# /' "$bundle/MANIFEST" >>"$report"

    local libs
    libs="$(find_libs || true)"
    say "CUDA 13 / NCCL library folders from the Python environment: ${libs:-none}"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    for lib in libcublas.so.13 libnvrtc.so.13 libnccl.so.2; do
        local found=""
        IFS=: read -ra ds <<<"$libs"
        for d in "${ds[@]}"; do [ -n "$d" ] && [ -e "$d/$lib" ] && found="$d/$lib"; done
        if [ -z "$found" ]; then
            say "FAIL: $lib is not in the Python environment (pip wheels nvidia-cublas, nvidia-cuda-nvrtc, nvidia-nccl-cu13)"
            status=1
        else
            say "found $found"
        fi
    done

    # A GPU: the driver library and at least one device.
    local gpus=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /' | tee -a "$report" || true
    fi
    local driver=""
    ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1' && driver=ldconfig
    IFS=: read -ra ds <<<"${LD_LIBRARY_PATH}:/usr/lib/x86_64-linux-gnu:/usr/lib/aarch64-linux-gnu:/usr/lib64:/usr/local/nvidia/lib64"
    for d in "${ds[@]}"; do [ -n "$d" ] && [ -e "$d/libcuda.so.1" ] && driver="$d/libcuda.so.1"; done
    if [ -z "$driver" ]; then
        say "NO GPU: the CUDA driver (libcuda.so.1) is not installed on this machine; nothing was run on a GPU."
        exit 3
    fi
    if [ -z "$gpus" ] || [ "$gpus" = "0" ]; then
        say "NO GPU: nvidia-smi lists no GPU (or is missing); nothing was run on a GPU."
        exit 3
    fi
    say "GPUs visible: $gpus"
    [ "$status" = 0 ] || { say "RESULT: FAIL (libraries missing)"; exit 1; }

    step() { # <name> <timeout s> <command...>
        local name="$1" limit="$2"; shift 2
        say ""
        say "## $name: $*"
        local t0=$SECONDS rc=0
        timeout "$limit" "$@" >>"$report" 2>&1 || rc=$?
        if [ "$rc" = 0 ]; then
            say "PASS $name ($((SECONDS - t0)) s)"
        else
            say "FAIL $name (exit $rc after $((SECONDS - t0)) s)"
            status=1
        fi
    }
    step "kernels vs CPU twins" 300 "$bundle/bin/kernels_gpu" --ignored --test-threads=1
    # The CUDA engine against the CPU engine, then the NCCL tests: each test that fits the visible GPUs.
    local bin n t
    for bin in engine_gpu nccl_gpu; do
        while read -r n t; do
            [ -n "$t" ] || continue
            if [ "$n" -le "$gpus" ]; then
                step "$bin $t (needs $n GPU(s))" 300 "$bundle/bin/$bin" --ignored --exact "$t" --test-threads=1 --nocapture
            else
                say "not run: $bin $t needs $n GPUs, $gpus visible"
            fi
        done <"$bundle/$bin.tests"
    done
    step "nccl-perf all_reduce -g 1" 120 "$bundle/bin/nccl-perf" all_reduce -b 8 -e 256M -f 4 -g 1 --backend nccl
    step "nccl-perf sendrecv -g 1" 120 "$bundle/bin/nccl-perf" sendrecv -b 8 -e 64M -f 4 -g 1 --backend nccl
    # --- begin: nccl-perf -G (CUDA graph launches), branch graph ---
    step "nccl-perf all_reduce -g 1 -G 2" 120 "$bundle/bin/nccl-perf" all_reduce -b 8 -e 64M -f 4 -g 1 -G 2 --backend nccl
    step "nccl-perf all_reduce -g 1 -G 2 -C 1" 120 "$bundle/bin/nccl-perf" all_reduce -b 8 -e 1M -f 8 -g 1 -G 2 -C 1 --backend nccl
    # --- end: nccl-perf -G ---
    models
    say ""
    if [ "$status" = 0 ]; then say "RESULT: PASS"; else say "RESULT: FAIL"; fi
    log "report: $report"
    exit "$status"
}

case "$mode" in
build) build ;;
run) run ;;
*)
    log "usage: $0 [build|run]"
    exit 2
    ;;
esac
