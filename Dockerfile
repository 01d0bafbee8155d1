# syntax=docker/dockerfile:1
# One image for all three services (user, order, payment); the Kubernetes container command picks one:
#   python -m shop_mesh.services.user | python -m shop_mesh.services.order | python -m shop_mesh.services.payment
# Why one image: the services share shop_mesh/services/common, the generated stubs and one dependency set
# (pyproject.toml), so one build, one scan and one SBOM cover the fleet, and a shared-code fix cannot reach
# one service without the others. Build:  docker build -t REGISTRY/shop-mesh:TAG .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install into a self-contained virtualenv (every dependency ships manylinux wheels) ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# generated/ (protoc output, committed) is the client distribution shop-mesh-api (the `shop` package); the
# server distribution (.) depends on it, so both are installed from here, never from an index.
COPY generated/ generated/
# The services only: shop_mesh/mesh/ and shop_mesh/bench/ are tools (extras [mesh], [bench]) that the runtime never imports.
COPY shop_mesh/__init__.py shop_mesh/
COPY shop_mesh/services/ shop_mesh/services/
# A regular (non-editable) install: the runtime stage needs the venv only, not the source tree.
# Bytecode is compiled here because the root filesystem is read-only at run time.
RUN pip install --no-compile ./generated . \
    && python -m compileall -q -j 0 /opt/venv \
    && pip uninstall --yes pip

# ---- runtime: the slim base, the venv, a non-root user; no build tools, no pip ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="shop-mesh" \
      org.opencontainers.image.description="user, order and payment gRPC services (python -m shop_mesh.services.<name>)"
RUN groupadd --system --gid 10001 shop \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin shop \
    && mkdir -p /var/lib/shop \
    && chown 10001:10001 /var/lib/shop
COPY --from=build /opt/venv /opt/venv
# GRPC_EXPERIMENTS: the same as the local mesh's apps get (GRPC_SERVER_EXPERIMENTS in shop_mesh/mesh/local.py).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GRPC_EXPERIMENTS=-event_engine_listener \
    HOST=0.0.0.0 \
    DATA_DIR=/var/lib/shop
WORKDIR /var/lib/shop
USER 10001:10001
EXPOSE 50051 50052 50053
# No default service: say which one (Kubernetes sets `command`; locally: docker run IMAGE python -m shop_mesh.services.user).
CMD ["python", "-c", "raise SystemExit('shop-mesh: choose a service: python -m shop_mesh.services.user|order|payment')"]
