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
# Two stages. The Python side is not compiled (every dependency is a wheel), so it is one stage: a build stage
# would only drop pip itself (~15 MB) while copying the multi-GB venv between stages. Layer order does the real
# work: torch, then the dependencies read from pyproject.toml, then the source, so editing the source rebuilds
# only the last, small layers. The one compiled part, llama.cpp's quantizer (GGUF k-quant exports), is built in
# a stage of its own so cmake and the compiler stay out of the image.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# llama.cpp from the C++ source vendored in the llama-cpp-python sdist (trainer/export/llama_cpp_build.py: CPU only,
# static, AVX2 baseline): llama-quantize and llama-completion, plus llama.cpp's converter (convert_hf_to_gguf.py,
# conversion/, gguf-py/), so `lora-workbench export --format gguf` fetches nothing and does q4_k_m, q5_k_m, q6_k.
# It compiles for 9-18 minutes on 2 cores (measured on the project's shared machine, busy: 562 s at load 6-8, 1047 s
# in this stage at load 20) and adds 20 MB to the image. `--build-arg LLAMA_CPP=` (empty) skips it, as the tests'
# image does: that image fetches the converter on first use and exports f16, bf16 and q8_0 only.
# Offline builds: mount a directory holding the sdist on /tmp/sdist (podman build -v DIR:/tmp/sdist:ro).
FROM ${BASE_IMAGE} AS llama-cpp
ARG LLAMA_CPP=1
# The same pin as trainer/export/llama_cpp.py (VERSION, SDIST_SHA256).
ARG LLAMA_CPP_VERSION=0.3.36
ARG LLAMA_CPP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
ARG PIP_EXTRA_ARGS=""
ARG DEBIAN_FRONTEND=noninteractive
COPY trainer/export/llama_cpp_build.py /tmp/llama_cpp_build.py
RUN mkdir -p /opt/llama.cpp && case "$LLAMA_CPP" in \
        "") exit 0 ;; 1) ;; *) echo "LLAMA_CPP=$LLAMA_CPP: 1 builds llama.cpp, empty skips it" >&2; exit 1 ;; esac \
    && apt-get update \
    && apt-get install -y --no-install-recommends cmake g++ make python3 python3-venv ca-certificates \
    && vendored="llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp" \
    && sdist="/tmp/sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" \
    && if [ ! -f "$sdist" ]; then python3 -m venv /tmp/venv && /tmp/venv/bin/pip download $PIP_EXTRA_ARGS \
        --no-deps --no-binary llama-cpp-python -d /tmp/sdist "llama-cpp-python==$LLAMA_CPP_VERSION"; fi \
    && echo "$LLAMA_CPP_SHA256  $sdist" | sha256sum -c - \
    && python3 /tmp/llama_cpp_build.py "$sdist" /opt/llama.cpp --jobs "$(nproc)" \
    && tar -xzf "$sdist" -C /opt/llama.cpp --strip-components=3 --no-same-owner \
        "$vendored/convert_hf_to_gguf.py" "$vendored/conversion" "$vendored/gguf-py" \
    && /opt/llama.cpp/bin/llama-completion --version

FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# libtcmalloc-minimal4: training processes re-execute on it (trainer/run/lean_memory.py: glibc's malloc fragments
# activations, ~1 GB over live on the built-in model on a CPU)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates libtcmalloc-minimal4 \
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

# llama.cpp (empty when built with LLAMA_CPP=): after the venv, so rebuilding it reinstalls nothing.
ARG LLAMA_CPP=1
COPY --from=llama-cpp /opt/llama.cpp /opt/llama.cpp
ENV LLAMA_CPP_DIR=${LLAMA_CPP:+/opt/llama.cpp} LLAMA_QUANTIZE=${LLAMA_CPP:+/opt/llama.cpp/bin/llama-quantize} \
    PATH=$PATH:/opt/llama.cpp/bin

# The source with its bundled presets/, data/, examples/ and benchmarks/. Editable install because the
# package finds presets/ and data/ next to itself (trainer/config/paths.py: PROJECT_ROOT is the parent of trainer/).
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
