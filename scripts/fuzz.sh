#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers and the bootstrap with libFuzzer (libfuzzer-sys) on the STABLE
# toolchain: the instrumentation is the same SanitizerCoverage passes cargo-fuzz asks for, given to rustc as
# stable `-C` flags (no -Z, no nightly). Needs only a C++ compiler (g++) for libFuzzer itself.
#
#   scripts/fuzz.sh --ci                 # build, then every target for FUZZ_CI_SECONDS (default 15) each
#   scripts/fuzz.sh TARGET [SECONDS]     # one target (default 600 s); extra libFuzzer flags in FUZZ_FLAGS
#   scripts/fuzz.sh --list               # the targets
# FUZZ_NO_BUILD=1 skips the build (binaries already in the target directory, fuzz/target by default).
#
# Corpora: the checked-in seeds in fuzz/seeds/<target> (regenerate with
# `cargo run --manifest-path fuzz/Cargo.toml -p nccl-fuzz-seedgen`) are read; what the fuzzer adds goes to
# fuzz/corpus/<target> (ignored by git). A crash leaves fuzz/artifacts/<target>/crash-* and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGETS=(gguf safetensors_dir config_json gguf_tokenizer chat_template bootstrap_frames bootstrap_handshake perf_flags)
# Its own target directory: these RUSTFLAGS differ from the main build's, and sharing would rebuild both.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$ROOT/fuzz/target}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
BIN="$CARGO_TARGET_DIR/$TRIPLE/release"

build() {
    [[ -n ${FUZZ_NO_BUILD:-} ]] && return 0
    command -v c++ >/dev/null || { echo "fuzz.sh: a C++ compiler (c++/g++) is needed to build libFuzzer" >&2; exit 1; }
    # --target keeps the instrumentation off build scripts and proc macros (as cargo-fuzz does).
    RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers" \
        cargo build --manifest-path fuzz/Cargo.toml --release --target "$TRIPLE" --locked -p nccl-fuzz
}

run() { # target seconds
    local t=$1 secs=$2
    local corpus="$ROOT/fuzz/corpus/$t" art="$ROOT/fuzz/artifacts/$t/"
    mkdir -p "$corpus" "$art"
    local maxlen=65536
    [[ $t == bootstrap_* || $t == perf_flags || $t == config_json ]] && maxlen=4096
    echo "=== fuzz $t for ${secs}s"
    # -timeout: one input taking over 10 s is a hang (reported as a crash); -rss_limit_mb: memory blow-ups are.
    "$BIN/$t" "$corpus" "$ROOT/fuzz/seeds/$t" -max_total_time="$secs" -max_len="$maxlen" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -artifact_prefix="$art" -print_final_stats=1 ${FUZZ_FLAGS:-} \
        2>"$ROOT/fuzz/artifacts/$t.log" || {
        tail -40 "$ROOT/fuzz/artifacts/$t.log" >&2
        echo "fuzz.sh: $t FAILED: see fuzz/artifacts/$t/ and fuzz/artifacts/$t.log" >&2
        return 1
    }
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "$ROOT/fuzz/artifacts/$t.log" | tr '\n' ' '
    echo
}

case "${1:-}" in
--list) printf '%s\n' "${TARGETS[@]}" ;;
--ci)
    build
    fail=0
    for t in "${TARGETS[@]}"; do run "$t" "${FUZZ_CI_SECONDS:-15}" || fail=1; done
    [[ $fail == 0 ]] && echo "fuzz: ${#TARGETS[@]} targets, no crash" || { echo "fuzz: a target crashed" >&2; exit 1; }
    ;;
"" | -h | --help) sed -n 2,13p "$0" ;;
*)
    [[ " ${TARGETS[*]} " == *" $1 "* ]] || { echo "fuzz.sh: unknown target '$1' (see --list)" >&2; exit 2; }
    build
    run "$1" "${2:-600}"
    ;;
esac
