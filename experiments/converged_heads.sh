#!/usr/bin/env bash
# Issue 8's cross-dataset table (docs/results.md, "Converged heads"): FERPlus Train subset -> FERPlus Test
# subset and muxspace, for the converged linear probe, the linear head, the end-to-end baseline and CAFE
# (paper recipe, with standardized features, and without the learning-rate decay), 3 seeds each, on one store.
#   STORE=runs/realdata/effnet.h5 OUT=runs/issue8/effnet bash experiments/converged_heads.sh
# The store needs ferplus (the 2 k subset of experiments/realdata_effnet.sh) and muxspace, with 48 px images.
# EPOCHS (default 20) applies to baseline and CAFE; the linear heads run the paper's 60.
# PARTS chooses what runs, in order (default: all): probe heads baseline cafe cafe-std cafe-nodecay baseline-nodecay.
set -euo pipefail
STORE=${STORE:?set STORE to a feature store with ferplus and muxspace}
OUT=${OUT:?set OUT to an output directory}
EPOCHS=${EPOCHS:-20}
SEEDS=${SEEDS:-"0 1 2"}
PARTS=${PARTS:-"probe heads baseline cafe cafe-std cafe-nodecay baseline-nodecay"}
mkdir -p "$OUT"
COMMON=(--cache "$STORE" --train ferplus --test ferplus,muxspace --image-size 48 --quiet)
for part in $PARTS; do
  for s in $SEEDS; do
    case $part in
      probe) maskfer train "${COMMON[@]}" --method linear-probe --seed "$s" --out "$OUT/linear-probe-s$s" ;;
      heads)  # CAFE's classifier without the mask, under the paper's schedule and without its decay
        maskfer train "${COMMON[@]}" --method linear-head --epochs 60 --seed "$s" --out "$OUT/head-paper-s$s"
        maskfer train "${COMMON[@]}" --method linear-head --epochs 60 --gamma 1 --seed "$s" --out "$OUT/head-nodecay-s$s" ;;
      baseline) maskfer train "${COMMON[@]}" --method baseline --epochs "$EPOCHS" --seed "$s" --out "$OUT/baseline-paper-s$s" ;;
      cafe) maskfer train "${COMMON[@]}" --method cafe --epochs "$EPOCHS" --seed "$s" --out "$OUT/cafe-paper-s$s" ;;
      cafe-std) maskfer train "${COMMON[@]}" --method cafe --epochs "$EPOCHS" --feature-norm standardize --seed "$s" --out "$OUT/cafe-std-s$s" ;;
      cafe-nodecay) maskfer train "${COMMON[@]}" --method cafe --epochs "$EPOCHS" --gamma 1 --seed "$s" --out "$OUT/cafe-nodecay-s$s" ;;
      baseline-nodecay) maskfer train "${COMMON[@]}" --method baseline --epochs "$EPOCHS" --gamma 1 --seed "$s" --out "$OUT/baseline-nodecay-s$s" ;;
      *) echo "unknown part $part" >&2; exit 2 ;;
    esac
  done
done
python experiments/summarize_runs.py "$OUT"/*-s[0-9]*
