#!/usr/bin/env bash
# Set-up and the main job on the embedded default: generated demo data -> featcache build ->
# maskfer train -> cross-domain table. Uses openai/clip-vit-base-patch32 when reachable, else
# (offline) a tiny random CLIP, and says so. Output in demo_out/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
maskfer demo --out "${DEMO_OUT:-demo_out}" "$@"
