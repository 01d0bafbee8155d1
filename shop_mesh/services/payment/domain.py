"""Payments: entities, the state machine and the service that applies it. No protobuf, gRPC or
SQLAlchemy: persistence through `PaymentUnits`, the common unit-of-work port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol

from shop_mesh.services.common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    StreamShutdown,
)
from shop_mesh.services.common.event_hub import EventHub
from shop_mesh.services.common.idempotency import Codec, IdempotentCommands
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.money import NANOS_PER_UNIT, Money
from shop_mesh.services.common.pagination import Page, PageRequest, page_of
from shop_mesh.services.common.payment_state import PaymentState as PaymentState
from shop_mesh.services.common.principal import SERVICE, Kind, Principal
from shop_mesh.services.common.unit_of_work import IdempotencyKeys, Session, UnitOfWork

log = get_logger("payment")

DECLINE_TOKEN = "tok_decline"
EVENT_BATCH = 200
SETTLEMENT_BATCH = 100


class PaymentEventType(enum.Enum):
    AUTHORIZED = "AUTHORIZED"
    DECLINED = "DECLINED"
    CAPTURED = "CAPTURED"
    SETTLED = "SETTLED"
    VOIDED = "VOIDED"
    REFUNDED = "REFUNDED"


@dataclass(frozen=True)
class Payment:
    payment_id: str
    order_id: str
    amount: Money
    state: PaymentState
    decline_reason: str
    captured_amount: Money
    refunded_amount: Money
    create_time: datetime
    update_time: datetime
    # Set when captured; the settlement job settles CAPTURED payments a delay after it.
    capture_time: datetime | None = None

    @property
    def refundable(self) -> Money:
        return self.captured_amount - self.refunded_amount


@dataclass(frozen=True)
class PaymentEvent:
    sequence: int
    type: PaymentEventType
    payment: Payment
    create_time: datetime

    @property
    def payment_id(self) -> str:
        return self.payment.payment_id

    @property
    def order_id(self) -> str:
        return self.payment.order_id


@dataclass(frozen=True)
class AuthorizeCommand:
    request_id: str
    order_id: str
    amount: Money
    payment_method_token: str


@dataclass(frozen=True)
class RefundCommand:
    request_id: str
    payment_id: str
    amount: Money | None  # None: everything not yet refunded
    reason: str


def payment_from_record(row: Mapping[Any, Any]) -> Payment:
    currency = row["currency_code"]
    return Payment(
        payment_id=row["payment_id"],
        order_id=row["order_id"],
        amount=Money(currency, int(row["amount_nanos"])),
        state=PaymentState(row["state"]),
        decline_reason=row["decline_reason"],
        captured_amount=Money(currency, int(row["captured_nanos"])),
        refunded_amount=Money(currency, int(row["refunded_nanos"])),
        create_time=row["create_time"],
        update_time=row["update_time"],
        capture_time=row["capture_time"],
    )


def payment_record(payment: Payment) -> dict[str, Any]:
    """A payment as flat values: the row of the payments table, and (with ISO times) its JSON."""
    return {
        "payment_id": payment.payment_id,
        "order_id": payment.order_id,
        "currency_code": payment.amount.currency_code,
        "amount_nanos": payment.amount.total_nanos,
        "captured_nanos": payment.captured_amount.total_nanos,
        "refunded_nanos": payment.refunded_amount.total_nanos,
        "state": payment.state.value,
        "decline_reason": payment.decline_reason,
        "create_time": payment.create_time,
        "update_time": payment.update_time,
        "capture_time": payment.capture_time,
    }


# maxsize=1: a mutation stores the same (immutable) payment twice, as its request id's result and in
# its event; the second is a cache hit (~1 us against ~9 us of encoding).
@functools.lru_cache(maxsize=1)
def encode_payment(payment: Payment) -> str:
    values = payment_record(payment)
    for key in ("create_time", "update_time", "capture_time"):
        if values[key] is not None:
            values[key] = values[key].isoformat()
    return json.dumps(values, separators=(",", ":"))


def decode_payment(text: str) -> Payment:
    values = json.loads(text)
    for key in ("create_time", "update_time", "capture_time"):
        if values.get(key) is not None:
            values[key] = datetime.fromisoformat(values[key])
    return payment_from_record(values)


PAYMENT_CODEC = Codec(encode_payment, decode_payment)


# --- the state machine (pure functions) --------------------------------------------------------


def decide_authorization(
    command: AuthorizeCommand, limit_units: int, now: datetime, payment_id: str
) -> tuple[Payment, PaymentEventType]:
    decline_reason = ""
    if command.payment_method_token == DECLINE_TOKEN:
        decline_reason = "CARD_DECLINED"
    elif command.amount.total_nanos > limit_units * NANOS_PER_UNIT:
        decline_reason = "AMOUNT_LIMIT_EXCEEDED"
    zero = Money.zero(command.amount.currency_code)
    payment = Payment(
        payment_id=payment_id,
        order_id=command.order_id,
        amount=command.amount,
        state=PaymentState.DECLINED if decline_reason else PaymentState.AUTHORIZED,
        decline_reason=decline_reason,
        captured_amount=zero,
        refunded_amount=zero,
        create_time=now,
        update_time=now,
    )
    return payment, PaymentEventType.DECLINED if decline_reason else PaymentEventType.AUTHORIZED


_CAPTURED_STATES = {
    PaymentState.CAPTURED,
    PaymentState.SETTLED,
    PaymentState.PARTIALLY_REFUNDED,
    PaymentState.REFUNDED,
}


def _conflict(payment: Payment, reason: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"payment {payment.payment_id} is {payment.state.value}: {what}",
        reason=reason,
        metadata={"payment_id": payment.payment_id, "state": payment.state.value},
    )


def capture(payment: Payment, now: datetime) -> Payment:
    if payment.state in _CAPTURED_STATES:
        raise _conflict(payment, "ALREADY_CAPTURED", "it was already captured")
    if payment.state is not PaymentState.AUTHORIZED:
        raise _conflict(payment, "PAYMENT_NOT_AUTHORIZED", "only an AUTHORIZED payment can be captured")
    return dataclasses.replace(
        payment,
        state=PaymentState.CAPTURED,
        captured_amount=payment.amount,
        update_time=now,
        capture_time=now,
    )


def void(payment: Payment, now: datetime) -> Payment:
    if payment.state is PaymentState.VOIDED:
        raise _conflict(payment, "ALREADY_VOIDED", "it was already voided")
    if payment.state is not PaymentState.AUTHORIZED:
        raise _conflict(payment, "PAYMENT_NOT_AUTHORIZED", "only an AUTHORIZED payment can be voided")
    return dataclasses.replace(payment, state=PaymentState.VOIDED, update_time=now)


def refund(payment: Payment, amount: Money | None, now: datetime) -> Payment:
    if payment.state is PaymentState.REFUNDED:
        raise _conflict(payment, "ALREADY_REFUNDED", "it was already refunded in full")
    if payment.state not in _CAPTURED_STATES:
        raise _conflict(payment, "PAYMENT_NOT_CAPTURED", "only captured money can be refunded")
    if amount is not None and amount.currency_code != payment.amount.currency_code:
        # A request problem, but only knowable once the payment is loaded.
        raise InvalidArgument(
            [
                FieldViolation(
                    "amount.currency_code",
                    f"must be the payment's currency {payment.amount.currency_code}",
                )
            ]
        )
    remaining = payment.refundable
    refund_amount = remaining if amount is None else amount
    if refund_amount.total_nanos > remaining.total_nanos:
        raise FailedPrecondition(
            f"refund of {refund_amount} exceeds the refundable {remaining}",
            reason="REFUND_EXCEEDS_CAPTURED",
            metadata={"payment_id": payment.payment_id, "refundable": str(remaining)},
        )
    refunded = payment.refunded_amount + refund_amount
    full = refunded.total_nanos == payment.captured_amount.total_nanos
    return dataclasses.replace(
        payment,
        state=PaymentState.REFUNDED if full else PaymentState.PARTIALLY_REFUNDED,
        refunded_amount=refunded,
        update_time=now,
    )


def settle(payment: Payment, now: datetime) -> Payment:
    return dataclasses.replace(payment, state=PaymentState.SETTLED, update_time=now)


# --- persistence ports (implemented in repository.py) ------------------------------------------


class PaymentRepo(Protocol):
    @property
    def session(self) -> Session:
        """The unit's session, which the common stores (request ids) run on too."""
        ...

    def get(self, payment_id: str, *, for_update: bool = False) -> Payment | None: ...

    def add(self, payment: Payment) -> None: ...

    def save(self, payment: Payment, *, expected_state: PaymentState) -> bool:
        """Write `payment` if the stored row is still in `expected_state`; False if it is not."""

    def append_event(
        self, type_: PaymentEventType, payment: Payment, at: datetime, note: str = ""
    ) -> PaymentEvent:
        """Allocates the event's sequence: call it last in the transaction."""

    def list_payments(self, order_id: str | None, after_id: str | None, limit: int) -> list[Payment]:
        """Up to `limit` payments after `after_id`, in id order (so for list_payments_of_owner)."""
        ...

    def events_after(self, after_sequence: int, order_id: str | None, limit: int) -> list[PaymentEvent]: ...

    def max_event_sequence(self) -> int: ...

    def due_for_settlement(self, captured_before: datetime, limit: int) -> list[str]: ...

    def earliest_capture(self) -> datetime | None: ...

    def set_owner(self, order_id: str, user_id: str) -> None:
        """Record the customer owning the payments of an order (the first one recorded stays)."""
        ...

    def owner_of(self, order_id: str) -> str | None: ...

    def list_payments_of_owner(self, user_id: str, after_id: str | None, limit: int) -> list[Payment]: ...


