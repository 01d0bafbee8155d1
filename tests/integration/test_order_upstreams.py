"""What order-service sends upstream (deadline, x-request-id, traceparent) and how upstream faults surface."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from shop.order.v1 import order_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc
from sqlalchemy import func, select

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.telemetry import configure_tracing
from shop_mesh.services.order.app import SERVICE_NAME as ORDER_SERVICE
from shop_mesh.services.order.repository import metadata, orders
from tests.integration.order_stack import create_request, order_host, start_host
from tests.support import error_details, free_port


class RecordingUsers(user_pb2_grpc.UserServiceServicer):
    """A test double of UserService that records what arrives; used only for this propagation test."""

    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}
        self.time_remaining: float | None = None
        self.called = asyncio.Event()

    async def GetUser(self, request: user_pb2.GetUserRequest, context: Any) -> user_pb2.GetUserResponse:
        self.metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        self.time_remaining = context.time_remaining()
        self.called.set()
        return user_pb2.GetUserResponse(
            user=user_pb2.User(user_id=request.user_id, state=user_pb2.USER_STATE_SUSPENDED)
        )


# Sampled: order records a server and a client span; unsampled: nothing records, and the trace
# context still travels on (same trace id, unsampled flag) for the upstream's log lines.
@pytest.mark.parametrize("flags", ["01", "00"])
async def test_deadline_request_id_and_traceparent_reach_the_upstream(tmp_path: Path, flags: str) -> None:
    configure_tracing("order-test", None)  # a real tracer, as `python -m shop_mesh.services.order` installs
    fake = RecordingUsers()  # type: ignore[abstract]  # only GetUser is needed
    upstream = grpc.aio.server()
    user_pb2_grpc.add_UserServiceServicer_to_server(fake, upstream)
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    host = order_host(
        f"sqlite:///{tmp_path / 'order.db'}",
        f"127.0.0.1:{upstream_port}",
        f"127.0.0.1:{free_port()}",
    )
    try:
        address = await start_host(host, ORDER_SERVICE)
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = order_pb2_grpc.OrderServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateOrder(
                    create_request(new_id("usr")),
                    timeout=3.0,
                    metadata=(
                        ("x-request-id", "req-propagation-1"),
                        ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-{flags}"),
                    ),
                )
        assert error_details(err.value)[0] == "USER_NOT_ACTIVE"  # the fake's answer came back
        assert fake.metadata["x-request-id"] == "req-propagation-1"
        assert fake.metadata["traceparent"].split("-")[1] == trace_id
        assert fake.metadata["traceparent"].split("-")[2] != "00f067aa0ba902b7"  # a child span
        assert fake.metadata["traceparent"].split("-")[3] == flags
        assert fake.time_remaining is not None and 1.0 < fake.time_remaining < 3.1
    finally:
        await host.stop(grace=0)
        await upstream.stop(0)


async def test_upstream_down_is_unavailable_and_nothing_is_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'order.db'}"
    host = order_host(
        url, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", upstream_timeout_seconds=1.0
    )
    try:
        address = await start_host(host, ORDER_SERVICE)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = order_pb2_grpc.OrderServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateOrder(create_request(new_id("usr")), timeout=10)
            assert time.monotonic() - started < 5
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(err.value)[0] == "USER_SERVICE_UNAVAILABLE"
    finally:
        await host.stop(grace=0)
    db = Database(url, metadata)
    try:
        assert await db.read(lambda session: session.scalar(select(func.count()).select_from(orders))) == 0
    finally:
        await db.dispose()
