#!/usr/bin/env bash
# Build the release binary with candle's CUDA backend on a machine without a GPU or a CUDA install, so it can be
# carried to a GPU machine and run there (tools/cuda/check.sh). See docs/cuda.md.
#
#   tools/cuda/build.sh            # -> target/cuda-dist/controlnet.gz (+ the PTX arch it holds)
#
# What it does:
# 1. The CUDA 13.0 compiler, headers (CCCL's too) and the libraries cudarc links (cuBLAS, cuBLASLt, cuRAND, NVRTC, cudart) come
#    from NVIDIA's PyPI wheels, installed with pip into target/cuda-toolkit; a system toolkit is used instead when
#    CUDA_HOME is set. 13.0 because the GPU machines we are lent run driver 580 with PyTorch cu130, whose wheels
#    carry the same libraries (same sonames) that the binary loads at run time.
# 2. The driver library (libcuda.so.1) is not on PyPI: the link needs only its symbols, so a stub with that soname is
#    generated from cudarc's own declarations (as the toolkit's lib64/stubs/libcuda.so is); the GPU machine's
#    driver provides the real one.
# 3. Kernels are compiled for CUDA_COMPUTE_CAP (default 90: H100 and H200), as PTX/cubin by candle-kernels.
# 4. diffusers' wheels go beside the binary for the PyTorch side of check.sh.
#
# Carry target/cuda-dist to the GPU machine (about 33 MB) and run tools/cuda/check.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CAP=${CUDA_COMPUTE_CAP:-90}
CUDA_VERSION=13.0
TOOLKIT=$ROOT/target/cuda-toolkit
TARGET_DIR=${CUDA_TARGET_DIR:-$ROOT/target/cuda}
DIST=$ROOT/target/cuda-dist
PYTHON=${PYTHON:-python3}

# 1. the toolkit
if [ -z "${CUDA_HOME:-}" ]; then
    # nv/target comes from CCCL (libcu++), which cuda_fp16.h includes: a toolkit without it cannot compile kernels.
    if [ ! -x "$TOOLKIT/nvidia/cu13/bin/nvcc" ] || [ ! -e "$TOOLKIT/nvidia/cu13/include/nv/target" ]; then
        echo "installing the CUDA $CUDA_VERSION toolkit wheels into $TOOLKIT" >&2
        # WHEELS: a folder of already-downloaded wheels to install from (pip downloads otherwise).
        "$PYTHON" -m pip install --quiet --upgrade --no-deps --target "$TOOLKIT" ${WHEELS:+--find-links "$WHEELS"} \
            "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-nvvm==$CUDA_VERSION.*" \
            "nvidia-cuda-runtime==$CUDA_VERSION.*" "nvidia-cuda-nvrtc==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" \
            "nvidia-cublas==$CUDA_VERSION.*" "nvidia-curand==10.4.0.*"
    fi
    export CUDA_HOME=$TOOLKIT/nvidia/cu13
    # The wheels ship versioned sonames only; the linker looks for lib<name>.so.
    for lib in "$CUDA_HOME"/lib/lib*.so.*; do
        base=$(basename "$lib"); plain=${base%%.so.*}.so
        [ -e "$CUDA_HOME/lib/$plain" ] || ln -s "$base" "$CUDA_HOME/lib/$plain"
    done
fi
export PATH=$CUDA_HOME/bin:$PATH
nvcc --version | tail -2

# 2. the driver stub
STUBS=$CUDA_HOME/lib/stubs
if [ ! -e "$STUBS/libcuda.so" ]; then
    mkdir -p "$STUBS"
    CUDARC=$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
        "$PYTHON" -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
    # Every `fn cuXxx` of the bindings (the wrappers and the extern declarations they call) names a symbol.
    grep -rhoE '\bfn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/" | sed 's/^fn //' | sort -u |
        sed 's/.*/void &(void) {}/' > "$STUBS/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/libcuda_stub.c"
    echo "driver stub: $(wc -l < "$STUBS/libcuda_stub.c") symbols" >&2
fi

# 3. the build
export CUDA_COMPUTE_CAP=$CAP
export LIBRARY_PATH=$CUDA_HOME/lib:$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}
cargo build --release --features cuda --target-dir "$TARGET_DIR" --bin controlnet
mkdir -p "$DIST"
# Stripped and gzipped: the binary holds candle's kernels for the GPU (~95 MB stripped) and the GPU machine takes
# at most 64 MiB of files; check.sh unpacks it there (~27 MB gzipped).
strip -o "$DIST/controlnet.stripped" "$TARGET_DIR/release/controlnet"
gzip -9 -c "$DIST/controlnet.stripped" > "$DIST/controlnet.gz"
rm -f "$DIST/controlnet.stripped" "$DIST/controlnet"
echo "$CAP" > "$DIST/compute_cap"
# 4. diffusers for tools/bench_torch.py on the GPU machine, whose PyTorch image lacks it (pure-Python wheels; the
#    rest of what diffusers imports is there).
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$DIST/wheels" \
    "diffusers==$DIFFUSERS_VERSION" importlib_metadata
ls -la "$DIST"