class PaymentUnits(UnitOfWork[PaymentRepo], Protocol):
    """The common unit-of-work port, each unit yielding the payment repository."""


# --- the service -------------------------------------------------------------------------------


class PaymentProcessor:
    """Applies the state machine transactionally: effect, idempotency key and event commit together."""

    def __init__(
        self,
        units: PaymentUnits,
        idempotency: IdempotencyKeys,
        *,
        decline_limit_units: int,
        settlement_delay: float,
        settlement_poll_interval: float,
        event_poll_interval: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.units = units
        self.commands = IdempotentCommands(units, idempotency, _session_of)
        self.decline_limit_units = decline_limit_units
        self.settlement_delay = timedelta(seconds=settlement_delay)
        self.settlement_poll_interval = settlement_poll_interval
        self.event_poll_interval = event_poll_interval
        self.clock = clock
        # The process's one reader of the payment event log; WatchPaymentEvents is served from it.
        self.events: EventHub[PaymentEvent] = EventHub(
            self._all_events_after, self._max_event_sequence, lambda e: e.sequence, event_poll_interval
        )
        # Wakes the settlement job of this process on a capture that is due before the job's next
        # wake-up (with the usual delay, only the first of a burst: a wake-up each cost two reads).
        self.captured = asyncio.Event()
        self._settlement_wakes_at: datetime | None = None

    async def _all_events_after(self, after_sequence: int, limit: int) -> list[PaymentEvent]:
        return await self.units.read(lambda repo: repo.events_after(after_sequence, None, limit))

    async def _max_event_sequence(self) -> int:
        return await self.units.read(_max_event_sequence)

    async def authorize(self, command: AuthorizeCommand, *, principal: Principal = SERVICE) -> Payment:
        """Authorize; order asserts the order's customer on this call, who becomes the owner of the
        order's payments (customers may read only those)."""
        payload = {
            "order_id": command.order_id,
            "currency_code": command.amount.currency_code,
            "amount_nanos": command.amount.total_nanos,
            "payment_method_token": command.payment_method_token,
        }
        event_type = PaymentEventType.AUTHORIZED
        appended: list[PaymentEvent] = []

        def authorize(repo: PaymentRepo) -> Payment:
            nonlocal event_type
            payment, event_type = decide_authorization(
                command, self.decline_limit_units, self.clock(), new_id("pay")
            )
            repo.add(payment)
            if principal.kind is Kind.CUSTOMER and principal.user_id:
                repo.set_owner(command.order_id, principal.user_id)
            return payment

        def append_event(repo: PaymentRepo, payment: Payment) -> None:
            appended.append(repo.append_event(event_type, payment, payment.update_time))

        done = await self.commands.run(
            "AuthorizePayment", command.request_id, payload, PAYMENT_CODEC, authorize, last=append_event
        )
        if not done.replayed:
            self._publish(appended)
        return done.result

    async def capture(self, request_id: str, payment_id: str) -> Payment:
        payment = await self._transition(
            "CapturePayment", request_id, payment_id, {}, capture, PaymentEventType.CAPTURED
        )
        wakes_at = self._settlement_wakes_at
        if (
            wakes_at is None
            or payment.capture_time is None
            or payment.capture_time + self.settlement_delay < wakes_at
        ):
            self.captured.set()
        return payment

    async def void(self, request_id: str, payment_id: str) -> Payment:
        return await self._transition(
            "VoidPayment", request_id, payment_id, {}, void, PaymentEventType.VOIDED
        )

    async def refund(self, command: RefundCommand) -> Payment:
        amount = command.amount
        payload = {
            "amount": None if amount is None else [amount.currency_code, amount.total_nanos],
            "reason": command.reason,
        }
        return await self._transition(
            "RefundPayment",
            command.request_id,
            command.payment_id,
            payload,
            lambda payment, now: refund(payment, amount, now),
            PaymentEventType.REFUNDED,
            note=command.reason,
        )

    async def _transition(
        self,
        scope: str,
        request_id: str,
        payment_id: str,
        payload: dict[str, Any],
        apply: Callable[[Payment, datetime], Payment],
        event_type: PaymentEventType,
        note: str = "",
    ) -> Payment:

        def transition(repo: PaymentRepo) -> Payment:
            current = repo.get(payment_id, for_update=True)
            if current is None:
                raise _not_found(payment_id)
            changed = apply(current, self.clock())
            if not repo.save(changed, expected_state=current.state):
                # Unreachable while the row is locked; guards the invariant if locking ever changes.
                raise Aborted("payment changed concurrently; retry", reason="CONCURRENT_CHANGE")
            return changed

        appended: list[PaymentEvent] = []

        def append_event(repo: PaymentRepo, changed: Payment) -> None:
            appended.append(repo.append_event(event_type, changed, changed.update_time, note))

        done = await self.commands.run(
            scope,
            request_id,
            {"payment_id": payment_id, **payload},
            PAYMENT_CODEC,
            transition,
            last=append_event,
        )
        if not done.replayed:
            self._publish(appended)
        return done.result

    def _publish(self, committed: list[PaymentEvent]) -> None:
        # The events as committed, straight into the reader's window: no read of what we just wrote.
        for event in committed:
            self.events.publish(event)

    async def get(self, payment_id: str, *, principal: Principal = SERVICE) -> Payment:
        def read(repo: PaymentRepo) -> tuple[Payment | None, str | None]:
            payment = repo.get(payment_id)
            owner = None if payment is None or principal.privileged else repo.owner_of(payment.order_id)
            return payment, owner

        payment, owner = await self.units.read(read)
        # Another customer's payment looks exactly like a missing one: ids cannot be probed.
        if payment is None or not (principal.privileged or principal.owns(owner or "")):
            raise _not_found(payment_id)
        return payment

    @staticmethod
    def _check_order_owner(repo: PaymentRepo, order_id: str, principal: Principal) -> None:
        if not principal.privileged and not principal.owns(repo.owner_of(order_id) or ""):
            raise NotFound(
                f"no payments of order {order_id}", reason="ORDER_NOT_FOUND", metadata={"order_id": order_id}
            )

    async def list_payments(
        self, order_id: str | None, page: PageRequest, *, principal: Principal = SERVICE
    ) -> Page[Payment]:
        """A customer lists the payments of their own orders (of one, with order_id)."""

        def read(repo: PaymentRepo) -> list[Payment]:
            if principal.privileged or order_id is not None:
                if order_id is not None:
                    self._check_order_owner(repo, order_id, principal)
                return repo.list_payments(order_id, page.after_key, page.fetch_size)
            return repo.list_payments_of_owner(principal.user_id, page.after_key, page.fetch_size)

        return page_of(await self.units.read(read), page, _payment_id)

    async def watch(
        self,
        after_sequence: int,
        order_id: str | None,
        stopping: asyncio.Event,
        *,
        principal: Principal = SERVICE,
    ) -> AsyncIterator[PaymentEvent]:
        """Stored events after the cursor, then live ones; StreamShutdown when `stopping` is set.

        Every order's events are for admins and services (order's settlement consumer); a customer
        watches one order of their own.
        """
        if order_id is None:
            principal.require_privileged("watching the payment events of every order")
        else:
            await self.units.read(lambda repo: self._check_order_owner(repo, order_id, principal))

        async def fetch_after(cursor: int) -> list[PaymentEvent]:
            return await self.units.read(lambda repo: repo.events_after(cursor, order_id, EVENT_BATCH))

        async for event in self.events.subscribe(
            after_sequence,
            lambda e: order_id is None or e.order_id == order_id,
            fetch_after,
            EVENT_BATCH,
            stopping,
        ):
            yield event
        raise StreamShutdown()  # the subscription ends only when the server stops

    # --- settlement --------------------------------------------------------------------------

    async def settle_due(self) -> int:
        """Settle every CAPTURED payment whose delay has passed; returns how many this replica settled."""
        settled = 0
        while True:
            due = await self.units.read(partial(_due_for_settlement, self.clock() - self.settlement_delay))
            for payment_id in due:
                if await self._settle_one(payment_id):
                    settled += 1
            if len(due) < SETTLEMENT_BATCH:
                return settled

    async def _settle_one(self, payment_id: str) -> bool:
        def settle_unit(repo: PaymentRepo) -> PaymentEvent | None:
            current = repo.get(payment_id)
            if current is None or current.state is not PaymentState.CAPTURED:
                return None
            changed = settle(current, self.clock())
            # The conditional write is the claim: of several replicas only one sees CAPTURED here.
            if not repo.save(changed, expected_state=PaymentState.CAPTURED):
                return None
            return repo.append_event(PaymentEventType.SETTLED, changed, changed.update_time)

        event = await self.units.write(settle_unit)
        if event is None:
            return False
        self._publish([event])
        log.info("payment_settled", payment_id=payment_id)
        return True

    async def run_settlement(self, stopping: asyncio.Event) -> None:
        """Background job: scans the table (so it survives restarts), woken on capture and by polling."""
        while not stopping.is_set():
            self.captured.clear()
            try:
                await self.settle_due()
                earliest = await self.units.read(_earliest_capture)
            except Exception as exc:  # the database may be down for a while; keep going
                log.warning("settlement_failed", error=type(exc).__name__)
                earliest = None
            wait = self.settlement_poll_interval
            if earliest is not None:
                until_due = (earliest + self.settlement_delay - self.clock()).total_seconds()
                wait = min(wait, max(until_due, 0.01))
            self._settlement_wakes_at = self.clock() + timedelta(seconds=wait)
            await _first_of(stopping, self.captured, timeout=wait)
            self._settlement_wakes_at = None


def _payment_id(payment: Payment) -> str:
    return payment.payment_id


def _session_of(repo: PaymentRepo) -> Session:
    return repo.session


def _max_event_sequence(repo: PaymentRepo) -> int:
    return repo.max_event_sequence()


def _due_for_settlement(captured_before: datetime, repo: PaymentRepo) -> list[str]:
    return repo.due_for_settlement(captured_before, SETTLEMENT_BATCH)


def _earliest_capture(repo: PaymentRepo) -> datetime | None:
    return repo.earliest_capture()


def _not_found(payment_id: str) -> NotFound:
    return NotFound(
        f"payment {payment_id} not found", reason="PAYMENT_NOT_FOUND", metadata={"payment_id": payment_id}
    )


async def _first_of(*events: asyncio.Event, timeout: float) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
