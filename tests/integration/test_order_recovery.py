"""A crash between authorize and capture leaves no orphan authorization: after a restart the
reconciler finishes the saga (policy: finish forward, see docs/decisions.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2

from shop_mesh.services.order.app import SERVICE_NAME as ORDER_SERVICE
from tests.integration.order_stack import Stack, create_request, running_stack, watch_states
from tests.support import ServiceProcess, free_port, wait_serving

FAULTY_ORDER = "tests.integration.order_with_faults"


@pytest.fixture
async def stack(database_url_factory: Callable[[str], str]) -> AsyncIterator[tuple[Stack, str]]:
    async with running_stack(database_url_factory) as s:
        yield s, database_url_factory("order_process")


def _order_process(
    stack: Stack, url: str, tmp_path: Path, port: int, *, module: str | None = None, **env: str
) -> ServiceProcess:
    return ServiceProcess(
        "order",
        {
            "PORT": str(port),
            "ORDER_DATABASE_URL": url,
            "DATA_DIR": str(tmp_path),
            "USER_SERVICE_ADDR": stack.user_addr,
            "PAYMENT_SERVICE_ADDR": stack.payment_addr,
            "EVENT_POLL_INTERVAL_SECONDS": "0.05",
            "RECONCILE_INTERVAL_SECONDS": "0.5",
            **env,
        },
        tmp_path / f"order-{port}.log",
        module=module,
    )


async def test_crash_after_authorize_is_finished_after_restart(
    stack: tuple[Stack, str], tmp_path: Path
) -> None:
    s, url = stack
    user_id = await s.create_user()
    port = free_port()
    first = _order_process(s, url, tmp_path, port, module=FAULTY_ORDER, ORDER_TEST_CRASH_AFTER="authorize")
    second: ServiceProcess | None = None
    try:
        await wait_serving(f"127.0.0.1:{port}", ORDER_SERVICE)
        request = create_request(user_id, request_id="crash-me")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await order_pb2_grpc.OrderServiceStub(channel).CreateOrder(request, timeout=15)
        assert await asyncio.to_thread(first.wait, 10) == 137
        (payment,) = (await s.payments.ListPayments(payment_pb2.ListPaymentsRequest(), timeout=5)).payments
        assert payment.state == payment_pb2.PAYMENT_STATE_AUTHORIZED  # money is held, saga interrupted

        # Restart as the real service (no hook); any saga untouched for 0 s counts as stuck for this test.
        second = _order_process(s, url, tmp_path, port, RECONCILE_STUCK_AFTER_SECONDS="0")
        await wait_serving(f"127.0.0.1:{port}", ORDER_SERVICE)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = order_pb2_grpc.OrderServiceStub(channel)
            events = await watch_states(stub, payment.order_id, timeout=30)
            assert [e.state for e in events] == [
                order_pb2.ORDER_STATE_PENDING,
                order_pb2.ORDER_STATE_PAYMENT_AUTHORIZED,
                order_pb2.ORDER_STATE_AWAITING_SETTLEMENT,
                order_pb2.ORDER_STATE_PAID,
            ]
            # The client's retry with the same request_id gets the same order, now finished.
            retry = await stub.CreateOrder(request, timeout=15)
            assert (retry.order.order_id, retry.order.state) == (payment.order_id, order_pb2.ORDER_STATE_PAID)
        payments = (await s.payments.ListPayments(payment_pb2.ListPaymentsRequest(), timeout=5)).payments
        assert [(p.payment_id, p.state) for p in payments] == [
            (payment.payment_id, payment_pb2.PAYMENT_STATE_SETTLED)
        ]
    finally:
        first.kill()
        if second is not None:
            second.kill()
