"""The floors' building blocks, in process: the null services and the PostgreSQL variant's setup."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from shop.order.v1 import order_pb2

from shop_mesh.bench import null_app, postgres
from shop_mesh.bench.env import Unavailable, free_port
from shop_mesh.bench.scenarios import display_order

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]


class _Record(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        self.methods.append(details.method)
        return await continuation(details)


async def _server(
    service: str, record: _Record, driver: null_app.SagaDriver | None = None
) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[record])
    server.add_generic_rpc_handlers((null_app.build_handler(service, driver),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def null_mesh() -> AsyncIterator[tuple[str, _Record]]:
    """The three null services wired directly (order's driver -> user, payment); one recorder."""
    record = _Record()
    user, user_addr = await _server("user", record)
    payment, payment_addr = await _server("payment", record)
    _, answer = null_app._canned(null_app.SERVICES["order"].methods_by_name["CreateOrder"])
    driver = null_app.SagaDriver(user_addr, payment_addr, answer)
    order, order_addr = await _server("order", record, driver)
    try:
        yield order_addr, record
    finally:
        for server in (order, payment, user):
            await server.stop(None)
        await driver.close()


async def test_null_order_makes_the_sagas_three_upstream_calls_in_order(
    null_mesh: tuple[str, _Record],
) -> None:
    order_addr, record = null_mesh
    async with grpc.aio.insecure_channel(order_addr) as channel:
        create = channel.unary_unary(
            "/shop.order.v1.OrderService/CreateOrder",
            request_serializer=order_pb2.CreateOrderRequest.SerializeToString,
            response_deserializer=order_pb2.CreateOrderResponse.FromString,
        )
        call = create(order_pb2.CreateOrderRequest(request_id="r-1", user_id="usr_1"), timeout=5)
        await call
        assert await call.code() == grpc.StatusCode.OK
    assert record.methods == [
        "/shop.order.v1.OrderService/CreateOrder",
        "/shop.user.v1.UserService/GetUser",
        "/shop.payment.v1.PaymentService/AuthorizePayment",
        "/shop.payment.v1.PaymentService/CapturePayment",
    ]


async def _call(channel: grpc.aio.Channel, path: str, request: Any, *, streaming: bool) -> grpc.StatusCode:
    if streaming:
        stream: grpc.aio.UnaryStreamMultiCallable[Any, bytes] = channel.unary_stream(
            path, request_serializer=null_app._serialize
        )
        call = stream(request, timeout=5)
        assert [m async for m in call] == []  # a null stream ends at once, empty
        return await call.code()
    unary: grpc.aio.UnaryUnaryMultiCallable[Any, bytes] = channel.unary_unary(
        path, request_serializer=null_app._serialize
    )
    reply = unary(request, timeout=5)
    await reply
    return await reply.code()


@pytest.mark.parametrize("service", sorted(null_app.SERVICES))
async def test_every_method_of_the_null_service_answers_ok(service: str) -> None:
    record = _Record()
    server, addr = await _server(service, record)
    desc = null_app.SERVICES[service]
    try:
        async with grpc.aio.insecure_channel(addr) as channel:
            for method in desc.methods:
                if service == "order" and method.name == "CreateOrder":
                    continue  # needs upstreams: the test above
                request = message_factory.GetMessageClass(method.input_type)()
                path = f"/{desc.full_name}/{method.name}"
                code = await _call(channel, path, request, streaming=method.server_streaming)
                assert code == grpc.StatusCode.OK, path
    finally:
        await server.stop(None)
    assert len(record.methods) == len(desc.methods) - (service == "order")


def test_unreachable_postgres_is_reported_unavailable_with_the_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("BENCH_POSTGRES_PORT", str(port))
    with pytest.raises(Unavailable, match=f"PostgreSQL unreachable at 127.0.0.1:{port}"):
        postgres.create_databases()


def test_postgres_host_must_be_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_POSTGRES_HOST", "10.0.0.5")
    with pytest.raises(Unavailable, match="only talks to loopback"):
        postgres.create_databases()


def test_postgres_rows_are_shown_below_their_sqlite_scenario() -> None:
    ran = ["baseline", "saga-floor", "get-user", "create-order", "get-user-pg", "create-order-pg", "startup"]
    assert display_order(ran) == [
        "baseline",
        "saga-floor",
        "get-user",
        "get-user-pg",
        "create-order",
        "create-order-pg",
        "startup",
    ]
    assert display_order(["baseline", "create-order-pg"]) == ["baseline", "create-order-pg"]
