"""The saga's business rules against fakes of its own ports (users, payments) and a SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Table, func, select

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.errors import AlreadyExists, FailedPrecondition, Unavailable
from shop_mesh.services.common.idempotency_sql import IdempotencyStore
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.outbox import SequenceAllocator
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.cancel import CancelOrder
from shop_mesh.services.order.metrics import MeteredOrderRepository
from shop_mesh.services.order.model import Change, LineItem, NewOrder, OrderState, Step, transition
from shop_mesh.services.order.ports import PaymentEvent, PaymentState, UserStatus
from shop_mesh.services.order.queries import OrderQueries
from shop_mesh.services.order.reconciler import Reconciler, SagaBound
from shop_mesh.services.order.repository import (
    ORDER_EVENTS_SEQUENCE,
    SqlOrderLookup,
    SqlOrderRepository,
    idempotency_keys,
    metadata,
    orders,
    sequences,
)
from shop_mesh.services.order.saga import OrderSaga
from shop_mesh.services.order.settlement import (
    PAYMENT_CURSOR_SAVE_EVERY,
    PAYMENT_EVENTS_CURSOR,
    SettlementConsumer,
)
from shop_mesh.services.order.store import Clock, OrderStore
from tests.unit.fakes.upstreams import FakePayments, FakeUsers

USER = new_id("usr")


@dataclass(frozen=True)
class OrderService:
    """The order service's use cases over one store, wired as the composition root (app.py) wires them."""

    store: OrderStore
    queries: OrderQueries
    saga: OrderSaga
    cancellation: CancelOrder
    settlement: SettlementConsumer
    reconciler: Reconciler


def wire(
    db: Database,
    users: FakeUsers,
    payments: FakePayments,
    bound: SagaBound,
    clock: Clock = lambda: datetime.now(UTC),
) -> OrderService:
    allocator = SequenceAllocator(sequences, ORDER_EVENTS_SEQUENCE)
    keys = IdempotencyStore(idempotency_keys)
    store = OrderStore(db, SqlOrderRepository, keys, allocator, poll_interval=0.05, clock=clock)
    saga = OrderSaga(store, users, payments)
    queries = OrderQueries(store)
    return OrderService(
        store,
        queries,
        saga,
        CancelOrder(store, payments, queries),
        SettlementConsumer(store, payments),
        Reconciler(saga, bound),
    )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[OrderService, FakeUsers, FakePayments, Database]]:
    db = Database(f"sqlite:///{tmp_path / 'order.db'}", metadata)
    await db.create_schema()
    allocator = SequenceAllocator(sequences, ORDER_EVENTS_SEQUENCE)

    def prepare(session: Session) -> None:
        allocator.ensure(session)
        SqlOrderRepository(session).ensure_cursor(PAYMENT_EVENTS_CURSOR)

    await db.write(prepare)
    users, payments = FakeUsers(), FakePayments()
    users.status[USER] = UserStatus.ACTIVE
    service = wire(db, users, payments, SagaBound(stuck_after=timedelta(0)))
    yield service, users, payments, db
    await db.dispose()


def _new(request_id: str = "req-1", token: str = "tok_visa", user: str = USER) -> NewOrder:
    items = (LineItem("A", 2, Money.of("EUR", 10)), LineItem("B", 1, Money.of("EUR", 0, 500_000_000)))
    return NewOrder(request_id, user, items, token)


async def _count(db: Database, table: Table) -> int:
    query = select(func.count()).select_from(table)
    count: int | None = await db.read(lambda session: session.scalar(query))
    return int(count or 0)


async def _states(service: OrderService, order_id: str) -> list[OrderState]:
    events = await service.store.db.read(
        lambda session: SqlOrderRepository(session).events_after(order_id, 0, 100)
    )
    return [e.state for e in events]


async def test_create_runs_the_saga_to_awaiting_settlement(world) -> None:
    service, _, payments, _ = world
    order = await service.saga.create_order(_new())
    assert order.state is OrderState.AWAITING_SETTLEMENT
    assert order.total == Money.of("EUR", 20, 500_000_000)
    assert payments.calls == ["authorize", "capture"]
    assert await _states(service, order.order_id) == [
        OrderState.PENDING,
        OrderState.PAYMENT_AUTHORIZED,
        OrderState.AWAITING_SETTLEMENT,
    ]


async def test_decline_is_a_rejected_order_not_an_error(world) -> None:
    service, _, payments, _ = world
    order = await service.saga.create_order(_new(token="tok_decline"))
    assert (order.state, order.reason) == (OrderState.REJECTED, "PAYMENT_DECLINED")
    assert payments.calls == ["authorize"]


