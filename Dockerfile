# whisper-orpo for NVIDIA GPUs: the README's set-up (scripts/setup.sh) with the DeepSpeed, export and bitsandbytes extras.
#
#   docker build -t whisper-orpo .
#   docker run --rm whisper-orpo                                   # train.py --help
#   docker run --rm --gpus all --ipc=host -v "$PWD/data:/data" -v "$PWD/outputs:/workspace/whisper-orpo/outputs" \
#       whisper-orpo --config_file accelerate_configs/multi_gpu.yaml train.py --config recipes/whisper-small/orpo-full/config.yaml \
#       --train_data /data/train.jsonl --test_data /data/test.jsonl
#
# The entrypoint is `accelerate launch`: arguments are its flags (--config_file, --num_processes, ...), then
# train.py and the recipe keys. PyTorch comes from PyPI exactly as in scripts/setup.sh (TORCH_SPEC, default
# torch==2.13.0: the CUDA build, with its own CUDA libraries); the base image gives the CUDA user-space stack
# that the NVIDIA container toolkit pairs with the host driver. The driver must support the CUDA version of
# that PyTorch build. BASE_IMAGE can name a -devel image to JIT-build DeepSpeed's CUDA ops (not needed: the
# trainer uses torch's AdamW under every launch configuration).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG EXTRAS=deepspeed,export,quantization
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

# Python for the virtual environment; versions come with the base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/whisper-orpo

# Dependencies first (cached while only the code changes): the project metadata, the set-up script and an
# empty package, installed with the README's set-up command.
COPY pyproject.toml README.md ./
COPY scripts/setup.sh scripts/setup.sh
RUN mkdir -p orpo && touch orpo/__init__.py \
    && FETCH_DEMO_MODEL=0 EXTRAS="${EXTRAS}" bash scripts/setup.sh

# The code itself (the editable install above points at this folder).
COPY . .
ENV PATH=/workspace/whisper-orpo/.venv/bin:${PATH}
RUN python -c "import orpo.train.loop, deepspeed, bitsandbytes" \
    && accelerate launch --help > /dev/null

ENTRYPOINT ["accelerate", "launch"]
CMD ["train.py", "--help"]
