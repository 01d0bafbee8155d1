"""The saga always ends, through real gRPC: a real order-service and user-service, and a scripted
PaymentService that refuses or fails the way a broken or stricter payment-service would.

- a non-transient answer from payment ends the order in the CreateOrder call itself (OK, REJECTED,
  reason PAYMENT_REFUSED), with the authorization voided;
- a payment-service that keeps failing (transient or unknown outcome) gets the order REJECTED
  (SAGA_TIMEOUT) by the reconciler within its bound, with the authorization voided;
- an upstream refusal never reaches the client as INTERNAL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.services.common.server import ServiceHost
from shop_mesh.services.order.app import SERVICE_NAME as ORDER_SERVICE
from shop_mesh.services.user.app import build as build_user
from shop_mesh.services.user.config import UserSettings
from tests.integration.order_stack import create_request, order_host, running_stack, start_host, watch_states
from tests.support import error_details

Context = grpc.aio.ServicerContext[Any, Any]


class ScriptedPayments(payment_pb2_grpc.PaymentServiceServicer):
    """Authorizes, captures and voids like the real service (one payment per order) unless a method
    is scripted to answer a status code instead; records what it was asked to do."""

    def __init__(self) -> None:
        self.fail: dict[str, grpc.StatusCode] = {}
        self.payments: dict[str, payment_pb2.Payment] = {}
        self.calls: list[str] = []
        self.void_request_ids: set[str] = set()

    async def _script(self, method: str, context: Context) -> None:
        self.calls.append(method)
        code = self.fail.get(method)
        if code is not None:
            await context.abort(code, f"scripted {code.name}")

    def _set(self, payment_id: str, state: int) -> payment_pb2.Payment:
        self.payments[payment_id].state = state  # type: ignore[assignment]
        return self.payments[payment_id]

    async def AuthorizePayment(
        self, request: payment_pb2.AuthorizePaymentRequest, context: Context
    ) -> payment_pb2.AuthorizePaymentResponse:
        await self._script("AuthorizePayment", context)
        payment_id = f"pay_{request.order_id}"
        if payment_id not in self.payments:
            self.payments[payment_id] = payment_pb2.Payment(
                payment_id=payment_id,
                order_id=request.order_id,
                amount=request.amount,
                state=payment_pb2.PAYMENT_STATE_AUTHORIZED,
            )
        return payment_pb2.AuthorizePaymentResponse(payment=self.payments[payment_id])

    async def CapturePayment(
        self, request: payment_pb2.CapturePaymentRequest, context: Context
    ) -> payment_pb2.CapturePaymentResponse:
        await self._script("CapturePayment", context)
        return payment_pb2.CapturePaymentResponse(
            payment=self._set(request.payment_id, payment_pb2.PAYMENT_STATE_CAPTURED)
        )

    async def VoidPayment(
        self, request: payment_pb2.VoidPaymentRequest, context: Context
    ) -> payment_pb2.VoidPaymentResponse:
        await self._script("VoidPayment", context)
        self.void_request_ids.add(request.request_id)
        return payment_pb2.VoidPaymentResponse(
            payment=self._set(request.payment_id, payment_pb2.PAYMENT_STATE_VOIDED)
        )

    async def RefundPayment(
        self, request: payment_pb2.RefundPaymentRequest, context: Context
    ) -> payment_pb2.RefundPaymentResponse:
        await self._script("RefundPayment", context)
        return payment_pb2.RefundPaymentResponse(
            payment=self._set(request.payment_id, payment_pb2.PAYMENT_STATE_REFUNDED)
        )

    async def GetPayment(
        self, request: payment_pb2.GetPaymentRequest, context: Context
    ) -> payment_pb2.GetPaymentResponse:
        await self._script("GetPayment", context)
        return payment_pb2.GetPaymentResponse(payment=self.payments[request.payment_id])

    async def ListPayments(
        self, request: payment_pb2.ListPaymentsRequest, context: Context
    ) -> payment_pb2.ListPaymentsResponse:
        await self._script("ListPayments", context)
        found = [p for p in self.payments.values() if p.order_id == request.order_id]
        return payment_pb2.ListPaymentsResponse(payments=found)

    async def WatchPaymentEvents(
        self, request: payment_pb2.WatchPaymentEventsRequest, context: Context
    ) -> AsyncIterator[payment_pb2.WatchPaymentEventsResponse]:
        await asyncio.Event().wait()  # no events; cancelled when either side stops
        yield payment_pb2.WatchPaymentEventsResponse()


async def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@dataclass
class Rig:
    payments: ScriptedPayments
    order: order_pb2_grpc.OrderServiceAsyncStub
    users: user_pb2_grpc.UserServiceAsyncStub
    cleanup: list[Any] = field(default_factory=list)

    async def user(self) -> str:
        reply = await self.users.CreateUser(
            user_pb2.CreateUserRequest(
                request_id=f"u-{uuid.uuid4().hex}",
                email=f"{uuid.uuid4().hex[:10]}@example.com",
                display_name="Ada",
            ),
            timeout=10,
        )
        return reply.user.user_id


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with _rig(lambda name: f"sqlite:///{tmp_path / name}.db") as r:
        yield r


@pytest.fixture
async def rig_any_db(database_url_factory: Callable[[str], str]) -> AsyncIterator[Rig]:
    """On SQLite and PostgreSQL: the reconciler's bookkeeping (attempts, backoff) is SQL of its own."""
    async with _rig(database_url_factory) as r:
        yield r


