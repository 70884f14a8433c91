#!/usr/bin/env bash
# Runs the host backend's multi-threaded (and multi-process) tests under valgrind: the stable toolchain has no
# -Zsanitizer and Miri is not installable here, so valgrind is the memory checker these tests get.
#
#   bash scripts/valgrind-host.sh                      # memcheck on every host test binary (children too)
#   VALGRIND_TOOL=helgrind bash scripts/valgrind-host.sh host_sound   # another tool, chosen binaries
#
# Arguments: test targets of nccl-rs (default: all host_* tests). Exit status 1 when valgrind reports an
# error or a test fails. memcheck is the meaningful tool here; helgrind and drd do not see the
# happens-before edges of Rust atomics (std's Mutex and thread join are futex-based too), so they flag every
# access ordered by the barrier and channel protocols: their reports need reading, they are not a verdict.
set -euo pipefail
cd "$(dirname "$0")/.."

tool=${VALGRIND_TOOL:-memcheck}
if ! command -v valgrind >/dev/null; then
    echo "valgrind-host: valgrind is not installed (apt-get install valgrind)" >&2
    exit 1
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(host_collectives host_faults host_sound host_props host_chaos host_procs)
fi

# Under valgrind everything runs ~20-50x slower: a longer timeout than the tests' own is not needed (their
# waits are short and their deadlines generous), but the property test runs fewer cases.
export NCCL_RS_CHAOS_CASES=${NCCL_RS_CHAOS_CASES:-32}

status=0
for t in "${targets[@]}"; do
    exe=$(cargo test -p nccl-rs --test "$t" --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -n 1)
    if [ -z "$exe" ]; then
        echo "valgrind-host: could not build test target $t" >&2
        exit 1
    fi
    printf '\n==> valgrind --tool=%s %s\n' "$tool" "$t"
    start=$(date +%s)
    # Children (the processes-mode ranks re-execute the test binary) are checked too.
    if valgrind --tool="$tool" --error-exitcode=99 --trace-children=yes --quiet "$exe" --test-threads=1; then
        echo "==> $t: clean ($(($(date +%s) - start)) s)"
    else
        echo "==> $t: FAILED (valgrind error or test failure, $(($(date +%s) - start)) s)"
        status=1
    fi
done
exit $status
