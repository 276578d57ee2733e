#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with PyTorch and whisper-orpo (editable, with test tools).
#   bash scripts/setup.sh            # then: . .venv/bin/activate
# TORCH_SPEC picks the PyTorch build (default torch==2.13.0; PyPI serves the CUDA build on Linux x86_64).
# EXTRAS picks the optional features (default dev,deepspeed,export: test tools, DeepSpeed, CTranslate2; as CI), e.g.
# EXTRAS=dev,deepspeed,quantization,export.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,deepspeed,export}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, transformers, accelerate, orpo; print('whisper-orpo ready: torch', torch.__version__, '| transformers', transformers.__version__, '| CUDA', torch.cuda.is_available())"
