"""Status codes a client sees through the real edge and sidecars (one mesh, one replica each).

- a method no contract has is UNIMPLEMENTED (the edge answers it), a known method the edge may not
  call stays PERMISSION_DENIED (the callee's RBAC);
- a deadline on a stream ends it with DEADLINE_EXCEEDED, every time (the app enforces it and sends a
  trailer; Envoy, which could only reset the stream, does not race it).

Payments never settle here, so orders stay AWAITING_SETTLEMENT and their streams stay open.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.services.common.ids import new_id
from tests.mesh.conftest import MeshProcess, running_mesh
from tests.support import aio_authorized_channel, authorized_channel

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    with running_mesh(
        tmp_path_factory.mktemp("edge-statuses") / "run", env=["payment:SETTLEMENT_DELAY_SECONDS=3600"]
    ) as running:
        yield running


def _raw_call(channel: grpc.Channel, path: str) -> grpc.RpcError:
    call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    return info.value


def test_unknown_method_of_a_known_service_is_unimplemented(mesh: MeshProcess) -> None:
    with authorized_channel(mesh.edge, mesh.admin_token) as channel:
        for path in (
            "/shop.order.v1.OrderService/NoSuchMethod",
            "/shop.user.v1.UserService/getuser",  # misspelt (case)
            "/shop.payment.v1.PaymentService/",
            "/shop.nothing.v1.NothingService/Get",  # unknown service
        ):
            err = _raw_call(channel, path)
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED, (path, err.code(), err.details())


def test_known_method_the_edge_may_not_call_is_permission_denied(mesh: MeshProcess) -> None:
    with authorized_channel(mesh.edge, mesh.admin_token) as channel:
        stub = payment_pb2_grpc.PaymentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.AuthorizePayment(
                payment_pb2.AuthorizePaymentRequest(
                    request_id=f"edge-{new_id('x')}",
                    order_id=new_id("ord"),
                    amount=money_pb2.Money(currency_code="EUR", units=5),
                    payment_method_token="tok_visa",
                ),
                timeout=10,
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()


async def _ends_with(stream: Any) -> str:
    try:
        async for _ in stream:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def test_stream_deadlines_end_deadline_exceeded(mesh: MeshProcess) -> None:
    async with aio_authorized_channel(mesh.edge, mesh.admin_token) as channel:
        users = user_pb2_grpc.UserServiceStub(channel)
        orders = order_pb2_grpc.OrderServiceStub(channel)
        payments = payment_pb2_grpc.PaymentServiceStub(channel)
        user = (
            await users.CreateUser(
                user_pb2.CreateUserRequest(
                    request_id=f"u-{uuid.uuid4()}",
                    email=f"{uuid.uuid4().hex[:12]}@example.com",
                    display_name="D",
                ),
                timeout=15,
            )
        ).user
        order = (
            await orders.CreateOrder(
                order_pb2.CreateOrderRequest(
                    request_id=f"o-{uuid.uuid4()}",
                    user_id=user.user_id,
                    line_items=[
                        order_pb2.LineItem(
                            sku="book", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=4)
                        )
                    ],
                    payment_method_token="tok_visa",
                ),
                timeout=15,
            )
        ).order
        assert order.state == order_pb2.ORDER_STATE_AWAITING_SETTLEMENT  # its stream stays open
        outcomes: Counter[str] = Counter()
        for deadline in (0.05, 0.2):  # before and after the first messages arrived
            for _ in range(5):  # 5 rounds of 10 concurrent streams of each kind (bounded)
                watch_orders = [
                    orders.WatchOrder(order_pb2.WatchOrderRequest(order_id=order.order_id), timeout=deadline)
                    for _ in range(10)
                ]
                watch_payments = [
                    payments.WatchPaymentEvents(
                        payment_pb2.WatchPaymentEventsRequest(order_id=order.order_id), timeout=deadline
                    )
                    for _ in range(10)
                ]
                ends = await asyncio.wait_for(
                    asyncio.gather(*(_ends_with(c) for c in [*watch_orders, *watch_payments])), 60
                )
                outcomes.update(ends)
    print(f"\n200 streams with a deadline through the edge: {dict(outcomes)}")
    assert outcomes == Counter({"DEADLINE_EXCEEDED": 200})