@pytest.mark.parametrize(
    ("status", "reason"), [(None, "USER_NOT_FOUND"), (UserStatus.INACTIVE, "USER_NOT_ACTIVE")]
)
async def test_user_that_may_not_order_leaves_no_row(world, status: UserStatus | None, reason: str) -> None:
    service, users, _, db = world
    other = new_id("usr")
    if status is not None:
        users.status[other] = status
    with pytest.raises(FailedPrecondition) as err:
        await service.saga.create_order(_new(user=other))
    assert err.value.reason == reason
    assert await _count(db, orders) == 0


async def test_user_service_down_is_unavailable_and_writes_nothing(world) -> None:
    service, users, _, db = world
    users.down = True
    with pytest.raises(Unavailable):
        await service.saga.create_order(_new())
    assert await _count(db, orders) == 0


async def test_duplicate_returns_the_same_order_and_reuse_is_rejected(world) -> None:
    service, _, payments, db = world
    first = await service.saga.create_order(_new())
    again = await service.saga.create_order(_new())
    assert again.order_id == first.order_id
    assert payments.calls == ["authorize", "capture"]
    with pytest.raises(AlreadyExists) as err:
        await service.saga.create_order(_new(token="tok_other"))
    assert err.value.reason == "REQUEST_ID_REUSED"
    assert await _count(db, orders) == 1


async def test_reconciler_finishes_a_saga_whose_authorize_failed(world) -> None:
    service, _, payments, _ = world
    payments.authorize_down = True
    with pytest.raises(Unavailable):
        await service.saga.create_order(_new())
    payments.authorize_down = False
    assert await service.reconciler.reconcile_once() == 1
    (order,) = await service.store.db.read(lambda session: SqlOrderRepository(session).page(None, None, 10))
    assert order.state is OrderState.AWAITING_SETTLEMENT
    assert payments.calls == ["authorize", "capture"]
    assert await service.reconciler.reconcile_once() == 0


async def test_settlement_event_is_applied_once(world) -> None:
    service, _, _, db = world
    order = await service.saga.create_order(_new())
    event = PaymentEvent(7, True, order.payment_id, order.order_id)
    assert await service.settlement.apply_payment_event(event)
    assert not await service.settlement.apply_payment_event(event)  # replay after a restart / other replica
    assert not await service.settlement.apply_payment_event(
        PaymentEvent(5, True, order.payment_id, order.order_id)
    )
    assert (await service.queries.get_order(order.order_id)).state is OrderState.PAID
    assert (await _states(service, order.order_id)).count(OrderState.PAID) == 1
    assert await db.read(lambda session: SqlOrderRepository(session).cursor(PAYMENT_EVENTS_CURSOR)) == 7


async def test_payment_events_that_change_no_order_store_the_cursor_only_now_and_then(world) -> None:
    service, _, _, db = world
    order = await service.saga.create_order(_new())

    async def stored_cursor() -> int:
        cursor: int = await db.read(lambda session: SqlOrderRepository(session).cursor(PAYMENT_EVENTS_CURSOR))
        return cursor

    def event(sequence: int, settled: bool = False) -> PaymentEvent:
        return PaymentEvent(sequence, settled, order.payment_id, order.order_id)

    assert await service.settlement.apply_payment_event(event(1))
    assert await service.settlement.apply_payment_event(event(2))
    assert not await service.settlement.apply_payment_event(event(2))  # a replay is still recognised
    assert await stored_cursor() == 0  # no write transaction for these
    far = 2 + PAYMENT_CURSOR_SAVE_EVERY
    assert await service.settlement.apply_payment_event(event(far))
    assert await stored_cursor() == far  # stored now and then, so a restart replays a bounded tail
    assert await service.settlement.apply_payment_event(event(far + 1, settled=True))
    assert await stored_cursor() == far + 1  # an event that changes an order always stores it
    assert (await service.queries.get_order(order.order_id)).state is OrderState.PAID


async def test_settlement_before_our_capture_step_commits_still_pays(world) -> None:
    service, _, payments, _ = world
    payments.authorize_down = True
    with pytest.raises(Unavailable):
        await service.saga.create_order(_new())
    payments.authorize_down = False
    (order,) = await service.store.db.read(lambda session: SqlOrderRepository(session).page(None, None, 10))
    authorized = await service.saga._authorize(order)
    assert authorized.state is OrderState.PAYMENT_AUTHORIZED
    await service.settlement.apply_payment_event(PaymentEvent(1, True, authorized.payment_id, order.order_id))
    assert (await _states(service, order.order_id))[-2:] == [OrderState.AWAITING_SETTLEMENT, OrderState.PAID]


