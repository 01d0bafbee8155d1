"""In-process user + payment + order services on a real database, for the order integration tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.services.common.server import ServiceHost
from shop_mesh.services.order.app import SERVICE_NAME as ORDER_SERVICE
from shop_mesh.services.order.app import build as build_order
from shop_mesh.services.order.config import OrderSettings
from shop_mesh.services.payment.app import build as build_payment
from shop_mesh.services.payment.config import PaymentSettings
from shop_mesh.services.user.app import build as build_user
from shop_mesh.services.user.config import UserSettings
from tests.support import wait_serving


async def start_host(host: ServiceHost, service: str) -> str:
    port = await host.start()
    address = f"127.0.0.1:{port}"
    await wait_serving(address, service)
    return address


def order_host(database_url: str, user_addr: str, payment_addr: str, **overrides: object) -> ServiceHost:
    fields: dict[str, object] = {"event_poll_interval_seconds": 0.05, "reconcile_interval_seconds": 0.5}
    fields.update(overrides)
    settings = OrderSettings(
        port=0,
        database_url=database_url,
        user_service_addr=user_addr,
        payment_service_addr=payment_addr,
        **fields,  # type: ignore[arg-type]
    )
    stopping = asyncio.Event()
    return ServiceHost(settings, build_order(settings, stopping), stopping=stopping)


@dataclass
class Stack:
    user_addr: str
    payment_addr: str
    order_addr: str
    order_db_url: str
    order: order_pb2_grpc.OrderServiceAsyncStub
    users: user_pb2_grpc.UserServiceAsyncStub
    payments: payment_pb2_grpc.PaymentServiceAsyncStub
    hosts: list[ServiceHost] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def create_user(self, active: bool = True) -> str:
        reply = await self.users.CreateUser(
            user_pb2.CreateUserRequest(
                request_id=f"u-{uuid.uuid4().hex}",
                email=f"{uuid.uuid4().hex[:10]}@example.com",
                display_name="Ada",
            ),
            timeout=10,
        )
        if not active:
            await self.users.DeleteUser(
                user_pb2.DeleteUserRequest(request_id=f"d-{uuid.uuid4().hex}", user_id=reply.user.user_id),
                timeout=10,
            )
        return reply.user.user_id

    async def restart_order(self, **overrides: object) -> None:
        """Stop the order host and start a fresh one on the same database (a process restart)."""
        old = self.hosts.pop()
        await old.stop(grace=1)
        new = order_host(self.order_db_url, self.user_addr, self.payment_addr, **overrides)
        self.order_addr = await start_host(new, ORDER_SERVICE)
        self.hosts.append(new)
        channel = grpc.aio.insecure_channel(self.order_addr)
        self.channels.append(channel)
        self.order = order_pb2_grpc.OrderServiceStub(channel)


def create_request(
    user_id: str, request_id: str | None = None, token: str = "tok_visa", units: int = 12
) -> order_pb2.CreateOrderRequest:
    return order_pb2.CreateOrderRequest(
        request_id=request_id or f"r-{uuid.uuid4().hex}",
        user_id=user_id,
        line_items=[
            order_pb2.LineItem(
                sku="BOOK-1", quantity=2, unit_price=money_pb2.Money(currency_code="EUR", units=units)
            ),
            order_pb2.LineItem(
                sku="PEN-9",
                quantity=1,
                unit_price=money_pb2.Money(currency_code="EUR", units=1, nanos=500_000_000),
            ),
        ],
        payment_method_token=token,
    )


@asynccontextmanager
async def running_stack(url_for: Callable[[str], str], **order_overrides: object) -> AsyncIterator[Stack]:
    hosts: list[ServiceHost] = []
    channels: list[grpc.aio.Channel] = []
    try:
        user_settings = UserSettings(port=0, database_url=url_for("user"))
        user_stop = asyncio.Event()
        user = ServiceHost(user_settings, build_user(user_settings, user_stop), stopping=user_stop)
        hosts.append(user)
        user_addr = await start_host(user, "shop.user.v1.UserService")
        payment_settings = PaymentSettings(
            port=0,
            database_url=url_for("payment"),
            settlement_delay_seconds=0,
            settlement_poll_interval_seconds=0.1,
            event_poll_interval_seconds=0.05,
        )
        payment_stop = asyncio.Event()
        payment = ServiceHost(
            payment_settings, build_payment(payment_settings, payment_stop), stopping=payment_stop
        )
        hosts.append(payment)
        payment_addr = await start_host(payment, "shop.payment.v1.PaymentService")
        order_url = url_for("order")
        order = order_host(order_url, user_addr, payment_addr, **order_overrides)
        hosts.append(order)
        order_addr = await start_host(order, ORDER_SERVICE)
        channels = [grpc.aio.insecure_channel(a) for a in (user_addr, payment_addr, order_addr)]
        stack = Stack(
            user_addr=user_addr,
            payment_addr=payment_addr,
            order_addr=order_addr,
            order_db_url=order_url,
            users=user_pb2_grpc.UserServiceStub(channels[0]),
            payments=payment_pb2_grpc.PaymentServiceStub(channels[1]),
            order=order_pb2_grpc.OrderServiceStub(channels[2]),
            hosts=hosts,
            channels=channels,
        )
        yield stack
    finally:
        for channel in channels:
            await channel.close()
        for host in reversed(hosts):
            await host.stop(grace=0)


async def watch_states(
    stub: order_pb2_grpc.OrderServiceAsyncStub, order_id: str, after: int = 0, timeout: float = 20
) -> list[order_pb2.OrderEvent]:
    """Every event WatchOrder delivers until the stream ends by itself (OK)."""
    call = stub.WatchOrder(
        order_pb2.WatchOrderRequest(order_id=order_id, after_sequence=after), timeout=timeout
    )
    return [reply.event async for reply in call]
