"""The order use cases (saga, cancel, settlement consumer, reconciler, queries) on the in-memory fakes:
storage through the unit-of-work port in memory, users and payments through the fakes of order's
clients. No database; tests/unit/test_order_domain.py runs the same domain on SQLite."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

import pytest

from shop_mesh.services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.pagination import PageRequest
from shop_mesh.services.common.principal import customer
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.cancel import CancelOrder
from shop_mesh.services.order.model import LineItem, NewOrder, Order, OrderState
from shop_mesh.services.order.ports import PaymentEvent, PaymentState, UserStatus
from shop_mesh.services.order.queries import OrderQueries
from shop_mesh.services.order.reconciler import Reconciler, SagaBound
from shop_mesh.services.order.saga import OrderSaga
from shop_mesh.services.order.settlement import PAYMENT_EVENTS_CURSOR, SettlementConsumer
from shop_mesh.services.order.store import OrderStore
from tests.unit.fakes.clock import FakeClock
from tests.unit.fakes.order import ORDER_EVENTS_SEQUENCE, InMemoryOrderRepository, OrderTables, order_units
from tests.unit.fakes.units import InMemoryKeys, InMemorySequences, InMemoryUnits
from tests.unit.fakes.upstreams import FakePayments, FakeUsers

Units = InMemoryUnits[OrderTables, Session]
USER = new_id("usr")
S = OrderState
STUCK_AFTER = timedelta(seconds=30)


@dataclass
class World:
    """The order use cases wired as the composition root wires them, on fakes."""

    units: Units
    clock: FakeClock
    users: FakeUsers
    payments: FakePayments
    store: OrderStore
    saga: OrderSaga
    queries: OrderQueries
    cancellation: CancelOrder
    settlement: SettlementConsumer
    reconciler: Reconciler

    @property
    def orders(self) -> dict[str, Order]:
        return self.units.committed.orders

    def states(self, order_id: str) -> list[OrderState]:
        return [e.state for e in self.units.committed.events if e.order_id == order_id]

    def only_order(self) -> Order:
        (order,) = self.orders.values()
        return order


@pytest.fixture
def world() -> World:
    units, clock = order_units(), FakeClock()
    users, payments = FakeUsers(), FakePayments()
    users.status[USER] = UserStatus.ACTIVE
    store = OrderStore(
        units,
        InMemoryOrderRepository,
        InMemoryKeys(),
        InMemorySequences(ORDER_EVENTS_SEQUENCE),
        poll_interval=0.01,
        clock=clock,
    )
    saga = OrderSaga(store, users, payments)
    queries = OrderQueries(store)
    reconciler = Reconciler(saga, SagaBound(stuck_after=STUCK_AFTER))
    return World(
        units,
        clock,
        users,
        payments,
        store,
        saga,
        queries,
        CancelOrder(store, payments, queries),
        SettlementConsumer(store, payments),
        reconciler,
    )


def _new(request_id: str = "req-1", token: str = "tok_visa", user: str = USER) -> NewOrder:
    items = (LineItem("A", 2, Money.of("EUR", 10)), LineItem("B", 1, Money.of("EUR", 0, 500_000_000)))
    return NewOrder(request_id, user, items, token)


async def _stuck_pending(world: World) -> Order:
    """An order whose saga stopped at PENDING: the payment service was down during CreateOrder."""
    world.payments.authorize_down = True
    with pytest.raises(Unavailable):
        await world.saga.create_order(_new())
    world.payments.authorize_down = False
    return world.only_order()


# ---- CreateOrder ----------------------------------------------------------------------------------


async def test_create_runs_the_saga_to_awaiting_settlement(world: World) -> None:
    order = await world.saga.create_order(_new())
    assert (order.state, order.total) == (S.AWAITING_SETTLEMENT, Money.of("EUR", 20, 500_000_000))
    assert world.orders == {order.order_id: order}
    assert world.payments.calls == ["authorize", "capture"]
    assert world.payments.by_id[order.payment_id].state is PaymentState.CAPTURED
    assert [(e.sequence, e.state) for e in world.units.committed.events] == [
        (1, S.PENDING),
        (2, S.PAYMENT_AUTHORIZED),
        (3, S.AWAITING_SETTLEMENT),
    ]


async def test_a_decline_is_a_rejected_order_not_an_error(world: World) -> None:
    order = await world.saga.create_order(_new(token="tok_decline"))
    assert (order.state, order.reason) == (S.REJECTED, "PAYMENT_DECLINED")
    assert world.payments.calls == ["authorize"]
    assert world.states(order.order_id) == [S.PENDING, S.REJECTED]


@pytest.mark.parametrize(
    ("status", "reason"), [(None, "USER_NOT_FOUND"), (UserStatus.INACTIVE, "USER_NOT_ACTIVE")]
)
async def test_a_user_who_may_not_order_leaves_no_order(
    world: World, status: UserStatus | None, reason: str
) -> None:
    other = new_id("usr")
    if status is not None:
        world.users.status[other] = status
    with pytest.raises(FailedPrecondition) as refused:
        await world.saga.create_order(_new(user=other))
    assert refused.value.reason == reason
    assert world.orders == {} and world.units.committed.events == []
    assert world.units.commits == 0 and world.payments.calls == []


async def test_user_service_down_is_unavailable_and_writes_nothing(world: World) -> None:
    world.users.down = True
    with pytest.raises(Unavailable):
        await world.saga.create_order(_new())
    assert world.orders == {} and world.units.commits == 0


async def test_a_duplicate_returns_the_same_order_and_a_reused_id_is_refused(world: World) -> None:
    first = await world.saga.create_order(_new())
    assert await world.saga.create_order(_new()) == first
    assert world.payments.calls == ["authorize", "capture"]  # no second money movement
    with pytest.raises(AlreadyExists) as reused:
        await world.saga.create_order(_new(token="tok_other"))
    assert reused.value.reason == "REQUEST_ID_REUSED"
    assert list(world.orders) == [first.order_id]


async def test_a_customer_orders_on_their_own_account_only(world: World) -> None:
    with pytest.raises(PermissionDenied) as refused:
        await world.saga.create_order(_new(), principal=customer("usr_someone_else"))
    assert refused.value.reason == "NOT_YOUR_ACCOUNT"
    assert world.orders == {}


# ---- CancelOrder ----------------------------------------------------------------------------------


async def test_cancel_refunds_a_captured_order_once(world: World) -> None:
    order = await world.saga.create_order(_new())
    cancelled = await world.cancellation.cancel_order("c-1", order.order_id, "changed my mind")
    assert (cancelled.state, cancelled.reason) == (S.CANCELLED, "changed my mind")
    assert world.orders[order.order_id] == cancelled
    assert world.payments.by_id[order.payment_id].state is PaymentState.REFUNDED
    # A repeat answers with the order as it is, with no second refund and no second event.
    assert await world.cancellation.cancel_order("c-1", order.order_id, "changed my mind") == cancelled
    assert world.payments.calls.count("refund") == 1
    assert world.states(order.order_id).count(S.CANCELLED) == 1
    with pytest.raises(AlreadyExists) as reused:
        await world.cancellation.cancel_order("c-1", order.order_id, "another reason")
    assert reused.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(FailedPrecondition) as final:
        await world.cancellation.cancel_order("c-2", order.order_id, "")
    assert final.value.reason == "ORDER_NOT_CANCELLABLE"


async def test_cancel_voids_an_authorized_order(world: World) -> None:
    order = await _stuck_pending(world)
    authorized = await world.saga._authorize(order)
    assert authorized.state is S.PAYMENT_AUTHORIZED
    cancelled = await world.cancellation.cancel_order("c-1", order.order_id, "")
    assert (cancelled.state, cancelled.reason) == (S.CANCELLED, "CANCELLED")
    assert world.payments.by_id[authorized.payment_id].state is PaymentState.VOIDED
    assert "capture" not in world.payments.calls


async def test_cancel_of_another_customers_order_looks_missing(world: World) -> None:
    order = await world.saga.create_order(_new())
    with pytest.raises(NotFound) as hidden:
        await world.cancellation.cancel_order("c-1", order.order_id, "", principal=customer("usr_other"))
    assert hidden.value.reason == "ORDER_NOT_FOUND"
    assert world.orders[order.order_id] == order and "refund" not in world.payments.calls


async def test_a_cancel_during_authorization_leaves_no_authorization(world: World) -> None:
    world.payments.authorize_gate = asyncio.Event()
    creating = asyncio.create_task(world.saga.create_order(_new()))
    for _ in range(100):  # until the order is stored and its driver waits on the payment service
        if world.orders:
            break
        await asyncio.sleep(0)
    cancelled = await world.cancellation.cancel_order("c-1", world.only_order().order_id, "")
    assert cancelled.state is S.CANCELLED and cancelled.release_pending
    world.payments.authorize_gate.set()
    result = await asyncio.wait_for(creating, 5)
    # The driver found the order cancelled when it recorded the authorization, and voided it.
    assert result.state is S.CANCELLED
    assert [p.state for p in world.payments.by_id.values()] == [PaymentState.VOIDED]
    assert world.orders[result.order_id].release_pending is False
    world.clock.advance(STUCK_AFTER)
    assert await world.reconciler.reconcile_once() == 0  # nothing left to release


async def test_an_authorization_voided_behind_the_sagas_back_ends_it_cancelled(world: World) -> None:
    authorized = await world.saga._authorize(await _stuck_pending(world))
    await world.payments.void("someone-else", authorized.payment_id)  # a cancel that crashed before commit
    result = await world.saga.advance(authorized)
    assert (result.state, result.reason) == (S.CANCELLED, "PAYMENT_VOIDED")
    assert world.orders[result.order_id] == result


# ---- the settlement consumer ----------------------------------------------------------------------


async def test_a_settlement_event_is_applied_once(world: World) -> None:
    order = await world.saga.create_order(_new())
    event = PaymentEvent(7, True, order.payment_id, order.order_id)
    assert await world.settlement.apply_payment_event(event)
    assert not await world.settlement.apply_payment_event(event)  # a replay (restart, other replica)
    assert not await world.settlement.apply_payment_event(
        PaymentEvent(5, True, order.payment_id, order.order_id)
    )
    assert world.orders[order.order_id].state is S.PAID
    assert world.states(order.order_id).count(S.PAID) == 1
    assert world.units.committed.cursors[PAYMENT_EVENTS_CURSOR] == 7


async def test_a_settlement_that_overtook_the_capture_step_still_pays(world: World) -> None:
    authorized = await world.saga._authorize(await _stuck_pending(world))
    event = PaymentEvent(1, True, authorized.payment_id, authorized.order_id)
    assert await world.settlement.apply_payment_event(event)
    assert world.states(authorized.order_id)[-2:] == [S.AWAITING_SETTLEMENT, S.PAID]


async def test_a_settlement_of_another_payment_changes_no_order(world: World) -> None:
    order = await world.saga.create_order(_new())
    assert await world.settlement.apply_payment_event(PaymentEvent(3, True, "pay_other", order.order_id))
    assert world.orders[order.order_id] == order


# ---- the reconciler -------------------------------------------------------------------------------


async def test_the_reconciler_finishes_a_stuck_saga(world: World) -> None:
    order = await _stuck_pending(world)
    assert order.state is S.PENDING
    assert await world.reconciler.reconcile_once() == 0  # not stuck yet: its driver may be running
    world.clock.advance(STUCK_AFTER)
    assert await world.reconciler.reconcile_once() == 1
    assert world.orders[order.order_id].state is S.AWAITING_SETTLEMENT
    assert world.payments.calls == ["authorize", "capture"]
    assert world.units.committed.retries[order.order_id][0] == 1  # the attempt was counted
    assert await world.reconciler.reconcile_once() == 0


async def test_the_reconciler_backs_off_between_attempts(world: World) -> None:
    order = await _stuck_pending(world)
    world.payments.authorize_down = True
    world.clock.advance(STUCK_AFTER)
    assert await world.reconciler.reconcile_once() == 1  # tried, failed (logged), counted
    assert world.orders[order.order_id].state is S.PENDING
    assert await world.reconciler.reconcile_once() == 0  # backing off
    world.payments.authorize_down = False
    world.clock.advance(world.reconciler.bound.backoff)
    assert await world.reconciler.reconcile_once() == 1
    assert world.orders[order.order_id].state is S.AWAITING_SETTLEMENT
    assert world.units.committed.retries[order.order_id][0] == 2


async def test_a_saga_past_its_bound_is_rejected(world: World) -> None:
    order = await _stuck_pending(world)
    world.clock.advance(world.reconciler.bound.max_age)
    assert await world.reconciler.reconcile_once() == 1
    given_up = world.orders[order.order_id]
    assert (given_up.state, given_up.reason) == (S.REJECTED, "SAGA_TIMEOUT")
    # Given up while PENDING: an authorization may still land, so a release stays pending.
    assert given_up.release_pending and world.payments.calls == []


async def test_the_reconciler_releases_an_authorization_of_an_order_cancelled_while_pending(
    world: World,
) -> None:
    order = await _stuck_pending(world)
    # Its driver authorized, then died before recording it; the customer cancels meanwhile.
    orphan = await world.payments.authorize(f"{order.order_id}:authorize", order.order_id, order.total, "t")
    cancelled = await world.cancellation.cancel_order("c-1", order.order_id, "")
    assert cancelled.release_pending
    world.clock.advance(STUCK_AFTER)
    assert await world.reconciler.reconcile_once() == 1
    assert world.payments.by_id[orphan.payment_id].state is PaymentState.VOIDED
    after = world.orders[order.order_id]
    assert (after.state, after.payment_id, after.release_pending) == (S.CANCELLED, orphan.payment_id, False)
    assert await world.reconciler.reconcile_once() == 0


# ---- reading --------------------------------------------------------------------------------------


async def test_a_customer_reads_and_lists_only_their_own_orders(world: World) -> None:
    other = new_id("usr")
    world.users.status[other] = UserStatus.ACTIVE
    mine = await world.saga.create_order(_new("r-1"))
    theirs = await world.saga.create_order(_new("r-2", user=other))
    me = customer(USER)
    assert await world.queries.get_order(mine.order_id, principal=me) == mine
    with pytest.raises(NotFound):
        await world.queries.get_order(theirs.order_id, principal=me)
    page = await world.queries.list_orders(None, PageRequest(10, None), principal=me)
    assert list(page.items) == [mine]
    everything = await world.queries.list_orders(None, PageRequest(1, None))
    assert len(everything.items) == 1 and everything.next_key == min(mine.order_id, theirs.order_id)


async def test_watch_of_a_final_order_streams_its_events_and_ends(world: World) -> None:
    order = await world.saga.create_order(_new(token="tok_decline"))
    stopping = asyncio.Event()
    events = [e async for e in world.queries.watch_order(order.order_id, 0, stopping)]
    assert [(e.sequence, e.state) for e in events] == [(1, S.PENDING), (2, S.REJECTED)]
    assert events[-1].order.reason == "PAYMENT_DECLINED"
    assert [e async for e in world.queries.watch_order(order.order_id, 2, stopping)] == []


async def test_watch_follows_an_order_live_until_it_is_final(world: World) -> None:
    order = await world.saga.create_order(_new())
    stopping = asyncio.Event()

    async def watch() -> list[OrderState]:
        return [e.state async for e in world.queries.watch_order(order.order_id, 1, stopping)]

    watching = asyncio.create_task(watch())
    await asyncio.sleep(0)  # one loop turn: the stream catches up (no await on the fakes) and waits
    await world.settlement.apply_payment_event(PaymentEvent(1, True, order.payment_id, order.order_id))
    # After sequence 1, every event once and in order; the stream ends by itself at PAID.
    assert await asyncio.wait_for(watching, 5) == [S.PAYMENT_AUTHORIZED, S.AWAITING_SETTLEMENT, S.PAID]
