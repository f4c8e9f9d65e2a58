#!/usr/bin/env bash
# Rebuilds the bundled demo model (assets/demo) from nothing, as docs/demo.md describes:
#   1. the synthetic circles dataset (4000 pairs, 128 px, seed 0);
#   2. the base: VAE, then UNet with the CLIP text encoder training alongside (controlnet train-base);
#   3. the ControlNet on that base (controlnet train --init), with validation grids and the edge-fidelity score;
#   4. copies both into assets/demo.
# Every stage checkpoints; run the script again to continue a stopped run. WORK defaults to ./demo-work.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${WORK:-$PWD/demo-work}"
BIN="${BIN:-$REPO/target/release/controlnet}"
mkdir -p "$WORK"
cd "$WORK"
[ -x "$BIN" ] || (cd "$REPO" && cargo build --release)

# 1. Data: training pairs, and four held-out conditions for the validation grids.
[ -f circles/prompt.json ] || "$BIN" dataset circles --count 4000 --size 128 --seed 0 --output circles -q
[ -f val/prompt.json ] || "$BIN" dataset circles --count 4 --size 128 --seed 99 --output val -q

# 2. The base: VAE 1500 steps of 8 random 64-px crops; UNet 3000 steps of 32 cached latents, the text encoder
#    training with it, min-SNR weighting (gamma 5): train-base's defaults.
"$BIN" train-base --dataset circles --output base-run --vae-steps 1500 --unet-steps 3000 -q

# 3. The ControlNet on the locked base, at a learning rate this small network tolerates (1e-3; at 2e-4 it had
#    not started to follow after 1500 steps). A small hint encoder: SD's (16,32,96,256) would cost four times the
#    rest of this tiny network.
RESUME=()
[ -d cn-run ] && RESUME=(--resume)
"$BIN" train --model base-run/model --init --dataset circles --output cn-run "${RESUME[@]}" \
    --resolution 128 --batch-size 8 --learning-rate 1e-3 --max-steps 3000 --cache \
    --hint-channels 16,32,32,32 \
    --checkpointing-steps 100 --checkpoints-total-limit 2 \
    --validation-image val/source/0.png --validation-prompt "a dark green circle on a cyan background" \
    --validation-image val/source/1.png --validation-prompt "a dark blue circle on a blue background" \
    --validation-image val/source/2.png --validation-prompt "a light green circle on a dark blue background" \
    --validation-image val/source/3.png --validation-prompt "a brown circle on a cyan background" \
    --validation-steps 200 --fidelity canny -q

# 4. Into the repository.
rm -rf "$REPO/assets/demo.new" && mkdir -p "$REPO/assets/demo.new"
cp -r base-run/model "$REPO/assets/demo.new/base"
cp -r cn-run/controlnet "$REPO/assets/demo.new/circles-controlnet"
rm -rf "$REPO/assets/demo" && mv "$REPO/assets/demo.new" "$REPO/assets/demo"
du -sh "$REPO/assets/demo"
