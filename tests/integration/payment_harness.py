"""In-process PaymentService hosts for the payment integration tests (port 0, real database)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from shop.common.v1 import money_pb2
from shop.payment.v1 import payment_pb2, payment_pb2_grpc
from sqlalchemy import Table, func, select

from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.server import ServiceHost
from shop_mesh.services.payment.app import SERVICE_NAME, build
from shop_mesh.services.payment.config import PaymentSettings
from tests.support import wait_serving

TIMEOUT = 10.0


@dataclass
class RunningPayment:
    host: ServiceHost
    channel: grpc.aio.Channel
    stub: payment_pb2_grpc.PaymentServiceAsyncStub
    stopped: bool = field(default=False)

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.host.stop(grace=1)
        await self.channel.close()

    async def count(self, table: Table, **where: Any) -> int:
        query = select(func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        count: int | None = await self.host.parts.database.read(lambda session: session.scalar(query))
        return int(count or 0)


class PaymentCluster:
    """Starts hosts (replicas) on demand; stops every one of them on exit."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.running: list[RunningPayment] = []

    async def start(self, database_url: str, **overrides: Any) -> RunningPayment:
        values: dict[str, Any] = {
            "port": 0,
            "database_url": database_url,
            "data_dir": self.data_dir,
            "settlement_delay_seconds": 0.0,
            "settlement_poll_interval_seconds": 0.2,
            "event_poll_interval_seconds": 0.05,
            "database_check_interval_seconds": 0.5,
            **overrides,
        }
        settings = PaymentSettings(**values)
        stopping = asyncio.Event()
        host = ServiceHost(settings, build(settings, stopping), stopping=stopping)
        port = await host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running = RunningPayment(host, channel, payment_pb2_grpc.PaymentServiceStub(channel))
        self.running.append(running)
        await wait_serving(f"127.0.0.1:{port}", SERVICE_NAME, timeout=TIMEOUT)
        return running

    async def close(self) -> None:
        for running in reversed(self.running):
            await running.stop()


@asynccontextmanager
async def payment_cluster(data_dir: Path) -> AsyncIterator[PaymentCluster]:
    cluster = PaymentCluster(data_dir)
    try:
        yield cluster
    finally:
        await cluster.close()


def money(units: int, currency: str = "EUR", nanos: int = 0) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def authorize_request(
    request_id: str | None = None,
    order_id: str | None = None,
    amount: money_pb2.Money | None = None,
    token: str = "tok_visa",
) -> payment_pb2.AuthorizePaymentRequest:
    order_id = order_id or new_id("ord")
    return payment_pb2.AuthorizePaymentRequest(
        request_id=request_id or f"{order_id}:authorize",
        order_id=order_id,
        amount=amount if amount is not None else money(25, "EUR", 500_000_000),
        payment_method_token=token,
    )


async def authorize(stub: payment_pb2_grpc.PaymentServiceAsyncStub, **kwargs: Any) -> payment_pb2.Payment:
    reply = await stub.AuthorizePayment(authorize_request(**kwargs), timeout=TIMEOUT)
    return reply.payment


async def capture(stub: payment_pb2_grpc.PaymentServiceAsyncStub, payment_id: str) -> payment_pb2.Payment:
    reply = await stub.CapturePayment(
        payment_pb2.CapturePaymentRequest(request_id=f"{payment_id}:capture", payment_id=payment_id),
        timeout=TIMEOUT,
    )
    return reply.payment


async def read_events(call: Any, count: int, timeout: float = TIMEOUT) -> list[payment_pb2.PaymentEvent]:
    """The next `count` events of a WatchPaymentEvents call, bounded in time."""
    events: list[payment_pb2.PaymentEvent] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            reply = await call.read()
            assert reply is not grpc.aio.EOF, "stream ended"
            events.append(reply.event)
    return events
