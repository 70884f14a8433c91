#!/usr/bin/env bash
# The one-command GPU check, in two halves:
#
#   bash scripts/gpu-check.sh build      (here, with cargo; the default)
#       Builds, for CUDA 13.0, in release mode and stripped, everything the GPU run needs into gpu-bundle/
#       (git-ignored; refused over 60 MiB): the kernel-vs-twin test (llm/tests/kernels_gpu.rs), the NCCL GPU
#       tests (nccl/tests/nccl_gpu.rs) with the list of those that need one GPU, nccl-perf, this script and a
#       MANIFEST (commit, build commands, sizes).
#
#   bash gpu-bundle/gpu-check.sh run     (on the GPU machine: no cargo, no network)
#       Finds the CUDA 13 user-space libraries (cuBLAS 13, NVRTC 13, NCCL) in the Python environment, checks
#       that a GPU is there (and says so clearly, exit 3, when it is not), runs every kernel against its CPU
#       twin, the NCCL tests that need one GPU and `nccl-perf -g 1`, writes one report file
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
    # The NCCL tests that need exactly one GPU, by their #[ignore] reason.
    awk '/#\[ignore = "needs 1 GPU"\]/ { getline; sub(/^fn /, ""); sub(/\(.*/, ""); print }' \
        "$src/nccl/tests/nccl_gpu.rs" >"$bundle/nccl_gpu.1gpu"
    [ -s "$bundle/nccl_gpu.1gpu" ] || { log "error: found no 1-GPU test in nccl/tests/nccl_gpu.rs"; exit 1; }
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
    # --- engine_gpu (issue 13), run half: the 1-GPU test only (TP=2 needs 2 GPUs) ---
    if [ -x "$bundle/bin/engine_gpu" ]; then
        step "CUDA engine vs CPU engine, TP=1" 300 "$bundle/bin/engine_gpu" --ignored --exact \
            tp1_cuda_engine_matches_the_cpu_engine --test-threads=1 --nocapture
    else
        say "FAIL engine_gpu: not in the bundle (rebuild it)"
        status=1
    fi
    # --- end engine_gpu ---
    while read -r t; do
        [ -n "$t" ] && step "nccl_gpu $t" 120 "$bundle/bin/nccl_gpu" --ignored --exact "$t" --test-threads=1
    done <"$bundle/nccl_gpu.1gpu"
    step "nccl-perf all_reduce -g 1" 120 "$bundle/bin/nccl-perf" all_reduce -b 8 -e 256M -f 4 -g 1 --backend nccl
    step "nccl-perf sendrecv -g 1" 120 "$bundle/bin/nccl-perf" sendrecv -b 8 -e 64M -f 4 -g 1 --backend nccl
    # --- begin: nccl-perf -G (CUDA graph launches), branch graph ---
    step "nccl-perf all_reduce -g 1 -G 2" 120 "$bundle/bin/nccl-perf" all_reduce -b 8 -e 64M -f 4 -g 1 -G 2 --backend nccl
    step "nccl-perf all_reduce -g 1 -G 2 -C 1" 120 "$bundle/bin/nccl-perf" all_reduce -b 8 -e 1M -f 8 -g 1 -G 2 -C 1 --backend nccl
    # --- end: nccl-perf -G ---
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
