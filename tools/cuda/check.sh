#!/usr/bin/env bash
# The GPU checks for the CUDA build (docs/cuda.md), run on a GPU machine from the repository root with the binary
# that tools/cuda/build.sh made on a CPU machine:
#
#   tools/cuda/check.sh [parity] [bench] [torch]      # default: all three; results in $OUT (or target/cuda-check)
#
# parity: every case of tests/fixtures/pipeline/cases.json (diffusers' own images from the tiny fixture models)
#         generated on the GPU in f32 (must reach 40 dB PSNR, as on the CPU), then in bf16 and f16 (reported).
# bench:  `controlnet bench` at 512 px (latent 64, batch 2) in f32, bf16 and f16, with the GPU's memory in use
#         sampled by nvidia-smi during each run.
# torch:  the same configurations through tools/bench_torch.py --device cuda (diffusers on the machine's PyTorch;
#         diffusers travels as wheels in target/cuda-dist/wheels when the machine lacks it).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-target/cuda-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# The binary travels gzipped (the device takes at most 64 MiB of files): unpacked outside the carried tree.
if [ -z "${BIN:-}" ]; then
    BIN=/tmp/controlnet-cuda/controlnet
    mkdir -p "$(dirname "$BIN")"
    gzip -dc target/cuda-dist/controlnet.gz > "$BIN" && chmod +x "$BIN"
    cp target/cuda-dist/compute_cap "$(dirname "$BIN")/compute_cap"
fi
STEPS=${*:-parity bench torch}
log() { echo "check: $*" | tee -a "$OUT/check.log" >&2; }

# The CUDA libraries the binary loads (cuBLAS, cuBLASLt, cuRAND, NVRTC) are PyTorch's: its pip packages put them
# under site-packages/nvidia/*/lib.
SITE=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
for lib in "$SITE"/nvidia/*/lib; do LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
log "binary built for compute capability $(cat "$(dirname "$BIN")/compute_cap" 2>/dev/null || echo '?')"

# Runs "$@" while sampling the GPU memory in use; prints the peak MiB to stderr and into $OUT/<name>.mem.
with_memory() {
    local name=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$name.memlog" &
    local sampler=$!
    "$@"; local rc=$?
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    sort -n "$OUT/$name.memlog" | tail -1 > "$OUT/$name.mem"
    log "$name: peak GPU memory in use $(cat "$OUT/$name.mem") MiB (whole GPU)"
    return $rc
}

failed=0
if [[ " $STEPS " == *" parity "* ]]; then
    "$PY" - "$BIN" "$OUT" <<'PYEOF' || failed=1
import json, subprocess, sys, os, time
sys.path.insert(0, "tools/cuda")
from psnr import psnr
binary, out = sys.argv[1], sys.argv[2]
cases = json.load(open("tests/fixtures/pipeline/cases.json"))
rows, bad = [], 0
for dtype in ["f32", "bf16", "f16"]:
    for c in cases:
        dest = os.path.join(out, f"{c['name']}-{dtype}.png")
        start = time.time()
        res = subprocess.run([binary, "generate", *c["args"], "--dtype", dtype, "--output", dest, "--quiet"],
                             capture_output=True, text=True)
        took = time.time() - start
        if res.returncode != 0:
            rows.append({"case": c["name"], "dtype": dtype, "error": res.stderr.strip()[-400:]})
            bad += dtype == "f32"
            print(f"{c['name']:<16} {dtype:<5} FAILED: {res.stderr.strip()[-400:]}", flush=True)
            continue
        ours = [dest] if len(c["images"]) == 1 else [dest[:-4] + f"-{i + 1}.png" for i in range(len(c["images"]))]
        dbs = [psnr(o, f"tests/fixtures/pipeline/{ref}") for o, ref in zip(ours, c["images"])]
        worst = min(dbs)
        bad += dtype == "f32" and worst < 40.0
        rows.append({"case": c["name"], "dtype": dtype, "psnr_db": worst, "seconds": took})
        print(f"{c['name']:<16} {dtype:<5} {worst:6.1f} dB  {took:5.1f} s", flush=True)
json.dump(rows, open(os.path.join(out, "parity.json"), "w"), indent=1)
print(f"parity: {bad} f32 case(s) under 40 dB or failed")
sys.exit(1 if bad else 0)
PYEOF
fi

if [[ " $STEPS " == *" bench "* ]]; then
    for dtype in f32 bf16 f16; do
        with_memory "bench-$dtype" "$BIN" bench --preset sd15 --latent 64 --batch 2 --iters 5 --dtype "$dtype" --json \
            > "$OUT/bench-$dtype.json" || failed=1
        "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ['dtype','kernels','unet_controlnet_step_s','unet_step_s','controlnet_s','vae_decode_s']})" "$OUT/bench-$dtype.json"
    done
fi

if [[ " $STEPS " == *" torch "* ]]; then
    if ! "$PY" -c 'import diffusers' 2>/dev/null && ls target/cuda-dist/wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site target/cuda-dist/wheels/*.whl &&
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    for dtype in f32 bf16 f16; do
        with_memory "torch-$dtype" "$PY" tools/bench_torch.py --device cuda --preset sd15 --latent 64 --batch 2 \
            --iters 5 --dtype "$dtype" > "$OUT/torch-$dtype.json" || failed=1
        "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ['dtype','gpu','unet_controlnet_step_s','unet_step_s','controlnet_s','vae_decode_s','peak_cuda_allocated_bytes']})" "$OUT/torch-$dtype.json"
    done
fi
exit $failed
