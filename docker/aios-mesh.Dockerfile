# syntax=docker/dockerfile:1
# aios-mesh: the five services (python -m services.<name>), the `aios` CLI and
# the topics job (python -m services.common.topics apply). Build from the
# repository root:
#   docker build -f docker/aios-mesh.Dockerfile -t aios-mesh:0.2.0 .
#
# Stage 1 resolves every dependency from the lock and generates the gRPC code;
# stage 2 gets only the virtualenv and the source: no compiler, no pip in the
# virtualenv, no grpcio-tools.

FROM python:3.11.7-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY constraints.txt docker/mesh.requirements.in docker/gen.requirements.in ./

# The virtualenv carries no pip of its own: the builder's pip installs into it.
# grpcio-tools goes into the builder's interpreter only, to run protoc.
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-compile -c constraints.txt -r mesh.requirements.in \
    && pip install --no-compile -c constraints.txt -r gen.requirements.in

WORKDIR /app
COPY proto/ proto/
RUN mkdir -p gen \
    && python -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen \
        proto/aiosmesh/v1/*.proto \
    && touch gen/aiosmesh/__init__.py gen/aiosmesh/v1/__init__.py \
    && rm -rf proto

COPY schemas/ schemas/
COPY workflows/ workflows/
COPY policies/ policies/
COPY services/ services/
COPY tools/__init__.py tools/__init__.py
COPY tools/aios/ tools/aios/

# Inference runs from its own image; `aios` is a plain script (the code runs
# from /app, where services.common finds schemas/ next to it). Byte-compiled
# here because the root filesystem is read-only at run time.
RUN rm -rf services/inference \
    && printf '%s\n' '#!/opt/venv/bin/python' 'import sys' 'from tools.aios.cli import main' \
        'sys.exit(main())' > /opt/venv/bin/aios \
    && chmod 0755 /opt/venv/bin/aios \
    && /opt/venv/bin/python -m compileall -q /app /opt/venv/lib

FROM python:3.11.7-slim-bookworm

LABEL org.opencontainers.image.title="aios-mesh" \
      org.opencontainers.image.description="AIOS mesh services, CLI and topics job" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid so Kubernetes can prove runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 aios \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin aios

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

WORKDIR /app
USER 10001:10001
EXPOSE 50051 9101
CMD ["aios", "status"]
