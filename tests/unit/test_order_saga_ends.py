"""The saga always ends: a refusal by payment ends the order in the same call, and the reconciler gives
up (compensating) within its bound, with backoff between attempts. Fakes of the ports, a SQLite file,
a controlled clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.errors import Unavailable
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.outbox import SequenceAllocator
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import Order, OrderState
from shop_mesh.services.order.ports import Payment, PaymentConflict, PaymentState, UpstreamRefused, UserStatus
from shop_mesh.services.order.reconciler import SagaBound
from shop_mesh.services.order.repository import ORDER_EVENTS_SEQUENCE, SqlOrderRepository, metadata, sequences
from shop_mesh.services.order.settlement import PAYMENT_EVENTS_CURSOR
from tests.unit.fakes.upstreams import FakePayments, FakeUsers
from tests.unit.test_order_domain import USER, OrderService, _new, _states, wire


class ScriptedPayments(FakePayments):
    """FakePayments whose steps can be made to refuse (non-transient) or fail (transient)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: dict[str, Exception] = {}  # step -> what it raises
        self.down: set[str] = set()

    def _script(self, step: str) -> None:
        if step in self.down:
            raise Unavailable(f"payment service down ({step})")
        if step in self.refuse:
            raise self.refuse[step]

    async def authorize(self, request_id: str, order_id: str, amount: Money, token: str) -> Payment:
        self._script("authorize")
        return await super().authorize(request_id, order_id, amount, token)

    async def capture(self, request_id: str, payment_id: str) -> Payment:
        self._script("capture")
        return await super().capture(request_id, payment_id)

    async def void(self, request_id: str, payment_id: str) -> Payment:
        self._script("void")
        return await super().void(request_id, payment_id)


@dataclass
class World:
    service: OrderService
    payments: ScriptedPayments
    now: list[datetime]

    def advance_clock(self, seconds: float) -> None:
        self.now[0] += timedelta(seconds=seconds)

    async def only_order(self) -> Order:
        (order,) = await self.service.store.db.read(
            lambda session: SqlOrderRepository(session).page(None, None, 10)
        )
        return order


BOUND = SagaBound(
    max_attempts=3,
    max_age=timedelta(minutes=10),
    backoff=timedelta(seconds=10),
    max_backoff=timedelta(seconds=30),
    stuck_after=timedelta(seconds=30),
)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    db = Database(f"sqlite:///{tmp_path / 'order.db'}", metadata)
    await db.create_schema()
    allocator = SequenceAllocator(sequences, ORDER_EVENTS_SEQUENCE)

    def prepare(session: Session) -> None:
        allocator.ensure(session)
        SqlOrderRepository(session).ensure_cursor(PAYMENT_EVENTS_CURSOR)

    await db.write(prepare)
    users, payments = FakeUsers(), ScriptedPayments()
    users.status[USER] = UserStatus.ACTIVE
    now = [datetime(2026, 11, 25, 12, 0, tzinfo=UTC)]
    service = wire(db, users, payments, BOUND, clock=lambda: now[0])
    yield World(service, payments, now)
    await db.dispose()


REFUSALS = {
    "INVALID_ARGUMENT": UpstreamRefused("payment_service", "INVALID_ARGUMENT"),
    "FAILED_PRECONDITION": PaymentConflict("order already has a payment"),
    "PERMISSION_DENIED": UpstreamRefused("payment_service", "PERMISSION_DENIED"),
    "NOT_FOUND": UpstreamRefused("payment_service", "NOT_FOUND"),
}


@pytest.mark.parametrize("code", sorted(REFUSALS))
async def test_refused_authorization_rejects_the_order_in_the_same_call(world: World, code: str) -> None:
    world.payments.refuse["authorize"] = REFUSALS[code]
    order = await world.service.saga.create_order(_new())
    assert (order.state, order.reason) == (OrderState.REJECTED, "PAYMENT_REFUSED")
    assert await _states(world.service, order.order_id) == [OrderState.PENDING, OrderState.REJECTED]
    # Final at once; one sweep later for an authorization that might still land, then nothing.
    assert order.release_pending
    world.advance_clock(31)
    assert await world.service.reconciler.reconcile_once() == 1
    assert not (await world.only_order()).release_pending
    world.advance_clock(3600)
    assert await world.service.reconciler.reconcile_once() == 0
    assert world.payments.by_id == {}
    # A retry of the same request gets the same final answer.
    assert (await world.service.saga.create_order(_new())).order_id == order.order_id


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "NOT_FOUND"])
async def test_refused_capture_voids_the_authorization_and_rejects(world: World, code: str) -> None:
    world.payments.refuse["capture"] = REFUSALS[code]
    order = await world.service.saga.create_order(_new())
    assert (order.state, order.reason) == (OrderState.REJECTED, "PAYMENT_REFUSED")
    assert world.payments.calls == ["authorize", "void"]
    assert [p.state for p in world.payments.by_id.values()] == [PaymentState.VOIDED]
    world.advance_clock(3600)
    assert await world.service.reconciler.reconcile_once() == 0


