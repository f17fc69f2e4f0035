#!/usr/bin/env bash
# Creates .venv and installs the project with its test extras. Sourced by scripts/demo.sh and .ci/run.
# TORCH_SPEC: which torch to install first. The default pin takes the CPU wheel on this project's
# machines; an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test,efficientnet,report]"
