"""Per-RPC cross-cutting work: on the server, context, span, request validation (the protos' rules),
errors and one log line per RPC (wrapped at registration); on the client, deadline and request id
propagation."""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import Token
from typing import Any, NamedTuple, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from shop_mesh.services.common import errors
from shop_mesh.services.common import principal as principals
from shop_mesh.services.common.admission import StreamAdmission, UnaryAdmission
from shop_mesh.services.common.context import (
    REQUEST_ID_HEADER,
    deadline_var,
    principal_var,
    remaining_time,
    request_id_var,
)
from shop_mesh.services.common.logging import get_logger, method_json, rpc_line
from shop_mesh.services.common.metrics import RpcMetrics
from shop_mesh.services.common.status import domain_error_status, plain_status
from shop_mesh.services.common.telemetry import start_server_span
from shop_mesh.services.common.validation import check_request

log = get_logger("rpc")

# Infrastructure RPCs the chaos switch never fails: the mesh must still see health and reflection.
_INFRA_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def _is_transient_db_error(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | PoolTimeoutError | ConnectionError | OSError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    """Turn an exception from a handler into a status. Never leaks SQL or a stack trace."""
    if isinstance(exc, errors.DomainError):
        status = domain_error_status(exc)
    elif isinstance(exc, NotImplementedError):  # e.g. a generated servicer's default method
        status = plain_status(code_pb2.UNIMPLEMENTED, "method not implemented", "UNIMPLEMENTED")
    elif _is_transient_db_error(exc):
        log.warning("database_unavailable", method=method, error=type(exc).__name__)
        status = plain_status(code_pb2.UNAVAILABLE, "database unavailable; retry", "DATABASE_UNAVAILABLE")
    else:
        log.exception("unexpected_error", method=method)
        status = plain_status(code_pb2.INTERNAL, "internal error", "INTERNAL")
    await context.abort_with_status(status)


class _Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8 in a string field)."""

    def __init__(self, error: str):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Without this, a request that fails to parse becomes UNKNOWN before any handler runs."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return parse


async def _reject_undecodable(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, _Undecodable):
        await context.abort_with_status(
            domain_error_status(
                errors.InvalidArgument(
                    [
                        errors.FieldViolation(
                            "", "the request could not be parsed (e.g. invalid UTF-8 in a string)"
                        )
                    ],
                    reason="MALFORMED_REQUEST",
                )
            )
        )


# Server spans follow the OpenTelemetry RPC conventions; codes that mean "the server failed" mark
# the span as an error (a client's INVALID_ARGUMENT or NOT_FOUND does not).
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})
_UUID4_VERSION_VARIANT = (0x4 << 76) | (0x2 << 62)
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62))


def _new_request_id() -> str:
    """A random UUID (version 4) string for a call that came without x-request-id: the same form as
    str(uuid.uuid4()) at a fifth of its cost. A correlation id, not a secret: `random` is enough."""
    h = f"{random.getrandbits(128) & _UUID4_CLEAR | _UUID4_VERSION_VARIANT:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _Method(NamedTuple):
    """What the wrapper needs of a method on every call, worked out once when it is registered."""

    name: str  # the full path, /package.Service/Method
    json: str  # name, JSON-encoded for the log line
    span_attributes: dict[str, str]
    infra: bool


class ServerCallWrapper:
    """Wraps every method handler once, when it is registered: binds x-request-id and the deadline,
    opens the server span, validates the request against its proto's rules, maps errors to statuses,
    and writes one log line per RPC.

    Not a grpc.aio.ServerInterceptor on purpose: grpc.aio runs interceptors as a coroutine chain on
    every call, and OpenTelemetry's interceptor also proxies the servicer context and parses the peer
    address per call; together they were ~30 % of a GetUser's CPU (docs/performance.md).
    """

    def __init__(
        self,
        chaos_unavailable_percent: float = 0.0,
        streams: StreamAdmission | None = None,
        metrics: RpcMetrics | None = None,
        unary: UnaryAdmission | None = None,
    ):
        self.chaos = chaos_unavailable_percent / 100.0
        self.streams = streams
        self.unary = unary
        self.metrics = metrics  # None: no metrics recorded (METRICS_PORT=0)

    def registrar(self, server: grpc.aio.Server) -> grpc.aio.Server:
        """The server as the generated `add_*_to_server` functions see it: handlers get wrapped."""
        return cast(grpc.aio.Server, _WrappingRegistrar(server, self))

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        infra = method.startswith(_INFRA_PREFIXES)
        m = _Method(
            method,
            method_json(method),
            {
                "rpc.system": "grpc",
                "rpc.service": method[1 : method.rfind("/")],
                "rpc.method": method[method.rfind("/") + 1 :],
            },
            infra,
        )
        deserializer = _tolerant(handler.request_deserializer)
        if self.metrics is not None and not infra:
            self.metrics.register(method, streaming=handler.unary_stream is not None)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, m, admit=not infra),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, m),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client/bidi streaming: only reflection uses them; nothing to add

    def _enter(self, context: grpc.aio.ServicerContext[Any, Any], m: _Method) -> _Call:
        request_id: str | None = None
        carrier: dict[str, str] | None = None
        user_id: str | None = None
        roles: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_HEADER:
                request_id = str(value)  # the last one wins, as with dict()
            elif key == principals.USER_ID_HEADER:
                user_id = str(value)
            elif key == principals.ROLES_HEADER:
                roles = str(value)
            elif key in _TRACE_HEADERS:
                if carrier is None:
                    carrier = {}
                carrier[key] = str(value)
        request_id_var.set(request_id or _new_request_id())
        # Trusted as sent: the sidecar lets only allowed mesh identities (edge, order) assert them.
        principal_var.set(principals.from_headers(user_id, roles))
        remaining = context.time_remaining()
        deadline_var.set(time.monotonic() + remaining if remaining is not None else None)
        if m.infra:  # health checks and reflection are noise in traces
            return _Call(None, None, time.perf_counter())
        if self.metrics is not None:
            self.metrics.started(m.name)
        parent = propagate.extract(carrier) if carrier else None
        span = start_server_span(m.name, parent, m.span_attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return _Call(span, token, time.perf_counter())

    async def _maybe_chaos(self, context: grpc.aio.ServicerContext[Any, Any], infra: bool) -> None:
        if self.chaos and not infra and random.random() < self.chaos:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "chaos: injected transient failure")

    def _exit(self, call: _Call, m: _Method, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        code = context.code()
        if not isinstance(code, grpc.StatusCode):
            code = _CODES_BY_NUMBER.get(code or 0, grpc.StatusCode.UNKNOWN)
        duration_ms = round((time.perf_counter() - call.started) * 1e3, 2)
        if m.infra:
            log.debug("rpc", method=m.name, code=code.name, duration_ms=duration_ms)
            return
        span = call.span
        # Logged before the span ends, so the line carries its trace and span ids.
        rpc_line(m.name, m.json, code.name, duration_ms, span)
        if self.metrics is not None:
            self.metrics.finished(m.name, code.name, duration_ms / 1e3)
        if span is not None and span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERROR_CODES:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.end()
        if call.token is not None:
            otel_context.detach(call.token)

    def _wrap_unary(self, behavior: Any, m: _Method, admit: bool = False) -> Any:
        unary = self.unary if admit else None
        if unary is not None:
            return self._wrap_admitted_unary(behavior, m, unary)
        infra = m.infra

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = self._enter(context, m)
            try:
                # Checked inline: awaiting two helper coroutines per call cost more than the checks.
                if self.chaos:  # test switch: a server broken before it reads the request
                    await self._maybe_chaos(context, infra)
                if type(request) is _Undecodable:
                    await _reject_undecodable(request, context)
                if not infra:  # the rules declared in the protos, for every RPC (health has none)
                    check_request(request)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort_for(exc, context, m.name)
            finally:
                self._exit(call, m, context)

        return wrapper

    def _wrap_admitted_unary(self, behavior: Any, m: _Method, unary: UnaryAdmission) -> Any:
        """`_wrap_unary` for a counted unary call (never infra): a separate closure so that calls
        without a limit pay nothing for it."""
        min_deadline = unary.min_deadline_s

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = self._enter(context, m)
            admitted = False
            try:
                # The deadline first: a call refused for it never holds a slot, so nothing can see
                # its refusal before the slot is free again.
                if min_deadline:
                    left = remaining_time()
                    if left is not None and left < min_deadline:
                        await unary.refuse_deadline(context, m.name, left)
                # Refused at once past the limit: queueing it would only make every admitted call late.
                admitted = unary.enter()
                if not admitted:
                    await unary.refuse(context, m.name)
                if self.chaos:
                    await self._maybe_chaos(context, False)
                if type(request) is _Undecodable:
                    await _reject_undecodable(request, context)
                check_request(request)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                # Freed before the status goes out: a caller that sees the error and calls again at
                # once must find the slot free, not race this coroutine's resumption.
                if admitted:
                    admitted = False
                    unary.leave()
                await _abort_for(exc, context, m.name)
            finally:
                # On every other path (OK: before the response is sent; abort; cancellation): the slot
                # is freed exactly once.
                if admitted:
                    unary.leave()
                self._exit(call, m, context)

        return wrapper

    def _wrap_stream(self, behavior: Any, m: _Method) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            # Write-style streaming handlers (context.write, e.g. health Watch) are plain coroutines.
            return self._wrap_unary(behavior, m)
        infra = m.infra

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = self._enter(context, m)
            # Open streams are capped (RESOURCE_EXHAUSTED beyond): they cannot starve unary calls.
            admitted = infra or self.streams is None or self.streams.enter()
            try:
                if not admitted:
                    await cast(StreamAdmission, self.streams).refuse(context, m.name)
                if self.chaos:
                    await self._maybe_chaos(context, infra)
                if type(request) is _Undecodable:
                    await _reject_undecodable(request, context)
                if not infra:
                    check_request(request)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort_for(exc, context, m.name)
            finally:
                if admitted and not infra and self.streams is not None:
                    self.streams.leave()
                self._exit(call, m, context)

        return wrapper


class _Call(NamedTuple):
    span: trace.Span | None
    token: Token[Context] | None
    started: float


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out wrapped (built once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: ServerCallWrapper):
        self._inner = inner
        self._wrapper = wrapper
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrapper.wrap(handler, method)
        if len(self._wrapped) < 1024:  # bounded: only registered methods get here
            self._wrapped[method] = (handler, wrapped)
        return wrapped


class _WrappingRegistrar:
    """Stands in for the server while services register; every handler it passes on is wrapped."""

    def __init__(self, server: grpc.aio.Server, wrapper: ServerCallWrapper):
        self._server = server
        self._wrapper = wrapper

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_WrappedGeneric(h, self._wrapper) for h in handlers])

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {name: self._wrapper.wrap(h, f"/{service_name}/{name}") for name, h in handlers.items()},
        )
