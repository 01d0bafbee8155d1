"""Client channels to upstream services: plaintext h2c to an address from config (locally the
sidecar's outbound listener). No retries, TLS or discovery here: that is the mesh's job.

Unary calls go through `unary_call`, not through grpc.aio client interceptors: an intercepted call
costs an extra task and an interceptor chain per call (about 7 % of the order app's event-loop
samples under CreateOrder, py-spy, docs/performance.md). Streams keep the interceptors (one call
per stream, not per order).
"""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from shop_mesh.services.common import principal as principals
from shop_mesh.services.common.context import REQUEST_ID_HEADER, principal_var, remaining_time, request_id_var

_tracer = trace.get_tracer("shop_mesh.upstream")


def upstream_channel(address: str, max_message_bytes: int = 4 * 1024 * 1024) -> grpc.aio.Channel:
    # Unary-unary calls carry their context through `unary_call`; a unary-unary interceptor here
    # would put every unary call back on grpc.aio's intercepted (slower) path.
    unary = grpc.aio.UnaryUnaryClientInterceptor
    streaming = [i for i in aio_client_interceptors() if not isinstance(i, unary)]
    return grpc.aio.insecure_channel(
        address,
        interceptors=[*streaming, PropagatingUnaryStream()],
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


def outgoing_metadata() -> list[tuple[str, str]]:
    """x-request-id and the end-user identity of the incoming call, for an outgoing one."""
    metadata: list[tuple[str, str]] = []
    request_id = request_id_var.get()
    if request_id:
        metadata.append((REQUEST_ID_HEADER, request_id))
    # The end user this call acts for travels on (order -> user/payment), like the request id.
    metadata.extend(principals.to_headers(principal_var.get()))
    return metadata


def _deadline(timeout: float | None) -> float | None:
    """The call's timeout, shortened to what is left of the incoming call's deadline."""
    left = remaining_time()
    if left is not None and (timeout is None or left < timeout):
        return left
    return timeout


class PropagatingUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    """Streams opened to an upstream carry what `unary_call` adds to unary calls (the trace context
    comes from OTel's stream interceptor); metadata the caller set itself is kept."""

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details: grpc.aio.ClientCallDetails = client_call_details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        present = {key for key, _ in metadata}
        for key, value in outgoing_metadata():
            if key not in present:
                metadata.add(key, value)
        return await continuation(
            grpc.aio.ClientCallDetails(
                method=details.method,
                timeout=_deadline(details.timeout),
                metadata=metadata,
                credentials=details.credentials,
                wait_for_ready=details.wait_for_ready,
            ),
            request,
        )


def _inject(metadata: list[tuple[str, str]]) -> None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata.extend(carrier.items())


async def unary_call(method: Any, request: Any, *, name: str, timeout: float) -> Any:
    """One unary call with what every outgoing call carries: the caller's remaining deadline (if
    shorter than `timeout`), x-request-id, the end-user identity and the trace context. `name` is
    the RPC as `package.Service/Method`, the span's name.

    A CLIENT span (OTel's RPC conventions) is made only when the current trace records: when
    nothing records it, the trace context of the current span is passed on as it is (same trace id,
    unsampled), which is all a non-recording client span would have added.
    """
    call_timeout = _deadline(timeout)
    metadata = outgoing_metadata()
    if not trace.get_current_span().is_recording():
        _inject(metadata)
        return await method(request, timeout=call_timeout, metadata=metadata)
    service, _, rpc = name.rpartition("/")
    with _tracer.start_as_current_span(
        name,
        kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
    ) as span:
        _inject(metadata)
        try:
            reply = await method(request, timeout=call_timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
            raise
        span.set_attribute("rpc.grpc.status_code", 0)
        return reply
