"""JSON log lines on stdout, each carrying the trace id and the request id of the RPC it belongs to."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

import structlog
from opentelemetry import trace

from shop_mesh.services.common.context import request_id_var


def _add_trace_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event["trace_id"] = format(span.trace_id, "032x")
        event["span_id"] = format(span.span_id, "016x")
    request_id = request_id_var.get()
    if request_id:
        event["request_id"] = request_id
    return event


class _RpcLine:
    """Where `rpc_line` writes, set by configure_logging. `out` is None until our JSON pipeline is
    configured (or when INFO is filtered out): then the line goes through structlog as any other."""

    out: structlog.PrintLogger | None = None
    service_json = '"service"'
    second = -1  # the second second_text shows
    second_text = ""


_rpc = _RpcLine()
_rpc_log = structlog.get_logger("rpc")


def configure_logging(service: str, level: str = "INFO") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    # Libraries that use stdlib logging (SQLAlchemy, grpc) go through the same JSON renderer.
    logging.basicConfig(level=numeric, stream=sys.stdout, format="%(message)s", force=True)

    def add_service(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["service"] = service
        return event

    structlog.configure(
        processors=[
            add_service,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_context,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        # Loggers are bound once instead of on every call (a measurable share of a cheap RPC).
        cache_logger_on_first_use=True,
    )
    # The same PrintLogger structlog writes through (its lock, its "current sys.stdout" rule).
    _rpc.out = structlog.PrintLogger(sys.stdout) if numeric <= logging.INFO else None
    _rpc.service_json = json.dumps(service)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def method_json(method: str) -> str:
    """A method name as rpc_line wants it: JSON-encoded once, when its handler is registered."""
    return json.dumps(method)


def rpc_line(method: str, method_json: str, code: str, duration_ms: float, span: trace.Span | None) -> None:
    """The one INFO line per RPC, byte for byte what the structlog pipeline above renders for
    `log.info("rpc", method=..., code=..., duration_ms=...)` inside the call's span, at about a fifth
    of its cost: its five processors, the event dict and json.dumps were ~45 us of a ~600 us GetUser
    (docs/performance.md, "GetUser per-call cost, session 6")."""
    out = _rpc.out
    if out is None:
        _rpc_log.info("rpc", method=method, code=code, duration_ms=duration_ms)
        return
    ids = ""
    if span is not None:
        context = span.get_span_context()
        if context.is_valid:
            ids = f', "trace_id": "{context.trace_id:032x}", "span_id": "{context.span_id:016x}"'
    request_id = request_id_var.get()
    rid = f', "request_id": {encode_basestring_ascii(request_id)}' if request_id else ""
    # code is a grpc.StatusCode name (plain ASCII); duration_ms a float, which json renders by repr.
    out.msg(
        f'{{"method": {method_json}, "code": "{code}", "duration_ms": {duration_ms!r}, "event": "rpc", '
        f'"service": {_rpc.service_json}, "level": "info", "timestamp": "{_timestamp()}"{ids}{rid}}}'
    )


def _timestamp() -> str:
    """Now as TimeStamper(fmt="iso", utc=True) writes it (datetime.isoformat: no fraction when the
    microseconds are 0), the date and time of day formatted once per second."""
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    if seconds != _rpc.second:
        _rpc.second = seconds
        _rpc.second_text = datetime.fromtimestamp(seconds, UTC).isoformat()[:19]
    micros = nanos // 1000
    return f"{_rpc.second_text}.{micros:06d}Z" if micros else f"{_rpc.second_text}Z"
