"""The unary admission counter (MAX_INFLIGHT_UNARY) frees its slot on every way a call can end (OK,
error, abort, client cancellation), refuses with RESOURCE_EXHAUSTED beyond the limit without taking
a slot, and never counts health. Driven through a real in-process grpc.aio server on 127.0.0.1, so
what is asserted is what a client sees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shop_mesh.services.common import errors
from shop_mesh.services.common.admission import DEADLINE_TOO_SHORT, TOO_MANY_REQUESTS, UnaryAdmission
from shop_mesh.services.common.health import HealthReporter
from shop_mesh.services.common.interceptors import ServerCallWrapper
from tests.support import error_details

METHOD = "/test.Gate/Call"
LIMIT = 2
Request = health_pb2.HealthCheckRequest  # any message; `service` says what the handler does
Response = health_pb2.HealthCheckResponse


@dataclass
class Gate:
    """Handler whose behaviour the request picks: ok, error, not_found, or block (until released)."""

    started: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        what = request.service
        if what == "error":
            raise ValueError("a bug")
        if what == "not_found":
            raise errors.NotFound("no such thing")
        if what == "block":
            await self.started.put(what)
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return Response(status=Response.SERVING)


@dataclass
class Running:
    gate: Gate
    admission: UnaryAdmission
    call: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    health: health_pb2_grpc.HealthStub


async def _serve(admission: UnaryAdmission) -> AsyncIterator[Running]:
    gate = Gate()
    server = grpc.aio.server()
    registrar = ServerCallWrapper(unary=admission).registrar(server)
    handler = grpc.unary_unary_rpc_method_handler(
        gate.call, request_deserializer=Request.FromString, response_serializer=Response.SerializeToString
    )
    registrar.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Gate", {"Call": handler})])
    reporter = HealthReporter(["test.Gate"])
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, registrar)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await reporter.start()
    await reporter.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.unary_unary(
            METHOD, request_serializer=Request.SerializeToString, response_deserializer=Response.FromString
        )
        yield Running(gate, admission, call, health_pb2_grpc.HealthStub(channel))
    finally:
        gate.release.set()
        await channel.close()
        await reporter.enter_shutdown()
        await server.stop(None)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    async for r in _serve(UnaryAdmission(LIMIT)):
        yield r


async def _code(call: Any) -> grpc.aio.AioRpcError | None:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def test_the_slot_is_freed_after_ok_error_and_domain_error(running: Running) -> None:
    assert (await running.call(Request(service="ok"), timeout=5)).status == Response.SERVING
    assert running.admission.open == 0
    failed = await _code(running.call(Request(service="error"), timeout=5))
    assert failed is not None and failed.code() == grpc.StatusCode.INTERNAL
    assert running.admission.open == 0
    missing = await _code(running.call(Request(service="not_found"), timeout=5))
    assert missing is not None and missing.code() == grpc.StatusCode.NOT_FOUND
    assert running.admission.open == 0


async def test_beyond_the_limit_refused_at_once_health_answered_and_cancel_frees(running: Running) -> None:
    held = [running.call(Request(service="block"), timeout=30) for _ in range(LIMIT)]
    for _ in held:
        await asyncio.wait_for(running.gate.started.get(), 10)
    assert running.admission.open == LIMIT

    refused = await _code(running.call(Request(service="ok"), timeout=5))
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit {LIMIT}" in (refused.details() or "")
    assert error_details(refused)[0] == TOO_MANY_REQUESTS
    assert running.admission.open == LIMIT  # a refusal takes no slot and frees none
    assert running.admission.refused == 1

    # Health is never counted: answered while every slot is taken.
    health = await running.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == Response.SERVING

    # The client cancels one held call: its slot comes back, and the next call is admitted.
    held[0].cancel()
    await asyncio.wait_for(running.gate.cancelled.wait(), 10)
    assert running.admission.open == LIMIT - 1
    assert (await running.call(Request(service="ok"), timeout=5)).status == Response.SERVING

    running.gate.release.set()
    assert (await held[1]).status == Response.SERVING
    assert running.admission.open == 0


async def test_a_call_with_too_little_deadline_left_is_refused_without_a_slot() -> None:
    async for r in _serve(UnaryAdmission(LIMIT, min_deadline_s=2.0)):
        short = await _code(r.call(Request(service="ok"), timeout=0.5))
        assert short is not None and short.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(short)[0] == DEADLINE_TOO_SHORT
        assert r.admission.open == 0
        assert (await r.call(Request(service="ok"), timeout=10)).status == Response.SERVING
