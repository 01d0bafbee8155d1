"""The shared host: health follows readiness and shutdown; reflection lists the service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import MetaData

from shop_mesh.services.common.config import ServiceSettings
from shop_mesh.services.common.db import Database
from shop_mesh.services.common.server import ServiceHost, ServiceParts
from tests.support import error_details, free_port, wait_serving


def free_port_closed() -> int:
    return free_port()  # bound and released: nothing listens there


def _host(tmp_path: Path, **overrides: object) -> ServiceHost:
    settings = ServiceSettings(service_name="probe", port=0, data_dir=tmp_path, **overrides)  # type: ignore[arg-type]
    parts = ServiceParts(
        grpc_service_name="shop.user.v1.UserService",
        database=Database(settings.database_url, MetaData()),
        register=lambda server: None,
    )
    return ServiceHost(settings, parts, stopping=asyncio.Event())


async def test_health_serving_then_not_serving_on_shutdown(tmp_path: Path) -> None:
    host = _host(tmp_path)
    port = await host.start()
    address = f"127.0.0.1:{port}"
    await wait_serving(address, "shop.user.v1.UserService")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stop = asyncio.create_task(host.stop(grace=30))
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # The watch then ends, so an idle server's drain does not wait out its 30 s grace period.
        assert await watch.read() is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stop, 10)
    assert host.stopping.is_set()


async def test_reflection_lists_own_service_or_all(tmp_path: Path) -> None:
    for reflect_all, expected in [
        (False, {"shop.user.v1.UserService"}),
        (True, {"shop.user.v1.UserService", "shop.order.v1.OrderService", "shop.payment.v1.PaymentService"}),
    ]:
        host = _host(tmp_path, reflect_all_services=reflect_all)
        port = await host.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                call = stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
                reply = await call.read()
                names = {s.name for s in reply.list_services_response.service}
                call.cancel()
            assert {n for n in names if n.startswith("shop.")} == expected
        finally:
            await host.stop(grace=0)


async def test_reflection_v1_answers_like_v1alpha(tmp_path: Path) -> None:
    host = _host(tmp_path)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            call = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            reply = await call.read()
            call.cancel()
        assert isinstance(reply, reflection_pb2.ServerReflectionResponse)
        assert "shop.user.v1.UserService" in {s.name for s in reply.list_services_response.service}
    finally:
        await host.stop(grace=0)


async def test_undecodable_request_is_invalid_argument_not_unknown(tmp_path: Path) -> None:
    host = _host(tmp_path)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/grpc.health.v1.Health/Check"
            )
            # Field 1 (service, a string) holding invalid UTF-8.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(b"\x0a\x02\xff\xfe", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(err.value)[0] == "MALFORMED_REQUEST"
    finally:
        await host.stop(grace=0)


async def test_liveness_stays_serving_while_readiness_waits_for_the_database(tmp_path: Path) -> None:
    # Nothing listens there: the schema never gets made, readiness stays NOT_SERVING.
    unreachable = f"postgresql+psycopg2://nobody@127.0.0.1:{free_port_closed()}/none"
    settings = ServiceSettings(service_name="probe", port=0, database_url=unreachable)
    parts = ServiceParts(
        grpc_service_name="shop.user.v1.UserService",
        database=Database(settings.database_url, MetaData()),
        register=lambda server: None,
    )
    host = ServiceHost(settings, parts, stopping=asyncio.Event())
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            live = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
            ready = await stub.Check(
                health_pb2.HealthCheckRequest(service="shop.user.v1.UserService"), timeout=5
            )
        assert live.status == health_pb2.HealthCheckResponse.SERVING
        assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await host.stop(grace=0)


async def test_oversized_request_is_refused_with_resource_exhausted(tmp_path: Path) -> None:
    host = _host(tmp_path, max_message_bytes=64 * 1024)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="x" * 200_000), timeout=5
                )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await host.stop(grace=0)