async def test_cancel_voids_or_refunds_and_is_idempotent(world) -> None:
    service, _, payments, _ = world
    order = await service.saga.create_order(_new())
    cancelled = await service.cancellation.cancel_order("c-1", order.order_id, "changed my mind")
    assert (cancelled.state, cancelled.reason) == (OrderState.CANCELLED, "changed my mind")
    assert payments.calls[-1] == "refund"
    again = await service.cancellation.cancel_order("c-1", order.order_id, "changed my mind")
    assert again.state is OrderState.CANCELLED and payments.calls.count("refund") == 1
    with pytest.raises(AlreadyExists) as reused:
        await service.cancellation.cancel_order("c-1", order.order_id, "another reason")
    assert reused.value.reason == "REQUEST_ID_REUSED" and "CancelOrder" in reused.value.message
    with pytest.raises(FailedPrecondition) as err:
        await service.cancellation.cancel_order("c-2", order.order_id, "")
    assert err.value.reason == "ORDER_NOT_CANCELLABLE"


async def test_a_cancel_replay_is_counted_once_with_metrics_on(world) -> None:
    # The metered adapter counts CancelOrder's replay; the pure replay rule counts nothing itself.
    service, _, payments, db = world
    store = OrderStore(db, MeteredOrderRepository, service.store.idempotency, service.store.sequences)
    cancellation = CancelOrder(store, payments, OrderQueries(store))
    order = await service.saga.create_order(_new())
    await cancellation.cancel_order("c-1", order.order_id, "")

    def replays() -> float:
        return REGISTRY.get_sample_value("idempotent_replays_total", {"operation": "CancelOrder"}) or 0.0

    before = replays()
    assert (await cancellation.cancel_order("c-1", order.order_id, "")).state is OrderState.CANCELLED
    assert replays() == before + 1


async def test_cancel_of_authorized_order_voids(world) -> None:
    service, _, payments, _ = world
    payments.authorize_down = True
    with pytest.raises(Unavailable):
        await service.saga.create_order(_new())
    payments.authorize_down = False
    (order,) = await service.store.db.read(lambda session: SqlOrderRepository(session).page(None, None, 10))
    authorized = await service.saga._authorize(order)
    cancelled = await service.cancellation.cancel_order("c-1", order.order_id, "")
    assert cancelled.state is OrderState.CANCELLED
    assert payments.by_id[authorized.payment_id].state is PaymentState.VOIDED


async def test_cancel_during_authorization_leaves_no_authorization(world) -> None:
    service, _, payments, _ = world
    payments.authorize_gate = asyncio.Event()
    creating = asyncio.create_task(service.saga.create_order(_new()))
    for _ in range(200):
        page = await service.store.db.read(lambda session: SqlOrderRepository(session).page(None, None, 10))
        if page:
            break
        await asyncio.sleep(0.01)
    cancelled = await service.cancellation.cancel_order("c-1", page[0].order_id, "")
    assert cancelled.state is OrderState.CANCELLED and cancelled.release_pending
    payments.authorize_gate.set()
    result = await asyncio.wait_for(creating, 10)
    assert result.state is OrderState.CANCELLED
    assert [p.state for p in payments.by_id.values()] == [PaymentState.VOIDED]
    # The reconciler's sweep for cancelled-while-pending orders finds nothing left to release.
    assert await service.reconciler.reconcile_once() == 0


async def test_watch_of_a_final_order_ends_at_once(world) -> None:
    service, _, _, _ = world
    order = await service.saga.create_order(_new(token="tok_decline"))
    stopping = asyncio.Event()
    events = [e async for e in service.queries.watch_order(order.order_id, 0, stopping)]
    assert [e.state for e in events] == [OrderState.PENDING, OrderState.REJECTED]
    assert [e async for e in service.queries.watch_order(order.order_id, events[-1].sequence, stopping)] == []