@asynccontextmanager
async def _rig(database_url_factory: Callable[[str], str], **order_settings: object) -> AsyncIterator[Rig]:
    fake = ScriptedPayments()
    payment_server = grpc.aio.server()
    payment_pb2_grpc.add_PaymentServiceServicer_to_server(fake, payment_server)
    payment_port = payment_server.add_insecure_port("127.0.0.1:0")
    await payment_server.start()
    user_settings = UserSettings(port=0, database_url=database_url_factory("user"))
    user_stop = asyncio.Event()
    user = ServiceHost(user_settings, build_user(user_settings, user_stop), stopping=user_stop)
    hosts = [user]
    channels: list[grpc.aio.Channel] = []
    try:
        user_addr = await start_host(user, "shop.user.v1.UserService")
        order = order_host(
            database_url_factory("order"),
            user_addr,
            f"127.0.0.1:{payment_port}",
            upstream_timeout_seconds=2.0,
            # Small bound for the test: any saga untouched for 0 s is stuck; 3 attempts, 0.1 s backoff.
            **{
                "reconcile_interval_seconds": 0.2,
                "reconcile_stuck_after_seconds": 0,
                "reconcile_max_attempts": 3,
                "reconcile_backoff_seconds": 0.1,
                "reconcile_max_backoff_seconds": 0.2,
                "reconcile_max_age_seconds": 60,
                **order_settings,
            },
        )
        hosts.append(order)
        order_addr = await start_host(order, ORDER_SERVICE)
        channels = [grpc.aio.insecure_channel(a) for a in (user_addr, order_addr)]
        yield Rig(
            payments=fake,
            users=user_pb2_grpc.UserServiceStub(channels[0]),
            order=order_pb2_grpc.OrderServiceStub(channels[1]),
        )
    finally:
        for channel in channels:
            await channel.close()
        for host in reversed(hosts):
            await host.stop(grace=0)
        await payment_server.stop(0)


@pytest.mark.parametrize(
    ("method", "code", "voided"),
    [
        ("AuthorizePayment", grpc.StatusCode.INVALID_ARGUMENT, False),
        ("AuthorizePayment", grpc.StatusCode.FAILED_PRECONDITION, False),
        ("AuthorizePayment", grpc.StatusCode.PERMISSION_DENIED, False),
        ("CapturePayment", grpc.StatusCode.INVALID_ARGUMENT, True),
        ("CapturePayment", grpc.StatusCode.NOT_FOUND, True),
    ],
)
async def test_payment_refusal_rejects_the_order_in_the_same_call(
    rig: Rig, method: str, code: grpc.StatusCode, voided: bool
) -> None:
    rig.payments.fail[method] = code
    request = create_request(await rig.user())
    reply = await rig.order.CreateOrder(request, timeout=10)
    assert (reply.order.state, reply.order.reason) == (order_pb2.ORDER_STATE_REJECTED, "PAYMENT_REFUSED")
    # One logical void (the CreateOrder call and the reconciler's sweep may both send it: same id).
    voids = {f"{reply.order.order_id}:void"} if voided else set()
    assert rig.payments.void_request_ids == voids
    assert all(p.state != payment_pb2.PAYMENT_STATE_AUTHORIZED for p in rig.payments.payments.values())
    # Final for everyone: the stream ends, a retry of the request answers the same.
    states = [e.state for e in await watch_states(rig.order, reply.order.order_id, timeout=10)]
    assert states[-1] == order_pb2.ORDER_STATE_REJECTED
    again = await rig.order.CreateOrder(request, timeout=10)
    assert (again.order.order_id, again.order.state) == (reply.order.order_id, order_pb2.ORDER_STATE_REJECTED)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
async def test_payment_failing_for_good_ends_the_order_within_the_bound(
    rig_any_db: Rig, code: grpc.StatusCode
) -> None:
    rig = rig_any_db
    rig.payments.fail["CapturePayment"] = code
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rig.order.CreateOrder(create_request(await rig.user()), timeout=10)
    # Retryable for the client (same request_id), never INTERNAL.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    (payment,) = rig.payments.payments.values()
    # The reconciler tries 3 times with backoff, then voids and rejects (bounded wait, no fixed sleep).
    events = await watch_states(rig.order, payment.order_id, timeout=30)
    assert [e.state for e in events][-1] == order_pb2.ORDER_STATE_REJECTED
    assert events[-1].reason == "SAGA_TIMEOUT"
    assert rig.payments.calls.count("CapturePayment") == 1 + 3  # the call itself, then 3 attempts
    # The order is final before its release runs (record first): wait, bounded, for the void.
    await _eventually(lambda: payment.state == payment_pb2.PAYMENT_STATE_VOIDED)