async def test_reconciler_backs_off_then_gives_up_after_max_attempts_and_voids(world: World) -> None:
    world.payments.down.add("capture")
    with pytest.raises(Unavailable):
        await world.service.saga.create_order(_new())
    assert (await world.only_order()).state is OrderState.PAYMENT_AUTHORIZED
    assert await world.service.reconciler.reconcile_once() == 0  # not stuck yet: touched 0 s ago

    world.advance_clock(31)
    tries = []
    for _ in range(BOUND.max_attempts):
        assert await world.service.reconciler.reconcile_once() == 1  # an attempt (capture fails again)
        assert await world.service.reconciler.reconcile_once() == 0  # backing off: not every tick
        tries.append(world.now[0])
        world.advance_clock(30)
    assert (await world.only_order()).state is OrderState.PAYMENT_AUTHORIZED

    assert await world.service.reconciler.reconcile_once() == 1  # out of attempts: compensate and end
    order = await world.only_order()
    assert (order.state, order.reason, order.release_pending) == (OrderState.REJECTED, "SAGA_TIMEOUT", False)
    assert [p.state for p in world.payments.by_id.values()] == [PaymentState.VOIDED]
    assert world.payments.calls == ["authorize", "void"]
    world.advance_clock(3600)
    assert await world.service.reconciler.reconcile_once() == 0  # and it never comes back


async def test_reconciler_gives_up_at_max_age_even_with_attempts_left(world: World) -> None:
    world.payments.down.add("authorize")
    with pytest.raises(Unavailable):
        await world.service.saga.create_order(_new())
    world.advance_clock(BOUND.max_age.total_seconds())
    assert await world.service.reconciler.reconcile_once() == 1
    order = await world.only_order()
    assert (order.state, order.reason) == (OrderState.REJECTED, "SAGA_TIMEOUT")
    # Its driver authorized after all and died before recording it: the release sweep voids it.
    world.payments.down.clear()
    orphan = await world.payments.authorize(f"{order.order_id}:authorize", order.order_id, order.total, "t")
    world.advance_clock(31)
    assert await world.service.reconciler.reconcile_once() == 1
    assert world.payments.by_id[orphan.payment_id].state is PaymentState.VOIDED
    assert not (await world.only_order()).release_pending
    world.advance_clock(3600)
    assert await world.service.reconciler.reconcile_once() == 0


async def test_backoff_grows_and_is_capped() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    delays = [(BOUND.next_attempt(now, n) - now).total_seconds() for n in range(5)]
    assert delays == [10, 20, 30, 30, 30]


async def test_a_release_that_keeps_failing_is_retried_then_given_up(world: World) -> None:
    world.payments.refuse["capture"] = REFUSALS["INVALID_ARGUMENT"]
    world.payments.down.add("void")
    order = await world.service.saga.create_order(_new())
    # The order is final at once; only the release is left, for the reconciler.
    assert (order.state, order.reason, order.release_pending) == (
        OrderState.REJECTED,
        "PAYMENT_REFUSED",
        True,
    )
    world.advance_clock(31)
    for _ in range(BOUND.max_attempts):
        assert await world.service.reconciler.reconcile_once() == 1
        world.advance_clock(31)
    assert await world.service.reconciler.reconcile_once() == 1  # gives up (an error line for an operator)
    assert not (await world.only_order()).release_pending
    world.advance_clock(3600)
    assert await world.service.reconciler.reconcile_once() == 0


async def test_a_deferred_release_completes_once_payment_is_back(world: World) -> None:
    world.payments.refuse["capture"] = REFUSALS["INVALID_ARGUMENT"]
    world.payments.down.add("void")
    order = await world.service.saga.create_order(_new())
    assert order.release_pending
    world.payments.down.clear()
    world.advance_clock(31)
    assert await world.service.reconciler.reconcile_once() == 1
    assert [p.state for p in world.payments.by_id.values()] == [PaymentState.VOIDED]
    assert not (await world.only_order()).release_pending


async def test_authorization_landing_after_the_timeout_is_voided(world: World) -> None:
    world.payments.authorize_gate = asyncio.Event()
    creating = asyncio.create_task(world.service.saga.create_order(_new()))
    for _ in range(500):
        if await world.service.store.db.read(
            lambda session: SqlOrderRepository(session).page(None, None, 10)
        ):
            break
        await asyncio.sleep(0.01)
    world.advance_clock(BOUND.max_age.total_seconds())
    assert await world.service.reconciler.reconcile_once() == 1  # the stuck PENDING order is given up
    assert (await world.only_order()).reason == "SAGA_TIMEOUT"
    world.payments.authorize_gate.set()  # the authorization its first driver asked for lands now
    result = await asyncio.wait_for(creating, 10)
    assert (result.state, result.reason) == (OrderState.REJECTED, "SAGA_TIMEOUT")
    assert [p.state for p in world.payments.by_id.values()] == [PaymentState.VOIDED]


async def test_a_missed_settlement_event_is_found_by_the_reconciler(world: World) -> None:
    order = await world.service.saga.create_order(_new())
    assert order.state is OrderState.AWAITING_SETTLEMENT
    world.payments._set(world.payments.by_id[order.payment_id], PaymentState.SETTLED)  # event lost
    world.advance_clock(31)
    assert await world.service.reconciler.reconcile_once() == 1
    assert (await world.only_order()).state is OrderState.PAID
    assert world.payments.calls == ["authorize", "capture"]  # nothing given back


async def test_a_settlement_that_never_comes_is_refunded_and_rejected_at_the_bound(world: World) -> None:
    order = await world.service.saga.create_order(_new())
    world.advance_clock(31)
    assert await world.service.reconciler.reconcile_once() == 1  # looks, still CAPTURED: keeps waiting
    assert (await world.only_order()).state is OrderState.AWAITING_SETTLEMENT
    world.advance_clock(BOUND.max_age.total_seconds())
    assert await world.service.reconciler.reconcile_once() == 1
    final = await world.only_order()
    assert (final.state, final.reason, final.release_pending) == (OrderState.REJECTED, "SAGA_TIMEOUT", False)
    assert world.payments.by_id[order.payment_id].state is PaymentState.REFUNDED
    world.advance_clock(3600)
    assert await world.service.reconciler.reconcile_once() == 0