async def test_reconciler_releases_an_authorization_made_for_an_order_cancelled_while_pending(world) -> None:
    service, _, payments, _ = world
    payments.authorize_down = True
    with pytest.raises(Unavailable):
        await service.saga.create_order(_new())
    payments.authorize_down = False
    (order,) = await service.store.db.read(lambda session: SqlOrderRepository(session).page(None, None, 10))
    # Its driver authorized and then died before recording it; the customer cancels meanwhile.
    orphan = await payments.authorize(f"{order.order_id}:authorize", order.order_id, order.total, "tok")
    cancelled = await service.cancellation.cancel_order("c-1", order.order_id, "")
    assert cancelled.release_pending and payments.by_id[orphan.payment_id].state is PaymentState.AUTHORIZED
    assert await service.reconciler.reconcile_once() == 1
    assert payments.by_id[orphan.payment_id].state is PaymentState.VOIDED
    after = await service.queries.get_order(order.order_id)
    assert (after.state, after.payment_id, after.release_pending) == (
        OrderState.CANCELLED,
        orphan.payment_id,
        False,
    )
    assert await service.reconciler.reconcile_once() == 0


async def test_authorization_voided_behind_our_back_ends_the_saga_cancelled(world) -> None:
    service, _, payments, _ = world
    payments.authorize_down = True
    with pytest.raises(Unavailable):
        await service.saga.create_order(_new())
    payments.authorize_down = False
    (order,) = await service.store.db.read(lambda session: SqlOrderRepository(session).page(None, None, 10))
    authorized = await service.saga._authorize(order)
    await payments.void("someone-else", authorized.payment_id)  # e.g. a cancel that crashed before commit
    result = await service.saga.advance(authorized)
    assert (result.state, result.reason) == (OrderState.CANCELLED, "PAYMENT_VOIDED")


async def test_fast_request_id_lookup_matches_the_session_read(world) -> None:
    service, _, _, db = world
    order = await service.saga.create_order(_new())
    lookup = SqlOrderLookup(db)
    fast = await lookup.by_request_id("req-1")
    slow = await db.read(lambda session: SqlOrderRepository(session).get_by_request_id("req-1"))
    assert fast == slow
    assert fast is not None and fast[0].order_id == order.order_id
    assert await lookup.by_request_id("req-unknown") is None
    # The lookup port (a read unit underneath) serves duplicates: same order back, a different payload
    # is refused.
    fast_saga = OrderSaga(service.store, service.saga.users, service.saga.payments, lookup=lookup)
    assert (await fast_saga.create_order(_new())).order_id == order.order_id
    with pytest.raises(AlreadyExists):
        await fast_saga.create_order(_new(token="tok_other"))


async def test_transition_to_is_conditional_and_returns_the_updated_order(world) -> None:
    service, _, _, db = world
    order = await service.saga.create_order(_new())
    assert order.state is OrderState.AWAITING_SETTLEMENT
    now = service.store.clock()
    pending_only = Change(Step.SETTLED, frozenset({OrderState.PENDING}), OrderState.PAID, None, None, None)
    settle = replace(pending_only, guard=frozenset({OrderState.AWAITING_SETTLEMENT}), reason="x")

    def unit(session: Session) -> tuple[object, object]:
        repo = SqlOrderRepository(session)
        assert repo.transition_to(order, pending_only, now) is None
        return repo.transition_to(order, settle, now), repo.get(order.order_id)

    paid, stored = await db.write(unit)
    assert paid is not None and paid == stored
    assert paid.state is OrderState.PAID and paid.reason == "x" and paid.line_items == order.line_items


async def test_events_of_many_orders_carry_their_own_order(world) -> None:
    service, _, _, db = world
    first = await service.saga.create_order(_new("req-a"))
    second = await service.saga.create_order(_new("req-b"))
    events = await db.read(lambda session: SqlOrderRepository(session).all_events_after(0, 100))
    assert [e.order_id for e in events] == [first.order_id] * 3 + [second.order_id] * 3
    assert all(e.order.line_items == first.line_items for e in events)
    assert [e.order.state for e in events if e.order_id == second.order_id] == [
        OrderState.PENDING,
        OrderState.PAYMENT_AUTHORIZED,
        OrderState.AWAITING_SETTLEMENT,
    ]


async def test_a_stored_step_is_the_models_transition(world) -> None:
    """The repository's conditional update stores exactly what the model's table says."""
    service, _, _, _ = world
    order = await service.saga.create_order(_new())
    assert order.state is OrderState.AWAITING_SETTLEMENT
    stored = await service.store.record(order, Step.SETTLED)
    assert stored == transition(order, Step.SETTLED, stored.update_time)
    assert stored == await service.queries.get_order(order.order_id)
    # Recorded again (a replayed event, another driver): the guard refuses, nothing new is stored.
    assert await service.store.record(order, Step.SETTLED) == stored
    assert (await _states(service, order.order_id)).count(OrderState.PAID) == 1
