# syntax=docker/dockerfile:1
#
# imagesearch: the gRPC server, CPU-only torch, running as a non-root user.
#
#   docker build -t imagesearch .                                   weights downloaded at first start (or mounted)
#   docker build -t imagesearch --build-arg PRELOAD_MODEL=true .    weights baked into the image
#   docker build -t imagesearch --build-arg MODEL=ViT-L-14:laion2b_s32b_b82k --build-arg PRELOAD_MODEL=true .
#
# Volumes: /data (the embedded store; unused with IMAGESEARCH_QDRANT_URL) and /models (HF_HOME, the weights cache).
# See docs/deployment.md for the model options, compose and Kubernetes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The open_clip model spec (IMAGESEARCH_MODEL of the image) and whether to download its weights at build time.
ARG MODEL=ViT-B-32:laion2b_s34b_b79k
ARG PRELOAD_MODEL=false

# ---- build: a venv with CPU-only torch and the project, no dev extras -------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The same script CI can run outside Docker (deploy/install-venv.sh), one step per layer: torch is most of the
# image and changes far less often than the source, so a source edit does not download it again.
COPY deploy/install-venv.sh deploy/
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_PACKAGES="torch torchvision"
RUN --mount=type=cache,target=/root/.cache/pip bash deploy/install-venv.sh /opt/venv torch
COPY pyproject.toml README.md ./
COPY src/ src/
RUN --mount=type=cache,target=/root/.cache/pip bash deploy/install-venv.sh /opt/venv project

# ---- weights: with PRELOAD_MODEL=true, load the model once so its weights land in the cache the runtime reads ---
FROM build AS weights
ARG MODEL
ARG PRELOAD_MODEL
ENV HF_HOME=/models
RUN mkdir -p /models && case "$PRELOAD_MODEL" in \
      true) /opt/venv/bin/python -c \
              'import sys; from imagesearch.model.encoder import ClipEncoder; ClipEncoder.load(sys.argv[1], device="cpu")' \
              "$MODEL" ;; \
      false) ;; \
      *) echo "PRELOAD_MODEL must be true or false, not '$PRELOAD_MODEL'" >&2; exit 1 ;; \
    esac

# ---- runtime ----------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG MODEL
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER, and volume ownership
# (fsGroup, chown on the host) can name it.
RUN groupadd --system --gid 10001 imagesearch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/imagesearch --create-home \
      --shell /usr/sbin/nologin imagesearch \
 && mkdir -p /data /models \
 && chown 10001:10001 /data /models
COPY --from=build /opt/venv /opt/venv
COPY --from=weights --chown=10001:10001 /models /models
COPY --chmod=755 deploy/healthcheck.py /usr/local/bin/imagesearch-healthcheck
# PYTHONDONTWRITEBYTECODE: pip compiled the venv at install time, and the root filesystem may be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models \
    IMAGESEARCH_MODEL=${MODEL} \
    IMAGESEARCH_DATA_DIR=/data \
    IMAGESEARCH_HTTP_PORT=8080 \
    IMAGESEARCH_METRICS_PORT=9464
# Declared after the chown above, so a fresh named volume starts with this ownership and content (the baked
# weights, with PRELOAD_MODEL=true).
VOLUME ["/data", "/models"]
USER 10001:10001
WORKDIR /home/imagesearch
# gRPC, HTTP/JSON (Connect protocol, /healthz, /docs), Prometheus /metrics
EXPOSE 50051 8080 9464
# The gRPC health service, and GET /healthz on the HTTP/JSON port while IMAGESEARCH_HTTP_PORT is set, through a
# small script on the service's own dependencies (no probe binary). The start period covers loading the model, or
# downloading it at first start (~600 MB for the default).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["imagesearch-healthcheck"]
ENTRYPOINT ["imagesearch"]
CMD ["serve"]
