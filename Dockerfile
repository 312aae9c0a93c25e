# syntax=docker/dockerfile:1.7
#
# alignd images, two targets from one file:
#
#   api     python slim, no torch. `alignd api`, `alignd db upgrade` (the migration Job) and the
#           default-queue worker (`alignd worker --queues default --beat`: webhooks, housekeeping).
#   worker  CUDA runtime. GPU workers (`alignd worker --queues gpu`), the rerank worker, and vLLM
#           serving (`alignd vllm --base-model NAME`, which execs `vllm serve`). One environment,
#           /opt/alignd: alignd with torch, TRL, PEFT, llm-blender, DeepSpeed and vLLM (the `train`
#           and `gpu` extras). pyproject.toml's pins are chosen so vLLM 0.32.0 installs beside
#           alignd: it pins torch 2.13.0, transformers < 5.20 and FastAPI < 0.137.
#
#   docker build --target api    -t alignd-api:0.1.0 .
#   docker build --target worker -t alignd-worker:0.1.0 .
#
# Both keep the source tree at /app with an editable install: `alignd db upgrade` finds
# alembic.ini next to the packages, and the deploy/ scripts (probes, preStop, accelerate and
# DeepSpeed configs) are at /app/deploy. Nothing secret is baked in: every setting comes from the
# environment at run time. Both run as uid 10001.

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv


FROM python:3.11.18-slim-trixie AS api

COPY --from=uv /uv /usr/local/bin/uv
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    VIRTUAL_ENV=/opt/alignd \
    PATH=/opt/alignd/bin:$PATH \
    HOME=/var/lib/alignd \
    ALIGND_HOME=/var/lib/alignd \
    ALIGND_MODEL_ROOT=/models \
    ALIGND_ARTIFACT_ROOT=/artifacts

# The mount points exist and belong to the service user, so a fresh named volume (compose) or an
# fsGroup volume (Kubernetes) is writable by it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/alignd --shell /usr/sbin/nologin alignd \
 && mkdir -p /var/lib/alignd /artifacts /models \
 && chown 10001:10001 /var/lib/alignd /artifacts /models

WORKDIR /app

# Dependencies first, from pyproject.toml alone: source edits do not reinstall them.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv venv /opt/alignd --python /usr/local/bin/python3.11 \
 && uv pip install --python /opt/alignd/bin/python -r pyproject.toml

COPY alembic.ini ./
COPY alignd ./alignd
COPY app ./app
COPY migrations ./migrations
COPY workers ./workers
COPY deploy ./deploy
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/alignd/bin/python --no-deps --editable .

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["alignd"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]


# torch 2.13.0 wheels from PyPI are built for CUDA 13 and bring their own CUDA libraries; the base
# image supplies the matching runtime and the NVIDIA_* variables the container toolkit reads to
# mount the host driver (>= 580 for CUDA 13).
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS worker

ARG PYTHON_VERSION=3.11.18
ARG DEEPSPEED_VERSION=0.19.8

COPY --from=uv /uv /usr/local/bin/uv
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    VIRTUAL_ENV=/opt/alignd \
    PATH=/opt/alignd/bin:$PATH \
    HOME=/var/lib/alignd \
    ALIGND_HOME=/var/lib/alignd \
    ALIGND_MODEL_ROOT=/models \
    ALIGND_ARTIFACT_ROOT=/artifacts \
    XDG_CACHE_HOME=/var/cache/alignd \
    TRITON_CACHE_DIR=/var/cache/alignd/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/alignd/torchinductor \
    DS_BUILD_OPS=0

# /var/cache/alignd: Hugging Face, vLLM, Triton and torch.compile caches, worth a volume of its
# own (compiled kernels make the next start faster).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/alignd --shell /usr/sbin/nologin alignd \
 && mkdir -p /var/lib/alignd /var/cache/alignd /artifacts /models \
 && chown 10001:10001 /var/lib/alignd /var/cache/alignd /artifacts /models

WORKDIR /app

COPY pyproject.toml README.md ./
# DeepSpeed installs without compiled ops (DS_BUILD_OPS=0): ZeRO-3 without offload, with the
# HF Trainer's own AdamW (deploy/deepspeed/zero3.json has no "optimizer" block), needs none.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv python install "${PYTHON_VERSION}" \
 && uv venv /opt/alignd --python "${PYTHON_VERSION}" \
 && uv pip install --python /opt/alignd/bin/python -r pyproject.toml --extra train --extra gpu \
        "deepspeed==${DEEPSPEED_VERSION}"

COPY alembic.ini ./
COPY alignd ./alignd
COPY app ./app
COPY migrations ./migrations
COPY workers ./workers
COPY deploy ./deploy
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/alignd/bin/python --no-deps --editable .

USER 10001:10001
# As a GPU worker: healthy while the Celery heartbeat file is fresh. As a vLLM server the
# orchestrator's own probe (GET /health on port 8000) replaces this one.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
    CMD ["/app/deploy/scripts/worker-heartbeat-check.sh", "120"]
ENTRYPOINT ["alignd"]
CMD ["worker", "--queues", "gpu"]
