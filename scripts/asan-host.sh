#!/usr/bin/env bash
# Runs the host backend's property test (host_chaos: random scripts of collectives, barriers, mismatches and
# drops on 2-4 thread and process ranks) and host_procs under AddressSanitizer, leak checking included.
# Needs a nightly toolchain (`-Zsanitizer` is unstable); without rust-src std itself is not instrumented (no
# -Zbuild-std), so only this workspace's code and its dependencies are. Not part of CI (stable only there);
# valgrind memcheck (scripts/valgrind-host.sh) is what CI runs.
#
#   bash scripts/asan-host.sh                 # 256 chaos cases
#   NCCL_RS_CHAOS_CASES=1024 bash scripts/asan-host.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "asan-host: needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
target=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${ASAN_TARGET_DIR:-target/asan}
export RUSTFLAGS="-Zsanitizer=address"
export NCCL_RS_CHAOS_CASES=${NCCL_RS_CHAOS_CASES:-256}
status=0
for t in host_chaos host_procs; do
    exe=$(cargo +nightly test -p nccl-rs --target "$target" --test "$t" --no-run 2>&1 |
        sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -n 1)
    if [ -z "$exe" ]; then
        echo "asan-host: could not build test target $t" >&2
        exit 1
    fi
    printf '\n==> AddressSanitizer: %s\n' "$t"
    # The process ranks re-execute the binary, so they run instrumented too; a child's ASan or leak report
    # makes it exit non-zero, which fails the parent's test.
    (cd nccl && "$exe" --test-threads=1) || status=1
done
exit $status
