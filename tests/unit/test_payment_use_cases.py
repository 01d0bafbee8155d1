"""The payment use cases (`PaymentProcessor`) on the in-memory fakes: what a client sees (the payment,
the status reason) and what is stored (rows, events with their sequences, request ids). No database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from shop_mesh.services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    StreamShutdown,
)
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.pagination import PageRequest
from shop_mesh.services.common.principal import admin, customer
from shop_mesh.services.payment.domain import (
    AuthorizeCommand,
    Payment,
    PaymentEvent,
    PaymentEventType,
    PaymentProcessor,
    PaymentState,
    RefundCommand,
)
from tests.unit.fakes.clock import START, FakeClock
from tests.unit.fakes.payment import InMemoryPaymentRepository, PaymentTables, payment_units
from tests.unit.fakes.units import InMemoryKeys, InMemoryUnits

Units = InMemoryUnits[PaymentTables, InMemoryPaymentRepository]
SETTLEMENT_DELAY = timedelta(seconds=60)
ALICE, BOB = customer("usr_alice"), customer("usr_bob")
E = PaymentEventType
HUNDRED = Money.of("EUR", 100)


@pytest.fixture
def units() -> Units:
    return payment_units()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def processor(units: Units, clock: FakeClock) -> PaymentProcessor:
    return PaymentProcessor(
        units,
        InMemoryKeys(),
        decline_limit_units=1_000,
        settlement_delay=SETTLEMENT_DELAY.total_seconds(),
        settlement_poll_interval=0.05,
        event_poll_interval=0.01,
        clock=clock,
    )


def _authorize(
    request_id: str = "a-1",
    order_id: str = "ord_1",
    amount: Money = HUNDRED,
    token: str = "tok_ok",
) -> AuthorizeCommand:
    return AuthorizeCommand(request_id, order_id, amount, token)


def _events(units: Units) -> list[tuple[int, PaymentEventType, PaymentState]]:
    return [(e.sequence, e.type, e.payment.state) for e in units.committed.events]


# ---- authorize ------------------------------------------------------------------------------------


async def test_an_approved_authorization_is_stored_with_its_event(
    processor: PaymentProcessor, units: Units
) -> None:
    payment = await processor.authorize(_authorize())
    assert (payment.state, payment.decline_reason) == (PaymentState.AUTHORIZED, "")
    assert payment.captured_amount == Money.zero("EUR") and payment.create_time == START
    assert units.committed.payments == {payment.payment_id: payment}
    assert units.committed.events == [PaymentEvent(1, E.AUTHORIZED, payment, START)]


@pytest.mark.parametrize(
    ("amount", "token", "reason"),
    [
        (Money.of("EUR", 10), "tok_decline", "CARD_DECLINED"),
        (Money.of("EUR", 1_000, 1), "tok_ok", "AMOUNT_LIMIT_EXCEEDED"),
    ],
)
async def test_a_decline_is_a_stored_outcome_not_an_error(
    processor: PaymentProcessor, units: Units, amount: Money, token: str, reason: str
) -> None:
    payment = await processor.authorize(_authorize(amount=amount, token=token))
    assert (payment.state, payment.decline_reason) == (PaymentState.DECLINED, reason)
    assert units.committed.payments[payment.payment_id] == payment
    assert _events(units) == [(1, E.DECLINED, PaymentState.DECLINED)]
    with pytest.raises(FailedPrecondition) as refused:
        await processor.capture("c-1", payment.payment_id)
    assert refused.value.reason == "PAYMENT_NOT_AUTHORIZED"


async def test_a_repeated_authorization_replays_the_first_and_a_reused_id_is_refused(
    processor: PaymentProcessor, units: Units
) -> None:
    first = await processor.authorize(_authorize())
    assert await processor.authorize(_authorize()) == first
    assert list(units.committed.payments) == [first.payment_id]
    assert len(units.committed.events) == 1  # no second effect, no second event
    before = units.committed
    with pytest.raises(AlreadyExists) as reused:
        await processor.authorize(_authorize(amount=Money.of("EUR", 101)))
    assert reused.value.reason == "REQUEST_ID_REUSED"
    assert units.committed is before  # nothing was committed


async def test_the_customer_order_asserts_owns_the_orders_payments(
    processor: PaymentProcessor, units: Units
) -> None:
    await processor.authorize(_authorize("a-1", "ord_1"), principal=ALICE)
    # The first owner recorded stays (a later authorization of the same order cannot take it).
    await processor.authorize(_authorize("a-2", "ord_1"), principal=BOB)
    # A service acting on its own (no end user) records no owner.
    await processor.authorize(_authorize("a-3", "ord_2"))
    assert units.committed.owners == {"ord_1": "usr_alice"}


# ---- capture, void, refund ------------------------------------------------------------------------


async def test_capture_then_partial_and_full_refund_append_events_in_order(
    processor: PaymentProcessor, units: Units, clock: FakeClock
) -> None:
    payment = await processor.authorize(_authorize())
    clock.advance(timedelta(seconds=1))
    captured = await processor.capture("c-1", payment.payment_id)
    assert (captured.state, captured.captured_amount) == (PaymentState.CAPTURED, Money.of("EUR", 100))
    assert captured.capture_time == clock.now
    partial = await processor.refund(RefundCommand("r-1", payment.payment_id, Money.of("EUR", 30), "dent"))
    assert (partial.state, partial.refundable) == (PaymentState.PARTIALLY_REFUNDED, Money.of("EUR", 70))
    full = await processor.refund(RefundCommand("r-2", payment.payment_id, None, "returned"))
    assert (full.state, full.refunded_amount) == (PaymentState.REFUNDED, Money.of("EUR", 100))
    assert units.committed.payments[payment.payment_id] == full
    assert _events(units) == [
        (1, E.AUTHORIZED, PaymentState.AUTHORIZED),
        (2, E.CAPTURED, PaymentState.CAPTURED),
        (3, E.REFUNDED, PaymentState.PARTIALLY_REFUNDED),
        (4, E.REFUNDED, PaymentState.REFUNDED),
    ]
    # A repeat of a transition's request_id answers its first result, with no event.
    assert await processor.capture("c-1", payment.payment_id) == captured
    assert len(units.committed.events) == 4


async def test_void_releases_an_authorization(processor: PaymentProcessor, units: Units) -> None:
    payment = await processor.authorize(_authorize())
    voided = await processor.void("v-1", payment.payment_id)
    assert voided.state is PaymentState.VOIDED
    assert _events(units)[-1] == (2, E.VOIDED, PaymentState.VOIDED)


@pytest.mark.parametrize(
    ("setup", "attempt", "reason"),
    [
        (["capture"], "capture", "ALREADY_CAPTURED"),
        (["capture"], "void", "PAYMENT_NOT_AUTHORIZED"),
        (["void"], "void", "ALREADY_VOIDED"),
        (["void"], "capture", "PAYMENT_NOT_AUTHORIZED"),
        ([], "refund", "PAYMENT_NOT_CAPTURED"),
        (["capture", "refund"], "refund", "ALREADY_REFUNDED"),
        (["capture"], "refund_too_much", "REFUND_EXCEEDS_CAPTURED"),
    ],
)
async def test_a_refused_transition_names_its_reason_and_leaves_nothing(
    processor: PaymentProcessor, units: Units, setup: list[str], attempt: str, reason: str
) -> None:
    payment_id = (await processor.authorize(_authorize())).payment_id

    async def run(step: str, request_id: str) -> Payment:
        if step == "capture":
            return await processor.capture(request_id, payment_id)
        if step == "void":
            return await processor.void(request_id, payment_id)
        amount = Money.of("EUR", 101) if step == "refund_too_much" else None
        return await processor.refund(RefundCommand(request_id, payment_id, amount, ""))

    for i, step in enumerate(setup):
        await run(step, f"setup-{i}")
    before = units.committed
    with pytest.raises(FailedPrecondition) as refused:
        await run(attempt, "attempt")
    assert refused.value.reason == reason
    assert refused.value.metadata["payment_id"] == payment_id
    # Rolled back: no state change, no event, and the request id is not spent.
    assert units.committed is before
    assert ("CapturePayment", "attempt") not in units.committed.keys


async def test_a_transition_of_a_missing_payment_is_not_found(processor: PaymentProcessor) -> None:
    with pytest.raises(NotFound) as missing:
        await processor.capture("c-1", "pay_missing")
    assert missing.value.reason == "PAYMENT_NOT_FOUND"


async def test_settlement_settles_what_is_due_once(
    processor: PaymentProcessor, units: Units, clock: FakeClock
) -> None:
    early = await processor.authorize(_authorize("a-1", "ord_1"))
    late = await processor.authorize(_authorize("a-2", "ord_2"))
    await processor.capture("c-1", early.payment_id)
    clock.advance(timedelta(seconds=30))
    await processor.capture("c-2", late.payment_id)
    clock.advance(SETTLEMENT_DELAY - timedelta(seconds=1))
    assert await processor.settle_due() == 1  # only the one captured a whole delay ago
    assert units.committed.payments[early.payment_id].state is PaymentState.SETTLED
    assert units.committed.payments[late.payment_id].state is PaymentState.CAPTURED
    assert _events(units)[-1] == (5, E.SETTLED, PaymentState.SETTLED)
    clock.advance(timedelta(seconds=30))
    assert await processor.settle_due() == 1
    assert await processor.settle_due() == 0


# ---- reading, with ownership ----------------------------------------------------------------------


async def test_a_customer_sees_only_their_own_payments(processor: PaymentProcessor) -> None:
    alices = [await processor.authorize(_authorize(f"a-{i}", f"ord_a{i}"), principal=ALICE) for i in range(3)]
    bobs = await processor.authorize(_authorize("b-1", "ord_b"), principal=BOB)
    assert await processor.get(alices[0].payment_id, principal=ALICE) == alices[0]
    with pytest.raises(NotFound) as hidden:
        await processor.get(bobs.payment_id, principal=ALICE)
    assert hidden.value.reason == "PAYMENT_NOT_FOUND"  # looks exactly like a missing one
    assert await processor.get(bobs.payment_id, principal=admin()) == bobs

    page = await processor.list_payments(None, PageRequest(10, None), principal=ALICE)
    assert list(page.items) == sorted(alices, key=lambda p: p.payment_id) and page.next_key is None
    with pytest.raises(NotFound) as other_order:
        await processor.list_payments("ord_b", PageRequest(10, None), principal=ALICE)
    assert other_order.value.reason == "ORDER_NOT_FOUND"
    everything = await processor.list_payments(None, PageRequest(10, None), principal=admin())
    assert len(everything.items) == 4


async def test_lists_page_in_id_order(processor: PaymentProcessor) -> None:
    made = [await processor.authorize(_authorize(f"a-{i}", "ord_1")) for i in range(3)]
    ids = sorted(p.payment_id for p in made)
    first = await processor.list_payments("ord_1", PageRequest(2, None))
    assert [p.payment_id for p in first.items] == ids[:2] and first.next_key == ids[1]
    rest = await processor.list_payments("ord_1", PageRequest(2, first.next_key))
    assert [p.payment_id for p in rest.items] == ids[2:] and rest.next_key is None


# ---- the event stream -----------------------------------------------------------------------------


async def _take(stream: AsyncIterator[PaymentEvent], count: int) -> list[PaymentEvent]:
    taken: list[PaymentEvent] = []
    # The use case's stream is an async generator (typed as an iterator): closed here, not at GC.
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for event in stream:
            taken.append(event)
            if len(taken) == count:
                break
    return taken


async def test_watch_streams_stored_then_live_events_in_order_once(processor: PaymentProcessor) -> None:
    stopping = asyncio.Event()
    payment = await processor.authorize(_authorize("a-1", "ord_1"), principal=ALICE)
    await processor.authorize(_authorize("a-2", "ord_2"))  # another order: filtered out
    watching = asyncio.create_task(_take(processor.watch(0, "ord_1", stopping, principal=ALICE), 3))
    await processor.capture("c-1", payment.payment_id)
    await processor.refund(RefundCommand("r-1", payment.payment_id, None, ""))
    events = await asyncio.wait_for(watching, 5)
    assert [(e.sequence, e.type) for e in events] == [(1, E.AUTHORIZED), (3, E.CAPTURED), (4, E.REFUNDED)]
    # Resumed after the last sequence seen: only what came after.
    await processor.void("v-x", (await processor.authorize(_authorize("a-3", "ord_1"))).payment_id)
    resumed = await asyncio.wait_for(_take(processor.watch(4, "ord_1", stopping), 2), 5)
    assert [(e.sequence, e.type) for e in resumed] == [(5, E.AUTHORIZED), (6, E.VOIDED)]


async def test_watch_ends_with_shutdown_and_checks_who_watches(processor: PaymentProcessor) -> None:
    await processor.authorize(_authorize("a-1", "ord_1"), principal=ALICE)
    stopping = asyncio.Event()
    stopping.set()
    with pytest.raises(StreamShutdown):
        await _take(processor.watch(0, None, stopping), 1)
    with pytest.raises(PermissionDenied) as every_order:
        await _take(processor.watch(0, None, stopping, principal=ALICE), 1)
    assert every_order.value.reason == "ADMIN_ONLY"
    with pytest.raises(NotFound) as not_theirs:
        await _take(processor.watch(0, "ord_1", stopping, principal=BOB), 1)
    assert not_theirs.value.reason == "ORDER_NOT_FOUND"
