"""OrderService in-process with the real user and payment services, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import grpc
import pytest
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2
from sqlalchemy import Table, func, select

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.outbox import SequenceAllocator
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.app import SERVICE_NAME as ORDER_SERVICE
from shop_mesh.services.order.model import LineItem, Order, OrderState
from shop_mesh.services.order.repository import (
    ORDER_EVENTS_SEQUENCE,
    SqlOrderRepository,
    metadata,
    order_events,
    orders,
    sequences,
)
from tests.integration.order_stack import (
    Stack,
    create_request,
    order_host,
    running_stack,
    start_host,
    watch_states,
)
from tests.support import error_details

S = order_pb2.OrderState


@pytest.fixture
async def stack(database_url_factory: Callable[[str], str]) -> AsyncIterator[Stack]:
    async with running_stack(database_url_factory) as s:
        yield s


async def _rows(stack: Stack, table: Table = orders) -> int:
    db = Database(stack.order_db_url, metadata)
    query = select(func.count()).select_from(table)
    try:
        count: int | None = await db.read(lambda session: session.scalar(query))
        return int(count or 0)
    finally:
        await db.dispose()


async def _payments_of(stack: Stack, order_id: str) -> list[payment_pb2.Payment]:
    reply = await stack.payments.ListPayments(payment_pb2.ListPaymentsRequest(order_id=order_id), timeout=10)
    return list(reply.payments)


async def _next_event(call: object) -> order_pb2.OrderEvent:
    reply = await call.read()  # type: ignore[attr-defined]
    assert isinstance(reply, order_pb2.WatchOrderResponse), reply
    return reply.event


async def test_order_is_paid_and_watch_shows_every_step(stack: Stack) -> None:
    user_id = await stack.create_user()
    reply = await stack.order.CreateOrder(create_request(user_id), timeout=15)
    order = reply.order
    assert order.state in (S.ORDER_STATE_AWAITING_SETTLEMENT, S.ORDER_STATE_PAID)
    assert (order.total.currency_code, order.total.units, order.total.nanos) == ("EUR", 25, 500_000_000)
    assert order.payment_id.startswith("pay_")
    events = await watch_states(stack.order, order.order_id)
    assert [e.state for e in events] == [
        S.ORDER_STATE_PENDING,
        S.ORDER_STATE_PAYMENT_AUTHORIZED,
        S.ORDER_STATE_AWAITING_SETTLEMENT,
        S.ORDER_STATE_PAID,
    ]
    assert [e.sequence for e in events] == sorted({e.sequence for e in events})
    assert events[-1].order.state == S.ORDER_STATE_PAID
    for e in events:  # what each event's snapshot takes from the order itself (cached by the reader)
        assert e.order.order_id == order.order_id
        assert (e.order.user_id, e.order.total, e.order.create_time) == (
            user_id,
            order.total,
            order.create_time,
        )
        assert list(e.order.line_items) == list(order.line_items)
    (payment,) = await _payments_of(stack, order.order_id)
    assert payment.state == payment_pb2.PAYMENT_STATE_SETTLED
    got = await stack.order.GetOrder(order_pb2.GetOrderRequest(order_id=order.order_id), timeout=5)
    assert got.order.state == S.ORDER_STATE_PAID


async def test_concurrent_identical_creates_make_one_order_and_one_payment(stack: Stack) -> None:
    user_id = await stack.create_user()
    request = create_request(user_id, request_id="same-request")
    replies = await asyncio.gather(*(stack.order.CreateOrder(request, timeout=30) for _ in range(10)))
    assert len({r.order.order_id for r in replies}) == 1
    assert await _rows(stack) == 1
    payments = await _payments_of(stack, replies[0].order.order_id)
    assert len(payments) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.order.CreateOrder(
            create_request(user_id, request_id="same-request", units=99), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(err.value)[0] == "REQUEST_ID_REUSED"


async def test_declined_payment_rejects_the_order(stack: Stack) -> None:
    user_id = await stack.create_user()
    reply = await stack.order.CreateOrder(create_request(user_id, token="tok_decline"), timeout=15)
    assert (reply.order.state, reply.order.reason) == (S.ORDER_STATE_REJECTED, "PAYMENT_DECLINED")
    events = await watch_states(stack.order, reply.order.order_id)
    assert [e.state for e in events] == [S.ORDER_STATE_PENDING, S.ORDER_STATE_REJECTED]


async def test_unknown_or_inactive_user_is_failed_precondition_and_writes_nothing(stack: Stack) -> None:
    deleted = await stack.create_user(active=False)
    for user_id, reason in [(new_id("usr"), "USER_NOT_FOUND"), (deleted, "USER_NOT_ACTIVE")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.order.CreateOrder(create_request(user_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(err.value)[0] == reason
    assert await _rows(stack) == 0


def _bad(field: str) -> Callable[[order_pb2.CreateOrderRequest], None]:
    def mutate(r: order_pb2.CreateOrderRequest) -> None:
        if field == "user_id":
            r.user_id = "usr_123"
        elif field == "line_items":
            del r.line_items[:]
        elif field == "line_items[1].unit_price.currency_code":
            r.line_items[1].unit_price.currency_code = "XYZ"
        elif field == "line_items[0].quantity":
            r.line_items[0].quantity = 1001
        elif field == "line_items[0].unit_price":
            r.line_items[0].unit_price.CopyFrom(money_pb2.Money(currency_code="EUR", units=-1))
        elif field == "line_items[0].unit_price.nanos":
            r.line_items[0].unit_price.nanos = 1_000_000_000
        elif field == "line_items[0].sku":
            r.line_items[0].sku = "x" * 65
        elif field == "payment_method_token":
            r.payment_method_token = ""
        elif field == "request_id":
            r.request_id = "bad id"

    return mutate


@pytest.mark.parametrize(
    "field",
    [
        "user_id",
        "line_items",
        "line_items[1].unit_price.currency_code",
        "line_items[0].quantity",
        "line_items[0].unit_price",
        "line_items[0].unit_price.nanos",
        "line_items[0].sku",
        "payment_method_token",
        "request_id",
    ],
)
async def test_invalid_create_names_the_field_and_writes_nothing(stack: Stack, field: str) -> None:
    user_id = await stack.create_user()
    request = create_request(user_id)
    _bad(field)(request)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.order.CreateOrder(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(err.value)[1]
    assert await _rows(stack) == 0


async def test_get_list_and_their_errors(stack: Stack) -> None:
    alice, bob = await stack.create_user(), await stack.create_user()
    created = [
        (await stack.order.CreateOrder(create_request(u), timeout=15)).order.order_id
        for u in (alice, bob, alice, alice)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.order.GetOrder(order_pb2.GetOrderRequest(order_id=new_id("ord")), timeout=5)
    assert (err.value.code(), error_details(err.value)[0]) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.order.GetOrder(order_pb2.GetOrderRequest(order_id="ord_x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "order_id" in error_details(err.value)[1]

    first = await stack.order.ListOrders(order_pb2.ListOrdersRequest(page_size=2, user_id=alice), timeout=5)
    second = await stack.order.ListOrders(
        order_pb2.ListOrdersRequest(page_size=2, user_id=alice, page_token=first.next_page_token), timeout=5
    )
    assert [o.order_id for o in [*first.orders, *second.orders]] == [created[0], created[2], created[3]]
    assert second.next_page_token == ""
    everything = await stack.order.ListOrders(order_pb2.ListOrdersRequest(), timeout=5)
    assert [o.order_id for o in everything.orders] == created
    for bad, field in [
        (order_pb2.ListOrdersRequest(page_size=-1), "page_size"),
        (order_pb2.ListOrdersRequest(page_token=first.next_page_token, user_id=bob), "page_token"),
        (order_pb2.ListOrdersRequest(user_id="nope"), "user_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.order.ListOrders(bad, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error_details(err.value)[1]


async def test_cancel_refunds_a_paid_order_once(stack: Stack) -> None:
    user_id = await stack.create_user()
    order = (await stack.order.CreateOrder(create_request(user_id), timeout=15)).order
    await watch_states(stack.order, order.order_id)  # until PAID
    cancel = order_pb2.CancelOrderRequest(request_id="cancel-1", order_id=order.order_id, reason="too late")
    replies = await asyncio.gather(*(stack.order.CancelOrder(cancel, timeout=15) for _ in range(5)))
    assert {(r.order.state, r.order.reason) for r in replies} == {(S.ORDER_STATE_CANCELLED, "too late")}
    (payment,) = await _payments_of(stack, order.order_id)
    assert payment.state == payment_pb2.PAYMENT_STATE_REFUNDED
    async with asyncio.timeout(10):
        events = await watch_states(stack.order, order.order_id, after=0)
    assert [e.state for e in events][-1] == S.ORDER_STATE_PAID  # the stream ends at the first terminal event
    tail = await watch_states(stack.order, order.order_id, after=events[-1].sequence)
    assert [e.state for e in tail] == [S.ORDER_STATE_CANCELLED]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.order.CancelOrder(
            order_pb2.CancelOrderRequest(request_id="cancel-2", order_id=order.order_id), timeout=10
        )
    assert (err.value.code(), error_details(err.value)[0]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ORDER_NOT_CANCELLABLE",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.order.CancelOrder(
            order_pb2.CancelOrderRequest(request_id="cancel-1", order_id=order.order_id, reason="other"),
            timeout=10,
        )
    assert error_details(err.value)[0] == "REQUEST_ID_REUSED"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.order.CancelOrder(
            order_pb2.CancelOrderRequest(request_id="cancel-3", order_id=new_id("ord")), timeout=10
        )
    assert (err.value.code(), error_details(err.value)[0]) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")


async def test_cancel_of_a_rejected_order_is_refused(stack: Stack) -> None:
    user_id = await stack.create_user()
    order = (await stack.order.CreateOrder(create_request(user_id, token="tok_decline"), timeout=15)).order
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.order.CancelOrder(
            order_pb2.CancelOrderRequest(request_id=uuid.uuid4().hex, order_id=order.order_id), timeout=10
        )
    assert error_details(err.value)[0] == "ORDER_NOT_CANCELLABLE"


async def test_watch_resumes_without_gap_or_duplicate_across_disconnect_and_restart(stack: Stack) -> None:
    user_id = await stack.create_user()
    # Hold the saga at AWAITING_SETTLEMENT: cancel-free, just read part of the stream first.
    order = (await stack.order.CreateOrder(create_request(user_id), timeout=15)).order
    call = stack.order.WatchOrder(order_pb2.WatchOrderRequest(order_id=order.order_id), timeout=10)
    first = await _next_event(call)
    call.cancel()  # a disconnect
    second_call = stack.order.WatchOrder(
        order_pb2.WatchOrderRequest(order_id=order.order_id, after_sequence=first.sequence), timeout=10
    )
    second = await _next_event(second_call)
    second_call.cancel()
    await stack.restart_order()
    rest = await watch_states(stack.order, order.order_id, after=second.sequence)
    states = [first.state, second.state, *(e.state for e in rest)]
    assert states == [
        S.ORDER_STATE_PENDING,
        S.ORDER_STATE_PAYMENT_AUTHORIZED,
        S.ORDER_STATE_AWAITING_SETTLEMENT,
        S.ORDER_STATE_PAID,
    ]
    # Resuming after the terminal event ends at once.
    assert await watch_states(stack.order, order.order_id, after=rest[-1].sequence) == []


async def test_watch_errors(stack: Stack) -> None:
    for request, code, field in [
        (order_pb2.WatchOrderRequest(order_id=new_id("ord")), grpc.StatusCode.NOT_FOUND, None),
        (order_pb2.WatchOrderRequest(order_id=""), grpc.StatusCode.INVALID_ARGUMENT, "order_id"),
        (
            order_pb2.WatchOrderRequest(order_id=new_id("ord"), after_sequence=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "after_sequence",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch_states(stack.order, request.order_id, after=request.after_sequence)
        assert err.value.code() == code
        if field:
            assert field in error_details(err.value)[1]


async def test_open_watch_ends_unavailable_on_shutdown(stack: Stack) -> None:
    user_id = await stack.create_user()
    pending = await _pending_order(stack, user_id)
    call = stack.order.WatchOrder(order_pb2.WatchOrderRequest(order_id=pending), timeout=20)
    assert (await _next_event(call)).state == S.ORDER_STATE_PENDING  # the stream is open and live
    stopper = asyncio.create_task(stack.hosts[-1].stop(grace=5))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _next_event(call)
    await stopper
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "resume with after_sequence" in (err.value.details() or "")


async def _pending_order(stack: Stack, user_id: str) -> str:
    """A PENDING order nobody drives (as if its CreateOrder died), with its first event."""
    db = Database(stack.order_db_url, metadata)
    try:
        now = datetime.now(UTC)
        order = Order(
            order_id=new_id("ord"),
            user_id=user_id,
            line_items=(LineItem("X", 1, Money.of("EUR", 1)),),
            total=Money.of("EUR", 1),
            state=OrderState.PENDING,
            payment_id="",
            reason="",
            create_time=now,
            update_time=now,
            payment_method_token="tok",
        )
        allocator = SequenceAllocator(sequences, ORDER_EVENTS_SEQUENCE)

        def insert(session: Session) -> None:
            repo = SqlOrderRepository(session)
            repo.insert(order, uuid.uuid4().hex, "f")
            repo.add_event(order, allocator.next(session), now)

        await db.write(insert)
        return order.order_id
    finally:
        await db.dispose()


async def test_two_replicas_apply_each_settlement_once(stack: Stack) -> None:
    """Both replicas consume the payment events; each order still gets exactly one PAID event."""
    replica = order_host(stack.order_db_url, stack.user_addr, stack.payment_addr)
    stack.hosts.insert(0, replica)  # stopped last by the fixture
    address = await start_host(replica, ORDER_SERVICE)
    user_id = await stack.create_user()
    async with grpc.aio.insecure_channel(address) as channel:
        other = order_pb2_grpc.OrderServiceStub(channel)
        created = await asyncio.gather(
            *(stub.CreateOrder(create_request(user_id), timeout=20) for stub in [stack.order, other] * 3)
        )
        for reply in created:
            # A stream on one replica sees the events the other replica wrote.
            states = [e.state for e in await watch_states(other, reply.order.order_id)]
            assert states[-1] == S.ORDER_STATE_PAID
    assert await _rows(stack, order_events) == 4 * len(created)
