"""The per-RPC log line and server span made on the fast paths are what the slow ones made: the line
byte for byte what structlog's pipeline renders, the span with the SDK's ids, flags and sampling."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

from shop_mesh.services.common import logging as shop_logging
from shop_mesh.services.common import telemetry
from shop_mesh.services.common.context import request_id_var
from shop_mesh.services.common.interceptors import _new_request_id

METHOD = "/shop.user.v1.UserService/GetUser"
_TIMESTAMP = re.compile(r'"timestamp": "[^"]+"')


@pytest.fixture
def json_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    shop_logging.configure_logging("user", "INFO")
    try:
        yield
    finally:
        structlog.reset_defaults()
        shop_logging._rpc.out = None
        root.handlers[:] = handlers
        root.setLevel(level)


def _both_lines(capsys: pytest.CaptureFixture[str], span: trace.Span | None, code: str = "OK") -> list[str]:
    """(structlog's line, rpc_line's line), for the same call, with the current span attached."""
    token = otel_context.attach(trace.set_span_in_context(span)) if span is not None else None
    try:
        structlog.get_logger("rpc").info("rpc", method=METHOD, code=code, duration_ms=0.13)
        shop_logging.rpc_line(METHOD, shop_logging.method_json(METHOD), code, 0.13, span)
    finally:
        if token is not None:
            otel_context.detach(token)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    return lines


@pytest.mark.parametrize("request_id", [None, "req-1", 'quote " backslash \\ é ✓ \n'])
def test_rpc_line_is_what_structlog_renders(
    json_logging: None, capsys: pytest.CaptureFixture[str], request_id: str | None
) -> None:
    span = trace.NonRecordingSpan(
        trace.SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, False, trace.TraceFlags(2))
    )
    token = request_id_var.set(request_id)
    try:
        for current in (span, None):
            slow, fast = _both_lines(capsys, current)
            assert _TIMESTAMP.sub("", fast) == _TIMESTAMP.sub("", slow)
            line = json.loads(fast)
            assert line["event"] == "rpc" and line["level"] == "info" and line["service"] == "user"
            assert line.get("request_id") == (request_id or None)
            assert ("trace_id" in line) == (current is not None)
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", line["timestamp"])
    finally:
        request_id_var.reset(token)


def test_rpc_line_follows_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    shop_logging.configure_logging("user", "WARNING")
    try:
        shop_logging.rpc_line(METHOD, shop_logging.method_json(METHOD), "OK", 0.1, None)
        assert capsys.readouterr().out == ""
    finally:
        structlog.reset_defaults()
        shop_logging._rpc.out = None
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def no_exporter(monkeypatch: pytest.MonkeyPatch) -> TracerProvider:
    """The provider configure_tracing installs without an exporter, with its fast path on."""
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    monkeypatch.setattr(telemetry, "_unsampled_ids", provider.id_generator)
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("shop.rpc"))
    return provider


def _parent(flags: str) -> otel_context.Context:
    return propagate.extract(
        {"traceparent": f"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}", "tracestate": "k=v"}
    )


@pytest.mark.parametrize("flags", [None, "00", "02", "01"])
def test_server_span_is_what_the_sdk_makes(no_exporter: TracerProvider, flags: str | None) -> None:
    parent = None if flags is None else _parent(flags)
    sdk = no_exporter.get_tracer("sdk").start_span(METHOD, context=parent, kind=trace.SpanKind.SERVER)
    fast = telemetry.start_server_span(METHOD, parent, {"rpc.system": "grpc"})
    want, got = sdk.get_span_context(), fast.get_span_context()
    assert type(fast) is type(sdk)
    assert got.is_valid and not got.is_remote
    assert got.trace_flags == want.trace_flags
    assert got.trace_state == want.trace_state
    assert fast.is_recording() == (flags == "01")  # only a sampled parent records
    if flags is None:
        assert got.trace_id != want.trace_id  # a new trace each
    else:
        assert got.trace_id == want.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert got.span_id not in (want.span_id, 0x00F067AA0BA902B7)


def test_request_ids_look_like_uuid4() -> None:
    ids = {_new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in ids:
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value)


@pytest.mark.parametrize(
    "nanos", [1_733_480_000_000_000_000, 1_733_480_000_123_456_789, 1_733_480_059_999_999_000]
)
def test_rpc_line_timestamps_are_what_timestamper_writes(monkeypatch: pytest.MonkeyPatch, nanos: int) -> None:
    monkeypatch.setattr("time.time_ns", lambda: nanos)
    want = datetime.fromtimestamp(nanos // 1000 / 1e6, UTC).isoformat().replace("+00:00", "Z")
    assert shop_logging._timestamp() == want
