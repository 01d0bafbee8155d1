"""Client channels to upstream services: plaintext h2c to an address from config (locally the
sidecar's outbound listener). No retries, TLS or discovery here: that is the mesh's job."""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from shop_mesh.services.common.interceptors import PropagatingUnaryStream, PropagatingUnaryUnary


def upstream_channel(address: str, max_message_bytes: int = 4 * 1024 * 1024) -> grpc.aio.Channel:
    interceptors = [*aio_client_interceptors(), PropagatingUnaryUnary(), PropagatingUnaryStream()]
    return grpc.aio.insecure_channel(
        address,
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Disable the client's own retries: the sidecar decides what is retried.
            ("grpc.enable_retries", 0),
            # Reconnect soon after a failed connect (e.g. the upstream started after us): with the
            # default 1 s+ backoff, calls fail fast with UNAVAILABLE long after the upstream is up.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ],
    )
