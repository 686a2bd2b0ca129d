# LoRA Workbench for a GPU box.
#   LORA_WORKBENCH_AUTH=me:secret docker compose up -d        (compose.yaml; or:)
#   docker build -t lora-workbench . && docker run --gpus all -p 7860:7860 -e LORA_WORKBENCH_AUTH=me:secret lora-workbench
#
# Base: the CUDA 13.0 image, because PyPI's torch 2.13.0 for Linux x86_64 is the cu130 build (it pulls
# nvidia-cuda-runtime 13.0, cuBLAS, cuDNN, NCCL as pip packages). The "base" flavour is enough: those pip
# packages bring every CUDA library torch and bitsandbytes load, so "runtime"/"cudnn" would add ~2-3 GB
# of duplicates. What the base image adds is what the NVIDIA container toolkit reads: NVIDIA_VISIBLE_DEVICES,
# NVIDIA_DRIVER_CAPABILITIES and NVIDIA_REQUIRE_CUDA (a driver older than CUDA 13.0, i.e. < 580, gets a
# clear error at start instead of a late "no CUDA GPUs"). The tests build this same file on a local
# Debian base: --build-arg BASE_IMAGE=localhost/lwb-debian-base.
#
# One stage on purpose: nothing here is compiled (every dependency is a wheel), so a build stage would only
# drop pip itself (~15 MB) while copying the multi-GB venv between stages. Layer order does the real work:
# torch, then the dependencies read from pyproject.toml, then the source, so editing the source rebuilds
# only the last, small layers.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A venv keeps pip away from the distribution's Python (PEP 668) and puts lora-workbench on PATH.
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 LANG=C.UTF-8
RUN python3 -m venv /opt/venv

# torch first, on its own layer: the GPU image takes PyPI's CUDA build; the tests pass the CPU build
# (TORCH_SPEC=torch==2.13.0+cpu) and PIP_EXTRA_ARGS="--no-index --find-links /wheels" for a local wheel cache.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
ARG PIP_EXTRA_ARGS=""
RUN pip install $PIP_EXTRA_ARGS --index-url "$TORCH_INDEX" "$TORCH_SPEC"

# The dependencies (and the build backend) from pyproject.toml alone, before the source is copied: a source
# change does not reinstall them. torch is already there and satisfies its range, so it stays as installed.
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb")); \
print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]))' > /tmp/requirements.txt \
    && pip install $PIP_EXTRA_ARGS -r /tmp/requirements.txt \
    && rm /tmp/pyproject.toml /tmp/requirements.txt

# The source with its bundled presets/, data/, examples/ and benchmarks/. Editable install because the
# package finds presets/ and data/ next to itself (trainer/paths.py: PROJECT_ROOT is the parent of trainer/).
WORKDIR /app
COPY . /app
RUN pip install $PIP_EXTRA_ARGS --no-deps --no-build-isolation -e /app \
    && python3 -m compileall -q /app/app /app/trainer

# Run as a non-root user that owns only /data: the runs dir and the model cache are volumes, the code is
# read-only to it. A high uid avoids the base images' own users (ubuntu:24.04 has uid 1000).
ARG APP_UID=10001
RUN useradd --uid "$APP_UID" --user-group --create-home --shell /usr/sbin/nologin workbench \
    && mkdir -p /data/runs /data/hf-cache /data/datasets \
    && chown -R workbench:workbench /data
ENV HF_HOME=/data/hf-cache GRADIO_ANALYTICS_ENABLED=False
VOLUME ["/data/runs", "/data/hf-cache"]
USER workbench
# Relative paths land in /data: `lora-workbench train /app/examples/tiny-lora.yaml` writes to /data/runs.
WORKDIR /data

EXPOSE 7860
# The page answers 200 (the login form) with auth on too. start-period covers the torch/gradio imports.
HEALTHCHECK --interval=30s --timeout=10s --start-period=90s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=8)"]

# 0.0.0.0 so the published port reaches it; the server then refuses to start without credentials:
# set LORA_WORKBENCH_AUTH=USER:PASS at run time (never in this file: nothing secret is baked in).
# The page reads data files only inside its roots: the runs dir, the bundled data, and /data/datasets (mount yours).
CMD ["lora-workbench", "ui", "--host", "0.0.0.0", "--runs-dir", "/data/runs", "--data-dir", "/data/datasets"]
