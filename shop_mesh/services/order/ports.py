"""The ports the order use cases need: the user directory, the payment gateway, order storage (hung
off the common unit-of-work port) and the duplicate check's lookup. Adapters: clients.py (gRPC),
repository.py and common/db.py (SQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Protocol

from shop_mesh.services.common.errors import FailedPrecondition
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.payment_state import PaymentState as PaymentState
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import Change, Order, OrderEvent


class UserStatus(Enum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"  # suspended or deleted: exists, but may not order


class UserDirectory(Protocol):
    async def user_status(self, user_id: str) -> UserStatus | None:
        """None if there is no such user. Raises Unavailable on transient faults."""
        ...


# Money was taken and (some of it) not given back yet.
CAPTURED_STATES = frozenset({PaymentState.CAPTURED, PaymentState.SETTLED, PaymentState.PARTIALLY_REFUNDED})


@dataclass(frozen=True)
class Payment:
    payment_id: str
    order_id: str
    state: PaymentState
    decline_reason: str = ""


@dataclass(frozen=True)
class PaymentEvent:
    sequence: int
    settled: bool  # the only event type the saga reacts to
    payment_id: str
    order_id: str


class UpstreamRefused(FailedPrecondition):
    """An upstream answered with a non-transient refusal (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED,
    ...): the same call will never succeed, so the saga ends instead of retrying it. For a client of
    order-service this is FAILED_PRECONDITION with reason `<SERVICE>_REFUSED`, never INTERNAL."""

    def __init__(self, service: str, code: str, *, reason: str | None = None):
        super().__init__(
            f"{service} refused the request ({code})",
            reason=reason or f"{service.upper()}_REFUSED",
            metadata={"upstream_code": code},
        )
        self.service = service
        self.code = code


class PaymentConflict(UpstreamRefused):
    """The payment service refused a transition for the payment's current state (e.g. void after capture)."""

    def __init__(self, detail: str = ""):
        super().__init__("payment_service", "FAILED_PRECONDITION", reason="PAYMENT_STATE_CONFLICT")
        self.detail = detail


class PaymentGateway(Protocol):
    """PaymentService as the saga sees it.

    Transient faults (and answers whose outcome is unknown, e.g. INTERNAL) raise Unavailable; refused
    state transitions raise PaymentConflict; any other refusal raises UpstreamRefused.
    """

    async def authorize(self, request_id: str, order_id: str, amount: Money, token: str) -> Payment: ...

    async def capture(self, request_id: str, payment_id: str) -> Payment: ...

    async def void(self, request_id: str, payment_id: str) -> Payment: ...

    async def refund(self, request_id: str, payment_id: str, reason: str) -> Payment: ...

    async def get(self, payment_id: str) -> Payment: ...

    async def payments_of_order(self, order_id: str) -> list[Payment]: ...

    def events(self, after_sequence: int, stopping: asyncio.Event) -> AsyncGenerator[PaymentEvent, None]:
        """Payment events after the cursor, stored then live; ends quietly when `stopping` is set."""
        ...


class OrderRepository(Protocol):
    def get(self, order_id: str) -> Order | None: ...

    def get_by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        """The order created by this request_id and that request's fingerprint."""
        ...

    def insert(self, order: Order, request_id: str, fingerprint: str) -> bool:
        """False if an order with this request_id exists already (a concurrent duplicate won)."""
        ...

    def transition_to(self, order: Order, update: Change, now: datetime) -> Order | None:
        """Conditional update, only if the order is in one of update.guard: the order as updated,
        or None if it was not (another driver moved it first)."""
        ...

    def set_release_done(self, order_id: str, payment_id: str | None) -> None: ...

    def add_event(self, order: Order, sequence: int, now: datetime) -> None: ...

    def events_after(self, order_id: str, after_sequence: int, limit: int) -> list[OrderEvent]: ...

    def last_event_sequence(self, order_id: str) -> int: ...

    def all_events_after(
        self, after_sequence: int, limit: int, known: MutableMapping[str, Order] | None = None
    ) -> list[OrderEvent]: ...

    def max_event_sequence(self) -> int: ...

    def page(self, user_id: str | None, after_key: str | None, limit: int) -> list[Order]:
        """Up to `limit` orders after `after_key`, in id order."""
        ...

    def stuck(
        self, older_than: datetime, now: datetime, expired_before: datetime, limit: int
    ) -> list[tuple[Order, int]]:
        """Sagas nobody is driving, untouched since `older_than` and not backing off at `now` (unless
        created before `expired_before`: past their bound, they do not wait out a backoff): PENDING /
        PAYMENT_AUTHORIZED / AWAITING_SETTLEMENT, or CANCELLED / REJECTED with release_pending; each
        with the reconciler's attempts so far."""
        ...

    def claim_attempt(self, order_id: str, seen: int, next_attempt_time: datetime) -> bool:
        """Count a reconciler attempt (seen -> seen + 1) and back off until next_attempt_time; False if
        another reconciler counted one since `seen` was read (it drives the saga now)."""
        ...

    def reset_attempts(self, order_id: str) -> None: ...

    def advance_cursor(self, name: str, sequence: int) -> bool:
        """Move the consumer cursor to `sequence` if it is behind; False if already there (applied)."""
        ...

    def cursor(self, name: str) -> int: ...


class OrderLookup(Protocol):
    """CreateOrder's duplicate check, outside any unit: on the hot path of every CreateOrder, so its
    SQL adapter serves it with the database's fastest read."""

    async def by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        """The order created by this request_id and that request's fingerprint."""
        ...


# What use cases open a repository with, on a session of the unit of work.
RepositoryFactory = Callable[[Session], OrderRepository]
