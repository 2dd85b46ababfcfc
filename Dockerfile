# syntax=docker/dockerfile:1
# The serving image: the wheel (code and the shipped ONNX weights) and its runtime dependencies
# on a slim Python, run by an unprivileged user. tests/test_image.py installs exactly what the
# runtime stage installs into a fresh virtualenv, serves from it and measures it.
#
#   docker build -t mnist-service:0.1.0 .
#   docker run --rm -p 50051:50051 -p 8080:8080 --cpus 2 -e MNIST_WORKERS=2 mnist-service:0.1.0

# Pinned to a patch release; pin the digest too (python:3.11.13-slim-bookworm@sha256:...) where
# the build can reach the registry, so a rebuild gets the same base.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Build: only the wheel. hatchling comes from pip's isolated build environment and stays here.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mnist_service/ mnist_service/
COPY weights/mnist_convnet.onnx weights/mnist_mlp.onnx weights/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# Runtime: the wheel with no extras (no torch, no test tools, no compilers), in a virtualenv
# without pip; the base image's own pip, setuptools and wheel are removed afterwards.
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    PATH=/opt/mnist-service/bin:$PATH \
    MNIST_LOG_FORMAT=json
# pip compiles the .pyc files here, at build time: the root filesystem is read-only when
# deployed (deploy/kubernetes), and PYTHONDONTWRITEBYTECODE stops attempts to write them there.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    python -m venv --without-pip /opt/mnist-service \
    && python -m pip --python /opt/mnist-service/bin/python --disable-pip-version-check \
        install --no-cache-dir /dist/mnist_service-*.whl \
    && python -m pip --disable-pip-version-check uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 mnist \
    && useradd --system --uid 10001 --gid mnist --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin mnist
# Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
WORKDIR /opt/mnist-service

# gRPC; HTTP (the JSON API, Open Inference Protocol REST, the page).
EXPOSE 50051 8080
# SIGTERM starts the drain: health turns NOT_SERVING, new connections are refused, in-flight calls
# get --grace-period seconds. Python as PID 1 is fine: the server handles SIGTERM and SIGINT
# itself and waits for its own worker processes.
STOPSIGNAL SIGTERM
# Exits 0 only while grpc.health.v1 says SERVING; follow the port if you change --address.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "mnist_service", "health", "--address", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["python", "-m", "mnist_service"]
# IPv4 wildcard: Docker's default networks and most Kubernetes clusters are IPv4, and Docker
# disables IPv6 inside containers on networks without it. For IPv6 or dual-stack, pass
# --address [::]:50051 --http-address [::]:8080 (one socket each, both families, where the
# kernel has IPv6).
CMD ["serve", "--address", "0.0.0.0:50051", "--http-address", "0.0.0.0:8080"]
