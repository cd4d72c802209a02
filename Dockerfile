# syntax=docker/dockerfile:1.7
# midashenglm-serve: the OpenAI-compatible gateway and vLLM 0.26.0 (torch 2.11, CUDA 13).
#
#   docker build -t midashenglm-serve:0.1.0 .
#   docker run --gpus 1 --shm-size 16g -p 8000:8000 --stop-timeout 60 \
#     -v /srv/models/midashenglm-7b:/models:ro -v mdl-cache:/cache \
#     -e MDL_API_KEYS=change-me midashenglm-serve:0.1.0
#
# Every server setting is an `MDL_*` environment variable or a `mdl-serve serve` flag
# (arguments after the image name replace CMD, e.g. `serve --max-num-seqs 256`).
# Two stages share one base so the virtual environment built in the first runs unchanged
# in the second; the second carries no pip caches and no build-only packages.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS builder
# Must equal the `gpu` extra of pyproject.toml (a test checks it).
ARG VLLM_VERSION=0.26.0
# Optional extra index for torch wheels (e.g. a mirror); empty uses PyPI's cu130 wheels.
ARG PIP_EXTRA_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's versions within the release are what we want; pinning them breaks on every
# security update of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
# The heavy layer (vllm, torch, CUDA wheels) first: source edits do not invalidate it.
RUN pip install --no-cache-dir "vllm==${VLLM_VERSION}"
WORKDIR /src
COPY . .
# `mdl-serve --help` and the entry-point check fail the build if the install is broken.
# The project itself: its dependency pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu]" \
    && mdl-serve --help > /dev/null \
    && python -c "from importlib.metadata import entry_points as e; \
assert 'mdlserve.model_plugin:register' in [p.value for p in e(group='vllm.general_plugins')]"

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime
ARG UID=10001
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# tini: PID 1 that forwards SIGTERM to mdl-serve (which drains) and reaps zombies. It is
# used without -g: the engine's worker processes are stopped by the gateway, not signalled.
# gcc, libc6-dev, python3.12-dev: Triton compiles its CUDA launcher stubs at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-dev gcc libc6-dev tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${UID}" mdl \
    && useradd --uid "${UID}" --gid "${UID}" --create-home --home-dir /home/mdl \
        --shell /usr/sbin/nologin mdl \
    && mkdir -p /models /cache \
    && chown "${UID}:${UID}" /models /cache
COPY --from=builder /opt/venv /opt/venv
# /models: the checkpoint directory (mount read-only). /cache: vLLM's torch.compile cache,
# Triton's kernels and other caches; keep it on a volume so restarts skip compilation
# (~35 s instead of ~150 s). OMP_NUM_THREADS=1: one torch CPU thread per process (the
# engine's input copies stall under OpenMP contention otherwise; docs/benchmarks.md).
ENV PATH=/opt/venv/bin:${PATH} \
    OMP_NUM_THREADS=1 \
    HOME=/home/mdl \
    PYTHONUNBUFFERED=1 \
    MDL_HOST=0.0.0.0 \
    MDL_PORT=8000 \
    MDL_MODEL=/models \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER ${UID}:${UID}
WORKDIR /home/mdl
VOLUME ["/models", "/cache"]
EXPOSE 8000
STOPSIGNAL SIGTERM
# Liveness only (the process answers); readiness (/health/ready) is for load balancers.
# The start period covers a cold engine start of the 7B model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('MDL_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "mdl-serve"]
CMD ["serve"]
