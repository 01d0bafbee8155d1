"""Server and client interceptors: context, errors, one log line per RPC; deadline and id propagation."""

from __future__ import annotations

import inspect
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from services.common import errors
from services.common.context import REQUEST_ID_HEADER, deadline_var, remaining_time, request_id_var
from services.common.logging import get_logger
from services.common.status import domain_error_status, plain_status

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


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Binds x-request-id and the deadline for the handler, maps errors, logs one line per RPC."""

    def __init__(self, chaos_unavailable_percent: float = 0.0):
        self.chaos = chaos_unavailable_percent / 100.0
        # grpc.aio runs the interceptor chain on every call; the wrapped handler of a method is built
        # once and reused while the registered handler is the same object (it is, per method).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) < 1024:  # bounded: only registered methods get here
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        infra = method.startswith(_INFRA_PREFIXES)
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, infra),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, infra),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client/bidi streaming: only reflection uses them; nothing to add

    def _enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        request_id: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_HEADER:
                request_id = str(value)  # the last one wins, as with dict()
        if not request_id:
            request_id = str(uuid.uuid4())
        request_id_var.set(request_id)
        remaining = context.time_remaining()
        deadline_var.set(time.monotonic() + remaining if remaining is not None else None)
        return request_id

    async def _maybe_chaos(self, context: grpc.aio.ServicerContext[Any, Any], infra: bool) -> None:
        if self.chaos and not infra and random.random() < self.chaos:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "chaos: injected transient failure")

    def _log(
        self, method: str, started: float, context: grpc.aio.ServicerContext[Any, Any], infra: bool
    ) -> None:
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else "OK" if code in (None, 0) else str(code)
        fields = {
            "method": method,
            "code": name,
            "duration_ms": round((time.perf_counter() - started) * 1e3, 2),
        }
        if infra:
            log.debug("rpc", **fields)
        else:
            log.info("rpc", **fields)

    def _wrap_unary(self, behavior: Any, method: str, infra: bool) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._enter(context)
            started = time.perf_counter()
            try:
                # Checked inline: awaiting two helper coroutines per call cost more than the checks.
                if type(request) is _Undecodable:
                    await _reject_undecodable(request, context)
                if self.chaos:
                    await self._maybe_chaos(context, infra)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort_for(exc, context, method)
            finally:
                self._log(method, started, context, infra)

        return wrapper

    def _wrap_stream(self, behavior: Any, method: str, infra: bool) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            # Write-style streaming handlers (context.write, e.g. health Watch) are plain coroutines.
            return self._wrap_unary(behavior, method, infra)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            self._enter(context)
            started = time.perf_counter()
            try:
                if type(request) is _Undecodable:
                    await _reject_undecodable(request, context)
                if self.chaos:
                    await self._maybe_chaos(context, infra)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort_for(exc, context, method)
            finally:
                self._log(method, started, context, infra)

        return wrapper


def _outgoing(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    request_id = request_id_var.get()
    if request_id and all(key != REQUEST_ID_HEADER for key, _ in metadata):
        metadata.add(REQUEST_ID_HEADER, request_id)
    timeout = details.timeout
    left = remaining_time()
    if left is not None:
        timeout = left if timeout is None else min(timeout, left)
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=timeout,
        metadata=metadata,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class PropagatingUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Outgoing calls carry the caller's remaining deadline and x-request-id (traceparent: OTel)."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_outgoing(client_call_details), request)


class PropagatingUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_outgoing(client_call_details), request)
