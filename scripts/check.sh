#!/usr/bin/env bash
# The project's test command: sets up what the tests need (idempotent), then runs lints and the whole test suite.
# Everything here runs on a CPU-only machine. GPU tests are #[ignore]d; see README "GPU tests".
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

step() { printf '\n==> %s\n' "$*"; }
step "unused dependencies"
python3 scripts/check-deps.py
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy (all targets, all features, warnings denied)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features
step "cargo test (CPU)"
cargo test --workspace
step "cargo test --features cuda --lib (the GPU code's host-side unit tests; no device needed)"
cargo test -p nccl-rs -p nccl-llm --features nccl-rs/cuda,nccl-llm/cuda --lib
step "valgrind memcheck (host backend, multi-threaded tests)"
bash scripts/valgrind-host.sh host_sound host_faults host_collectives
step "fuzzing (libFuzzer on stable rustc, every target for a bounded time)"
FUZZ_CI_SECONDS="${FUZZ_CI_SECONDS:-10}" bash scripts/fuzz.sh --ci
