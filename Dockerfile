# syntax=docker/dockerfile:1
# lineinspect worker image, two flavours from one file (deploy/README.md, "Docker Compose (one host)"):
#   docker build --build-arg BASE=slim -t lineinspect:slim .                  # ingest and sink: python slim, CPU torch
#   docker build --build-arg BASE=cuda --build-arg EXTRAS=gpu -t lineinspect:cuda .   # scoring workers: CUDA runtime
# BuildKit builds only the stages the chosen BASE needs. The entrypoint is the `lineinspect` CLI; the container's
# command is the subcommand (ingest | score-worker | sink ...). Workers serve /healthz, /livez and /metrics on 9102.
# Give containers a stop grace period of 45 s (Docker's default is 10 s; compose.yaml sets it): a worker drains for up
# to worker.drain_timeout_s (25 s), and with Redis stalled its exit takes ~11 s more (tests/deploy/conftest.py).
ARG BASE=slim

FROM python:3.11-slim-bookworm AS base-slim
# CPU-only torch wheels: a few hundred MB instead of the CUDA build's several GB (ingest and sink never run a model).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 AS base-cuda
# Empty: torch from the default index, whose Linux wheels are the CUDA 12 build.
ARG TORCH_INDEX_URL=
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL} DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgl1 libglib2.0-0 \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/*

FROM base-${BASE} AS build
# EXTRAS=gpu adds faiss-gpu-cu12 (pyproject's gpu extra) for the cuda flavour.
ARG EXTRAS=
RUN python -m venv /opt/lineinspect
ENV PATH=/opt/lineinspect/bin:$PATH
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml ./
COPY deploy/constraints.txt deploy/constraints.txt
COPY pipeline pipeline
COPY workers workers
COPY models models
RUN pip install --no-cache-dir -c deploy/constraints.txt ".${EXTRAS:+[$EXTRAS]}"

FROM base-${BASE} AS runtime
COPY --from=build /opt/lineinspect /opt/lineinspect
COPY config.toml /etc/lineinspect/config.toml
RUN groupadd --system --gid 10001 lineinspect \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/lineinspect --create-home lineinspect \
 && mkdir -p /var/lib/lineinspect/heatmaps && chown -R lineinspect:lineinspect /var/lib/lineinspect
# LINEINSPECT_ROLE (ingest | score | sink) tells the health check which heartbeat is this container's; the worker's
# default name is <hostname>-<role>, so do not pass --name to workers in containers.
ENV PATH=/opt/lineinspect/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/lineinspect \
    LINEINSPECT_ROLE=score \
    LINEINSPECT__WORKER__HEALTH_PORT=9102 \
    LINEINSPECT__SINK__METRICS_PORT=9102 \
    LINEINSPECT__SINK__HEATMAP_DIR=/var/lib/lineinspect/heatmaps
USER 10001:10001
WORKDIR /var/lib/lineinspect
EXPOSE 9102
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
  CMD lineinspect check --config /etc/lineinspect/config.toml --role "$LINEINSPECT_ROLE" --name "$HOSTNAME-$LINEINSPECT_ROLE" >/dev/null || exit 1
ENTRYPOINT ["lineinspect"]
CMD ["--help"]
