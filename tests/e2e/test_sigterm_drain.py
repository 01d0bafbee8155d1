"""SIGTERM on a real order process: health NOT_SERVING first, in-flight CreateOrder calls finish,
new calls are refused, an open WatchOrder ends UNAVAILABLE (resume hint), exit 0 within the grace."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from tests.e2e.order_processes import Processes, three_services

GRACE = 10.0
STEP_DELAY = 1.0  # each saga step sleeps this long: a CreateOrder takes ~3 s


def _create(user_id: str) -> order_pb2.CreateOrderRequest:
    return order_pb2.CreateOrderRequest(
        request_id=uuid.uuid4().hex,
        user_id=user_id,
        line_items=[
            order_pb2.LineItem(sku="A", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=5))
        ],
        payment_method_token="tok_visa",
    )


async def _scenario(p: Processes) -> None:
    async with (
        grpc.aio.insecure_channel(p.user.address) as user_channel,
        grpc.aio.insecure_channel(p.order.address) as order_channel,
    ):
        users = user_pb2_grpc.UserServiceStub(user_channel)
        orders = order_pb2_grpc.OrderServiceStub(order_channel)
        health = health_pb2_grpc.HealthStub(order_channel)
        user = await users.CreateUser(
            user_pb2.CreateUserRequest(request_id="u1", email="drain@example.com", display_name="D"),
            timeout=10,
        )
        user_id = user.user.user_id

        # An order that stays AWAITING_SETTLEMENT (settlement delay is long), watched live.
        watched = (await orders.CreateOrder(_create(user_id), timeout=20)).order
        watch = orders.WatchOrder(order_pb2.WatchOrderRequest(order_id=watched.order_id), timeout=60)
        for _ in range(3):
            await watch.read()  # PENDING, PAYMENT_AUTHORIZED, AWAITING_SETTLEMENT

        health_watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        first = await health_watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        finished: list[float] = []

        async def in_flight() -> order_pb2.Order:
            reply = await orders.CreateOrder(_create(user_id), timeout=30)
            finished.append(time.monotonic())
            return reply.order

        calls = [asyncio.create_task(in_flight()) for _ in range(3)]
        # In flight = their order rows exist (written before the first delayed step).
        for _ in range(200):
            if len((await orders.ListOrders(order_pb2.ListOrdersRequest(), timeout=5)).orders) == 4:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the CreateOrder calls never got in flight")

        sigterm_at = time.monotonic()
        p.order.signal(signal.SIGTERM)
        second = await health_watch.read()
        not_serving_at = time.monotonic()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING

        try:
            await watch.read()
            raise AssertionError("WatchOrder delivered after SIGTERM instead of ending")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert "after_sequence" in (exc.details() or "")

        try:
            await orders.GetOrder(order_pb2.GetOrderRequest(order_id=watched.order_id), timeout=3)
            raise AssertionError("a new call was accepted while draining")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE

        done = await asyncio.gather(*calls)
        assert all(o.state == order_pb2.ORDER_STATE_AWAITING_SETTLEMENT for o in done)
        assert not_serving_at < min(finished)
        code = await asyncio.to_thread(p.order.wait, GRACE + 5)
        assert code == 0
        assert time.monotonic() - sigterm_at < GRACE + 2


def test_sigterm_drains_in_flight_calls_and_ends_streams(tmp_path: Path) -> None:
    with three_services(
        tmp_path,
        order_env={"ORDER_TEST_STEP_DELAY_SECONDS": str(STEP_DELAY), "GRACE_PERIOD_SECONDS": str(GRACE)},
        order_module="tests.integration.order_with_faults",
        payment_env={"SETTLEMENT_DELAY_SECONDS": "600"},
    ) as processes:
        try:
            asyncio.run(asyncio.wait_for(_scenario(processes), 60))
        except BaseException as exc:
            raise AssertionError(f"{exc!r}\n{processes.logs()}") from exc