async def test_no_order_outlives_the_age_bound(tmp_path: Path) -> None:
    """Payment down for good, attempts to spare: the age bound alone ends the order, not before."""
    max_age = 2.0
    async with _rig(
        lambda name: f"sqlite:///{tmp_path / name}.db",
        reconcile_max_attempts=1000,
        reconcile_max_age_seconds=max_age,
    ) as rig:
        rig.payments.fail["AuthorizePayment"] = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rig.order.CreateOrder(create_request(await rig.user()), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        (order,) = (await rig.order.ListOrders(order_pb2.ListOrdersRequest(), timeout=10)).orders
        events = await watch_states(rig.order, order.order_id, timeout=30)
    last = events[-1]
    assert (last.state, last.reason) == (order_pb2.ORDER_STATE_REJECTED, "SAGA_TIMEOUT")
    lived = last.create_time.ToDatetime() - order.create_time.ToDatetime()
    # Bound: max age + stuck-after (0 here) + one reconcile interval (0.2 s); slack for a slow machine.
    assert max_age <= lived.total_seconds() < max_age + 10
    assert rig.payments.calls.count("AuthorizePayment") > 2  # it kept trying (with backoff) until then


class ScriptedUsers(user_pb2_grpc.UserServiceServicer):
    def __init__(self, code: grpc.StatusCode):
        self.code = code

    async def GetUser(self, request: user_pb2.GetUserRequest, context: Context) -> user_pb2.GetUserResponse:
        await context.abort(self.code, "scripted: " + "x" * 5000)  # long upstream details are not passed on
        raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("code", "expected", "reason"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION, "USER_SERVICE_REFUSED"),
        (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, "USER_SERVICE_REFUSED"),
        (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION, "USER_SERVICE_REFUSED"),
        (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, "USER_SERVICE_ERROR"),
    ],
)
async def test_user_service_refusal_is_a_clear_status_and_writes_nothing(
    tmp_path: Path, code: grpc.StatusCode, expected: grpc.StatusCode, reason: str
) -> None:
    user_server = grpc.aio.server()
    user_pb2_grpc.add_UserServiceServicer_to_server(ScriptedUsers(code), user_server)  # type: ignore[abstract]
    user_port = user_server.add_insecure_port("127.0.0.1:0")
    await user_server.start()
    payments = ScriptedPayments()
    payment_server = grpc.aio.server()
    payment_pb2_grpc.add_PaymentServiceServicer_to_server(payments, payment_server)
    payment_port = payment_server.add_insecure_port("127.0.0.1:0")
    await payment_server.start()
    host = order_host(
        f"sqlite:///{tmp_path / 'order.db'}", f"127.0.0.1:{user_port}", f"127.0.0.1:{payment_port}"
    )
    try:
        address = await start_host(host, ORDER_SERVICE)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = order_pb2_grpc.OrderServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateOrder(create_request("usr_01JD3A8Z6PCM9WQ5R2N4XKT7VB"), timeout=10)
            assert (err.value.code(), error_details(err.value)[0]) == (expected, reason)
            assert len(err.value.details() or "") < 200
            listed = await stub.ListOrders(order_pb2.ListOrdersRequest(), timeout=10)
        assert list(listed.orders) == [] and payments.calls == []
    finally:
        await host.stop(grace=0)
        await user_server.stop(0)
        await payment_server.stop(0)


async def test_token_the_payment_service_refuses_never_strands_an_order(tmp_path: Path) -> None:
    """The reported case: a 129-character payment_method_token, through the real three services."""
    async with running_stack(lambda name: f"sqlite:///{tmp_path / name}.db") as s:
        request = create_request(await s.create_user(), token="t" * 129)
        try:
            reply = await s.order.CreateOrder(request, timeout=15)
        except grpc.aio.AioRpcError as err:
            # Where order-service knows payment's limit, it refuses the request before writing anything.
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert "payment_method_token" in error_details(err)[1]
            listed = await s.order.ListOrders(order_pb2.ListOrdersRequest(), timeout=10)
            assert list(listed.orders) == []
        else:
            # Otherwise payment's refusal ends the order in the same call.
            assert (reply.order.state, reply.order.reason) == (
                order_pb2.ORDER_STATE_REJECTED,
                "PAYMENT_REFUSED",
            )
        payments = await s.payments.ListPayments(payment_pb2.ListPaymentsRequest(), timeout=10)
        assert list(payments.payments) == []
