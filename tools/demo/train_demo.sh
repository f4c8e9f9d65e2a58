#!/usr/bin/env bash
# Rebuilds the bundled demo model (assets/demo) from nothing, in the order the committed one was made
# (docs/demo.md tells why each step is there):
#   1. the synthetic circles dataset (4000 pairs, 128 px, seed 0);
#   2. the base, first pass: VAE, then UNet + CLIP text encoder for 3000 steps (no weight average yet);
#   3. a ControlNet on that base for 5600 steps (it starts following its condition around step 1500);
#   4. the base, second pass: the decoder-only stage (exact colours), and the UNet stage continued to 5000
#      steps with a moving average of its weights;
#   5. the ControlNet continued on the finished base from its step-5600 weights;
#   6. the ControlNet continued on the wide variety (radius 10-40 px, rings 1-5 px, circles against the borders,
#      near colour pairs often) at lr 1e-3, then settled at lr 3e-4, the checkpoint chosen on the validation set;
#   7. copies both into assets/demo and scores them once on the test set.
# Every stage checkpoints; run the script again to continue a stopped run. WORK defaults to ./demo-work.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${WORK:-$PWD/demo-work}"
BIN="${BIN:-$REPO/target/release/controlnet}"
# Steps of the ControlNet's second run (5).
CN_STEPS="${CN_STEPS:-6000}"
# Steps of the wide runs (6), and which checkpoint of the settling run ships (chosen on the validation set,
# docs/demo.md).
WIDE_STEPS="${WIDE_STEPS:-6000}"
SETTLE_STEPS="${SETTLE_STEPS:-4000}"
SETTLE_PICK="${SETTLE_PICK:-4000}"
mkdir -p "$WORK"
cd "$WORK"
[ -x "$BIN" ] || (cd "$REPO" && cargo build --release)

# 1. Data: training pairs, and four held-out conditions for the validation grids.
[ -f circles/prompt.json ] || "$BIN" dataset circles --count 4000 --size 128 --seed 0 --output circles -q
[ -f val/prompt.json ] || "$BIN" dataset circles --count 4 --size 128 --seed 99 --output val -q

VALIDATION=(
    --validation-image val/source/0.png --validation-prompt "a dark green circle on a cyan background"
    --validation-image val/source/1.png --validation-prompt "a dark blue circle on a blue background"
    --validation-image val/source/2.png --validation-prompt "a light green circle on a dark blue background"
    --validation-image val/source/3.png --validation-prompt "a brown circle on a cyan background"
    --fidelity canny
)
# The ControlNet runs: the locked base, lr 1e-3 (at 2e-4 it had not started to follow after 1500 steps), a
# small hint encoder (SD's (16,32,96,256) would cost four times the rest of this tiny network).
CONTROLNET=(--resolution 128 --batch-size 8 --learning-rate 1e-3 --cache --hint-channels 16,32,32,32)

# 2. The base, first pass.
if [ ! -f base/pass1.done ]; then
    "$BIN" train-base --dataset circles --output base --vae-steps 1500 --vae-decoder-steps 0 \
        --unet-steps 3000 --unet-ema-decay 0 -q
    touch base/pass1.done
fi

# 3. The first ControlNet run.
if [ ! -f cn-first/checkpoint-5600/manifest.json ]; then
    RESUME=()
    [ -d cn-first ] && RESUME=(--resume)
    "$BIN" train --model base/model --init --dataset circles --output cn-first "${RESUME[@]}" "${CONTROLNET[@]}" \
        --max-steps 5600 --checkpointing-steps 100 --checkpoints-total-limit 4 \
        "${VALIDATION[@]}" --validation-steps 200 -q
fi

# 4. The base, second pass: the decoder stage, then the UNet stage on from step 3000 to 5000, averaging its
#    weights from there.
#    (train-base continues a finished stage asked for more steps from its last checkpoint.)
"$BIN" train-base --dataset circles --output base --vae-steps 1500 --vae-decoder-steps 1000 \
    --unet-steps 5000 --unet-ema-decay 0.999 -q

# 5. The ControlNet on the finished base, from the first run's weights.
RESUME=()
[ -d cn-final ] && RESUME=(--resume)
"$BIN" train --model base/model --controlnet cn-first/checkpoint-5600/controlnet --dataset circles \
    --output cn-final "${RESUME[@]}" "${CONTROLNET[@]}" \
    --max-steps "$CN_STEPS" --checkpointing-steps 250 --checkpoints-total-limit 8 \
    "${VALIDATION[@]}" --validation-steps 500 -q

# 6. The ControlNet on the wide variety, from the step-6000 weights of (5), then settled at a lower rate from
#    the wide run's last weights (a fresh optimizer); every settling checkpoint scored on the validation set
#    (never the test set) to pick the shipped one.
[ -f wide/prompt.json ] || "$BIN" dataset circles --count 10000 --size 128 --seed 1 --variety wide --output wide -q
WIDE=(--model base/model --dataset wide --resolution 128 --batch-size 8 --cache --checkpointing-steps 500
    --checkpoints-total-limit 20 -q)
RESUME=()
[ -d cn-wide ] && RESUME=(--resume)
"$BIN" train "${WIDE[@]}" --controlnet "cn-final/checkpoint-$CN_STEPS/controlnet" --output cn-wide "${RESUME[@]}" \
    --learning-rate 1e-3 --seed 1 --max-steps "$WIDE_STEPS"
RESUME=()
[ -d cn-settle ] && RESUME=(--resume)
"$BIN" train "${WIDE[@]}" --controlnet "cn-wide/checkpoint-$WIDE_STEPS/controlnet" --output cn-settle "${RESUME[@]}" \
    --learning-rate 3e-4 --seed 2 --max-steps "$SETTLE_STEPS"
for step in $(seq 500 500 "$SETTLE_STEPS"); do
    echo "checkpoint $step: $("$BIN" evaluate circles --model base/model \
        --controlnet "cn-settle/checkpoint-$step/controlnet" --split validation --count 128 -q)"
done

# 7. Into the repository, and the reported figure: the test set, once.
rm -rf "$REPO/assets/demo.new" && mkdir -p "$REPO/assets/demo.new"
cp -r base/model "$REPO/assets/demo.new/base"
cp -r "cn-settle/checkpoint-$SETTLE_PICK/controlnet" "$REPO/assets/demo.new/circles-controlnet"
rm -rf "$REPO/assets/demo" && mv "$REPO/assets/demo.new" "$REPO/assets/demo"
du -sh "$REPO/assets/demo"
"$BIN" evaluate circles --split test --count 128 --base-alone --grid "$REPO/docs/demo/test-grid.png" -q
