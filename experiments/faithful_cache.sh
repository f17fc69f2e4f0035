#!/usr/bin/env bash
# Issue 10: what caching costs CAFE. Online encoder (the official computation) vs the clean cache (image + flip)
# vs the cache with K = 4, 8, 16 augmented views, 3 seeds each, for one frozen encoder.
#
#   bash experiments/faithful_cache.sh ENCODER OUT [EPOCHS]
#   TAG=-std EXTRA="--feature-norm standardize" bash experiments/faithful_cache.sh ENCODER OUT 20
#
# Scaled down to this 2-core CPU (say so next to every number): FERPlus train subset of 600 images -> FERPlus
# test subset (600) and muxspace subset (800), 48 px cached images, ResNet-18 from scratch at 48 px, EPOCHS
# epochs (default 10), batch 32, the official recipe's defaults otherwise. The subsets' manifests are
# OUT/ferplus_small.toml and OUT/muxspace_small.toml (python experiments/faithful_subsets.py ...).
# Needs $DATA (../shared/data/fer). Two runs go side by side, one CPU thread each.
set -euo pipefail
ENC=${1:?encoder, e.g. efficientnet-lite0}
OUT=${2:?output folder (outside the repo)}
EPOCHS=${3:-10}
DATA=${DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/fer}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$OUT"

# stores: the clean one, then K = 4 -> 8 -> 16 views added incrementally to copies
CLEAN=$OUT/$ENC.h5
for d in ferplus muxspace; do
  featcache build --dataset "$OUT/${d}_small.toml" --root "$DATA/$d" --cache "$CLEAN" --model "$ENC" \
    --image-size 48 --on-error skip --quiet
done
prev=$CLEAN
for k in 4 8 16; do
  s=$OUT/$ENC-aug$k.h5
  if [ ! -e "$s" ]; then
    cp "$prev" "$s.part" && mv "$s.part" "$s"
  fi
  /usr/bin/time -f "build K=$k: %e s" featcache build --dataset "$OUT/ferplus_small.toml" --root "$DATA/ferplus" \
    --cache "$s" --model "$ENC" --image-size 48 --aug-views $k --quiet 2>>"$OUT/$ENC-build-times.txt"
  prev=$s
done

common=(--method cafe --train ferplus --test ferplus,muxspace --image-size 48 --epochs "$EPOCHS" --batch-size 32
        --device cpu ${EXTRA:-})
RUNS=$OUT/runs/$ENC${TAG:-}
run() {  # NAME SEED extra...
  local name=$1 seed=$2; shift 2
  maskfer train "${common[@]}" --seed "$seed" --out "$RUNS/$name-s$seed" "$@" \
    > "$RUNS/$name-s$seed.log" 2>&1 || echo "FAILED $name-s$seed"
}
mkdir -p "$RUNS"
for seed in 0 1 2; do
  run online "$seed" --cache "$CLEAN" --online-encoder &
  run clean "$seed" --cache "$CLEAN" --views clean
  for k in 4 8 16; do
    run aug$k "$seed" --cache "$OUT/$ENC-aug$k.h5" --views augmented
  done
  wait
done
maskfer train --method linear-probe --train ferplus --test ferplus,muxspace --cache "$CLEAN" --device cpu \
  --out "$OUT/runs/$ENC/probe" > "$OUT/runs/$ENC/probe.log" 2>&1
python "$(dirname "$0")/summarize_runs.py" "$RUNS"/*-s[0-9]
