"""The order saga: entities, the ports it needs (users, payments, storage) and its business rules.

No protobuf or gRPC here. Upstream services are reached through the UserDirectory and PaymentGateway
protocols (adapters in clients.py); storage through OrderRepository (repository.py).

Saga policy (see docs/decisions.md): every step is a conditional state transition committed with its
event, and every upstream call carries a request_id derived from the order (`<order_id>:authorize`,
`:capture`, `:void`, `:refund`). Any number of drivers (the CreateOrder call, a duplicate of it, the
reconciler, another replica) may therefore run the same saga concurrently or again after a crash: the
payment service deduplicates the money movements and the conditional updates let one transition win.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Protocol

from shop_mesh.services.common.context import acting_for
from shop_mesh.services.common.db import Database, DbSession
from shop_mesh.services.common.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    StreamShutdown,
    Unavailable,
)
from shop_mesh.services.common.event_hub import EventHub
from shop_mesh.services.common.idempotency import IdempotencyStore, fingerprint, replayed_result
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.outbox import SequenceAllocator
from shop_mesh.services.common.principal import SERVICE, Principal, customer

log = get_logger("order")

PAYMENT_EVENTS_CURSOR = "payment-events"


class OrderState(Enum):
    PENDING = "PENDING"
    PAYMENT_AUTHORIZED = "PAYMENT_AUTHORIZED"
    AWAITING_SETTLEMENT = "AWAITING_SETTLEMENT"
    PAID = "PAID"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({OrderState.PAID, OrderState.REJECTED, OrderState.CANCELLED})


@dataclass(frozen=True)
class LineItem:
    sku: str
    quantity: int
    unit_price: Money


@dataclass(frozen=True)
class Order:
    order_id: str
    user_id: str
    line_items: tuple[LineItem, ...]
    total: Money
    state: OrderState
    payment_id: str
    reason: str
    create_time: datetime
    update_time: datetime
    # Kept for the reconciler, which may have to re-run the authorization; never returned to clients.
    payment_method_token: str = ""
    # Cancelled before its payment was known: the reconciler checks for an authorization to release.
    release_pending: bool = False


@dataclass(frozen=True)
class OrderEvent:
    sequence: int
    order_id: str
    state: OrderState
    reason: str
    order: Order  # the order as it was right after the event
    create_time: datetime


@dataclass(frozen=True)
class NewOrder:
    """A validated CreateOrder request."""

    request_id: str
    user_id: str
    line_items: tuple[LineItem, ...]
    payment_method_token: str

    def fingerprint(self) -> str:
        return fingerprint(
            {
                "user_id": self.user_id,
                "items": [
                    [i.sku, i.quantity, i.unit_price.currency_code, i.unit_price.total_nanos]
                    for i in self.line_items
                ],
                "token": self.payment_method_token,
            }
        )


def order_total(items: Sequence[LineItem]) -> Money:
    total = Money.zero(items[0].unit_price.currency_code)
    for item in items:
        total = total + item.unit_price.times(item.quantity)
    return total


# ---- ports ----------------------------------------------------------------------------------------


class UserStatus(Enum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"  # suspended or deleted: exists, but may not order


class UserDirectory(Protocol):
    async def user_status(self, user_id: str) -> UserStatus | None:
        """None if there is no such user. Raises Unavailable on transient faults."""
        ...


class PaymentState(Enum):
    AUTHORIZED = "AUTHORIZED"
    DECLINED = "DECLINED"
    CAPTURED = "CAPTURED"
    SETTLED = "SETTLED"
    VOIDED = "VOIDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"


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
    async def get(self, order_id: str) -> Order | None: ...

    async def get_by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        """The order created by this request_id and that request's fingerprint."""
        ...

    async def insert(self, order: Order, request_id: str, fingerprint: str) -> bool:
        """False if an order with this request_id exists already (a concurrent duplicate won)."""
        ...

    async def transition_to(
        self,
        order: Order,
        from_states: frozenset[OrderState],
        to: OrderState,
        *,
        now: datetime,
        reason: str | None = None,
        payment_id: str | None = None,
        release_pending: bool | None = None,
    ) -> Order | None:
        """Conditional update, only if the order is in one of from_states: the order as updated,
        or None if it was not in from_states."""
        ...

    async def set_release_done(self, order_id: str, payment_id: str | None) -> None: ...

    async def add_event(self, order: Order, sequence: int, now: datetime) -> None: ...

    async def events_after(self, order_id: str, after_sequence: int, limit: int) -> list[OrderEvent]: ...

    async def last_event_sequence(self, order_id: str) -> int: ...

    async def all_events_after(
        self, after_sequence: int, limit: int, known: MutableMapping[str, Order] | None = None
    ) -> list[OrderEvent]: ...

    async def max_event_sequence(self) -> int: ...

    async def page(self, user_id: str | None, after_key: str | None, limit: int) -> list[Order]: ...

    async def stuck(
        self, older_than: datetime, now: datetime, expired_before: datetime, limit: int
    ) -> list[tuple[Order, int]]:
        """Sagas nobody is driving, untouched since `older_than` and not backing off at `now` (unless
        created before `expired_before`: past their bound, they do not wait out a backoff): PENDING /
        PAYMENT_AUTHORIZED / AWAITING_SETTLEMENT, or CANCELLED / REJECTED with release_pending; each
        with the reconciler's attempts so far."""
        ...

    async def claim_attempt(self, order_id: str, seen: int, next_attempt_time: datetime) -> bool:
        """Count a reconciler attempt (seen -> seen + 1) and back off until next_attempt_time; False if
        another reconciler counted one since `seen` was read (it drives the saga now)."""
        ...

    async def reset_attempts(self, order_id: str) -> None: ...

    async def idempotent_result(self, scope: str, request_id: str) -> tuple[str, str | None] | None: ...

    async def advance_cursor(self, name: str, sequence: int) -> bool:
        """Move the consumer cursor to `sequence` if it is behind; False if already there (applied)."""
        ...

    async def cursor(self, name: str) -> int: ...


StepHook = Callable[[str], Awaitable[None]]


async def _no_hook(step: str) -> None:
    return None


@dataclass(frozen=True)
class SagaBound:
    """How long the reconciler keeps trying (docs/decisions.md): an order still not final after
    `max_attempts` reconciler attempts or `max_age` since it was created is compensated and REJECTED
    (SAGA_TIMEOUT); for AWAITING_SETTLEMENT an attempt is a look at the payment (SETTLED -> PAID).
    Attempts back off exponentially from `backoff` up to `max_backoff`. A release (void/refund)
    still pending on a final order gets `max_attempts` attempts of its own, then is given up with
    an error log for an operator."""

    max_attempts: int = 10
    max_age: timedelta = timedelta(minutes=5)
    backoff: timedelta = timedelta(seconds=5)
    max_backoff: timedelta = timedelta(minutes=1)

    def next_attempt(self, now: datetime, attempts: int) -> datetime:
        """When attempt number `attempts + 1` may follow the one starting now."""
        delay: timedelta = min(self.backoff * (2 ** min(attempts, 30)), self.max_backoff)
        return now + delay


class _Retry(Exception):
    """Internal: roll the transaction back and try again with fresh state."""


# Payment events that change no order, at most this many between two stores of the cursor.
PAYMENT_CURSOR_SAVE_EVERY = 100
# Orders whose immutable fields the event reader keeps, so that an event does not re-read them.
KNOWN_ORDERS_KEPT = 10_000
# Events per catch-up query of one WatchOrder stream.
WATCH_BATCH = 100


class OrderService:
    def __init__(
        self,
        db: Database,
        repository: Callable[[DbSession], OrderRepository],
        idempotency: IdempotencyStore,
        sequences: SequenceAllocator,
        users: UserDirectory,
        payments: PaymentGateway,
        *,
        stuck_after: timedelta = timedelta(seconds=30),
        bound: SagaBound | None = None,
        poll_interval: float = 0.2,
        step_hook: StepHook = _no_hook,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        request_id_read: Callable[[Any, str], tuple[Order, str] | None] | None = None,
    ):
        """`request_id_read(connection, request_id)`, when given, serves CreateOrder's duplicate check
        through `Database.read_now` (a synchronous SQLite read on the loop); otherwise a session."""
        self.db = db
        self._request_id_read = request_id_read
        self.repo = repository
        self.idempotency = idempotency
        self.sequences = sequences
        # The process's one reader of the order event log; WatchOrder streams are served from it.
        self.events: EventHub[OrderEvent] = EventHub(
            self._all_events_after, self._max_event_sequence, lambda e: e.sequence, poll_interval
        )
        # Orders the event reader has seen (or this process created), so that reading an event
        # does not re-read its order and items: the fields an event takes from them never change.
        self._known_orders: dict[str, Order] = {}
        # The settlement consumer's position in the payment event log: seen, and stored.
        self._payment_cursor_seen = self._payment_cursor_saved = 0
        self.users = users
        self.payments = payments
        self.stuck_after = stuck_after
        self.bound = bound or SagaBound()
        self.poll_interval = poll_interval
        self.step_hook = step_hook
        self.clock = clock

    async def _all_events_after(self, after_sequence: int, limit: int) -> list[OrderEvent]:
        known = self._known_orders
        async with self.db.read() as session:
            events = await self.repo(session).all_events_after(after_sequence, limit, known)
        for _ in range(len(known) - KNOWN_ORDERS_KEPT):
            del known[next(iter(known))]  # the oldest first (dicts keep insertion order)
        return events

    async def _max_event_sequence(self) -> int:
        async with self.db.read() as session:
            return await self.repo(session).max_event_sequence()

    # ---- queries ---------------------------------------------------------------------------------

    async def get_order(self, order_id: str, *, principal: Principal = SERVICE) -> Order:
        async with self.db.read() as session:
            order = await self.repo(session).get(order_id)
        # Another customer's order looks exactly like a missing one: ids cannot be probed.
        if order is None or not principal.owns(order.user_id):
            raise _order_not_found(order_id)
        return order

    async def list_orders(
        self, user_id: str | None, after_key: str | None, size: int, *, principal: Principal = SERVICE
    ) -> tuple[list[Order], bool]:
        """One page ordered by id, and whether more follow. A customer lists only their own orders
        (no user_id means theirs; another user's id is NOT_FOUND, whether that user exists or not)."""
        if not principal.privileged:
            if user_id is not None and user_id != principal.user_id:
                raise NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND")
            user_id = principal.user_id
        async with self.db.read() as session:
            rows = await self.repo(session).page(user_id, after_key, size + 1)
        return rows[:size], len(rows) > size

    async def watch_order(
        self, order_id: str, after_sequence: int, stopping: asyncio.Event, *, principal: Principal = SERVICE
    ) -> AsyncIterator[OrderEvent]:
        """Events after the cursor, then live ones; ends after a terminal event.

        Raises StreamShutdown if the server stops first, so the client resumes.
        """
        async with self.db.read() as session:
            repo = self.repo(session)
            order = await repo.get(order_id)
            if order is None or not principal.owns(order.user_id):
                raise _order_not_found(order_id)
            last = await repo.last_event_sequence(order_id)
        if order.state.terminal and last <= after_sequence:
            return

        async def fetch(cursor: int) -> list[OrderEvent]:
            async with self.db.read() as session:
                return await self.repo(session).events_after(order_id, cursor, WATCH_BATCH)

        async for event in self.events.subscribe(
            after_sequence, lambda e: e.order_id == order_id, fetch, WATCH_BATCH, stopping
        ):
            yield event
            if event.state.terminal:
                return
        raise StreamShutdown()

    # ---- CreateOrder -------------------------------------------------------------------------------

    async def create_order(self, new: NewOrder, *, principal: Principal = SERVICE) -> Order:
        if not principal.owns(new.user_id):
            # The same answer whether that account exists or not.
            raise PermissionDenied("a customer orders on their own account only", reason="NOT_YOUR_ACCOUNT")
        print_ = new.fingerprint()
        found = await self._by_request_id(new.request_id)
        if found is None:
            # Check the user before writing: an unknown or blocked user leaves no order row behind.
            await self._check_user(new.user_id)
            order = await self._insert(new, print_)
        else:
            order = self._same_request(found, print_, new.request_id)
        # A duplicate drives the saga too: harmless (derived payment request ids, conditional updates)
        # and it finishes a saga whose first driver died.
        return await self._advance_for_owner(order)

    async def _advance_for_owner(self, order: Order) -> Order:
        """The saga acts for the order's customer (whoever drives it: the customer, an admin, the
        reconciler): payment records them as the owner of the order's payments."""
        with acting_for(customer(order.user_id)):
            return await self.advance(order)

    async def _by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        if self._request_id_read is not None:
            return await self.db.read_now(self._request_id_read, request_id)
        async with self.db.read() as session:
            return await self.repo(session).get_by_request_id(request_id)

    @staticmethod
    def _same_request(found: tuple[Order, str], print_: str, request_id: str) -> Order:
        order, stored_print = found
        if stored_print != print_:
            raise AlreadyExists(
                f"request_id {request_id!r} was already used for a different CreateOrder request",
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": request_id},
            )
        return order

    async def _check_user(self, user_id: str) -> None:
        status = await self.users.user_status(user_id)
        if status is None:
            raise FailedPrecondition(
                f"user {user_id} does not exist", reason="USER_NOT_FOUND", metadata={"user_id": user_id}
            )
        if status is not UserStatus.ACTIVE:
            raise FailedPrecondition(
                f"user {user_id} may not place orders",
                reason="USER_NOT_ACTIVE",
                metadata={"user_id": user_id},
            )

    async def _insert(self, new: NewOrder, print_: str) -> Order:
        now = self.clock()
        order = Order(
            order_id=new_id("ord"),
            user_id=new.user_id,
            line_items=new.line_items,
            total=order_total(new.line_items),
            state=OrderState.PENDING,
            payment_id="",
            reason="",
            create_time=now,
            update_time=now,
            payment_method_token=new.payment_method_token,
        )
        async with self.db.transaction() as session:
            repo = self.repo(session)
            if not await repo.insert(order, new.request_id, print_):
                found = await repo.get_by_request_id(new.request_id)
                if found is None:  # pragma: no cover - the unique key guarantees a row
                    raise Unavailable("concurrent request with the same request_id; retry")
                return self._same_request(found, print_, new.request_id)
            await repo.add_event(order, await self.sequences.next(session), now)
        self._known_orders[order.order_id] = order
        self.events.notify()
        await self.step_hook("created")
        return order

    # ---- the saga ---------------------------------------------------------------------------------

    async def advance(self, order: Order) -> Order:
        """Drive the saga as far as it goes synchronously: to AWAITING_SETTLEMENT or a terminal state."""
        for _ in range(8):
            if order.state is OrderState.PENDING:
                order = await self._authorize(order)
            elif order.state is OrderState.PAYMENT_AUTHORIZED:
                order = await self._capture(order)
            else:
                return order
        return order

    async def _authorize(self, order: Order) -> Order:
        try:
            payment = await self.payments.authorize(
                f"{order.order_id}:authorize", order.order_id, order.total, order.payment_method_token
            )
        except UpstreamRefused as exc:
            # Retrying the same authorization can never succeed: end the saga now.
            log.warning("payment_refused", order_id=order.order_id, step="authorize", upstream_code=exc.code)
            return await self._abandon(order, "PAYMENT_REFUSED")
        if payment.state is PaymentState.DECLINED:
            return await self._transition(
                order,
                {OrderState.PENDING},
                OrderState.REJECTED,
                reason="PAYMENT_DECLINED",
                payment_id=payment.payment_id,
            )
        updated = await self._transition(
            order, {OrderState.PENDING}, OrderState.PAYMENT_AUTHORIZED, payment_id=payment.payment_id
        )
        if updated.state is OrderState.PAYMENT_AUTHORIZED and updated.payment_id == payment.payment_id:
            await self.step_hook("authorize")
        elif updated.state in (OrderState.CANCELLED, OrderState.REJECTED):
            # Cancelled or given up while we were authorizing: this authorization must not be left behind.
            await self._release(updated.order_id, payment, updated.reason or "order cancelled")
            async with self.db.transaction() as session:
                await self.repo(session).set_release_done(updated.order_id, payment.payment_id)
        return updated

    async def _capture(self, order: Order) -> Order:
        try:
            payment = await self.payments.capture(f"{order.order_id}:capture", order.payment_id)
        except PaymentConflict:
            payment = await self.payments.get(order.payment_id)
        except UpstreamRefused as exc:
            log.warning("payment_refused", order_id=order.order_id, step="capture", upstream_code=exc.code)
            return await self._abandon(order, "PAYMENT_REFUSED")
        if payment.state in CAPTURED_STATES or payment.state is PaymentState.REFUNDED:
            updated = await self._transition(
                order, {OrderState.PAYMENT_AUTHORIZED}, OrderState.AWAITING_SETTLEMENT
            )
            await self.step_hook("capture")
            return updated
        if payment.state is PaymentState.VOIDED:
            # Voided by a cancel that did not get to commit: record the outcome it intended.
            return await self._transition(
                order, {OrderState.PAYMENT_AUTHORIZED}, OrderState.CANCELLED, reason="PAYMENT_VOIDED"
            )
        raise Unavailable(f"payment {payment.payment_id} is {payment.state.value}; retry later")

    async def _transition(
        self,
        order: Order,
        from_states: set[OrderState],
        to: OrderState,
        *,
        reason: str | None = None,
        payment_id: str | None = None,
        release_pending: bool | None = None,
    ) -> Order:
        """Apply one saga step with its event; if another driver moved the order first, return its state."""
        now = self.clock()
        async with self.db.transaction() as session:
            repo = self.repo(session)
            updated = await repo.transition_to(
                order,
                frozenset(from_states),
                to,
                now=now,
                reason=reason,
                payment_id=payment_id,
                release_pending=release_pending,
            )
            if updated is not None:
                await repo.add_event(updated, await self.sequences.next(session), now)
                current = updated
            else:
                found = await repo.get(order.order_id)
                if found is None:  # pragma: no cover - orders are never deleted
                    raise NotFound(f"order {order.order_id} not found", reason="ORDER_NOT_FOUND")
                current = found
        if updated is not None:
            self.events.notify()
        return current

    async def _abandon(self, order: Order, reason: str) -> Order:
        """End a saga that cannot finish: REJECTED with `reason` first (so no driver moves it on), then
        release whatever its payments hold. The order is final either way; what is not released here
        stays release_pending for the reconciler: a release that failed, and for an order given up
        while PENDING, an authorization that may still land (another driver's call in flight) —
        the sweep after RECONCILE_STUCK_AFTER_SECONDS finds it, as for a cancel while PENDING."""
        # The release gets an attempt budget of its own. Reset first: a crash right after the
        # transition must not leave a used-up budget that would give the release up untried.
        async with self.db.transaction() as session:
            await self.repo(session).reset_attempts(order.order_id)
        updated = await self._transition(
            order, {order.state}, OrderState.REJECTED, reason=reason, release_pending=True
        )
        if updated.state is not OrderState.REJECTED or not updated.release_pending:
            return updated  # another driver moved it first; it decides
        log.warning("saga_abandoned", order_id=order.order_id, reason=reason, state=order.state.value)
        if order.state is OrderState.PENDING:
            return updated
        try:
            await self._release_order_payments(updated)
        except DomainError as exc:
            log.warning("release_deferred", order_id=order.order_id, error=exc.reason)
            return updated
        return replace(updated, release_pending=False)

    async def _release(self, order_id: str, payment: Payment, reason: str) -> None:
        """Give back whatever the payment holds: void an authorization, refund a capture."""
        if payment.state is PaymentState.AUTHORIZED:
            try:
                await self.payments.void(f"{order_id}:void", payment.payment_id)
                return
            except PaymentConflict:
                payment = await self.payments.get(payment.payment_id)  # captured meanwhile
        if payment.state in CAPTURED_STATES:
            try:
                await self.payments.refund(f"{order_id}:refund", payment.payment_id, reason)
            except PaymentConflict:
                if (await self.payments.get(payment.payment_id)).state is not PaymentState.REFUNDED:
                    raise  # refunded by someone else is fine; anything else is not

    # ---- CancelOrder ------------------------------------------------------------------------------

    async def cancel_order(
        self, request_id: str, order_id: str, reason: str, *, principal: Principal = SERVICE
    ) -> Order:
        print_ = fingerprint({"order_id": order_id, "reason": reason})
        for _ in range(5):
            async with self.db.read() as session:
                repo = self.repo(session)
                prior = await repo.idempotent_result("CancelOrder", request_id)
                order = await repo.get(order_id)
            if order is None or not principal.owns(order.user_id):
                raise _order_not_found(order_id)
            if prior is not None:
                return await self.get_order(replayed_result("CancelOrder", request_id, print_, prior))
            if order.state in (OrderState.REJECTED, OrderState.CANCELLED):
                raise FailedPrecondition(
                    f"order {order_id} is {order.state.value} and cannot be cancelled",
                    reason="ORDER_NOT_CANCELLABLE",
                    metadata={"state": order.state.value},
                )
            # Money first, then the record: if we crash in between, the order is still cancellable
            # and a retry (same derived void/refund ids) has no second effect.
            if order.payment_id:
                await self._release(order_id, await self.payments.get(order.payment_id), reason)
            try:
                return await self._commit_cancel(order, request_id, print_, reason)
            except _Retry:
                continue  # the saga moved the order meanwhile; release what it holds now
        raise Aborted("the order kept changing while cancelling; retry", reason="ORDER_CHANGED")

    async def _commit_cancel(self, order: Order, request_id: str, print_: str, reason: str) -> Order:
        now = self.clock()
        async with self.db.transaction() as session:
            repo = self.repo(session)
            stored = await self.idempotency.claim(session, "CancelOrder", request_id, print_)
            if stored is not None:
                current = await repo.get(stored)
                assert current is not None
                return current
            updated = await repo.transition_to(
                order,
                frozenset({order.state}),
                OrderState.CANCELLED,
                now=now,
                reason=reason or "CANCELLED",
                release_pending=order.state is OrderState.PENDING,
            )
            changed = updated is not None
            current = updated if updated is not None else await repo.get(order.order_id)
            assert current is not None
            if not changed and current.state is not OrderState.CANCELLED:
                raise _Retry
            # Also when a racing driver recorded the cancellation first (it saw our void): the
            # order is cancelled, as asked, so this request succeeded.
            await self.idempotency.complete(session, "CancelOrder", request_id, order.order_id)
            if changed:
                await repo.add_event(current, await self.sequences.next(session), now)
        if changed:
            self.events.notify()
        return current

    # ---- settlement consumer ----------------------------------------------------------------------

    async def apply_payment_event(self, event: PaymentEvent) -> bool:
        """Apply one payment event exactly once across restarts and replicas. True if it was new."""
        if not event.settled:
            # No order changes: the stored cursor moves only every PAYMENT_CURSOR_SAVE_EVERY such
            # events (a write transaction each was ~1/10 of the order app's CPU per order); after a
            # restart, replaying them changes nothing.
            if event.sequence <= self._payment_cursor_seen:
                return False
            self._payment_cursor_seen = event.sequence
            if event.sequence - self._payment_cursor_saved < PAYMENT_CURSOR_SAVE_EVERY:
                return True
        now = self.clock()
        async with self.db.transaction() as session:
            repo = self.repo(session)
            # Cursor first: it locks the cursor row, so replicas apply events one at a time.
            if not await repo.advance_cursor(PAYMENT_EVENTS_CURSOR, event.sequence):
                return False
            self._payment_cursor_saved = self._payment_cursor_seen = event.sequence
            if not event.settled:
                return True
            order = await repo.get(event.order_id)
            if order is None or order.payment_id != event.payment_id:
                return True
            # Conditional updates only (no decision on a row read earlier): on PostgreSQL a saga
            # step may commit between our read and our write. If settlement overtook our capture
            # step, the capture evidently happened: record AWAITING_SETTLEMENT first.
            steps = []
            for from_state, to in [
                (OrderState.PAYMENT_AUTHORIZED, OrderState.AWAITING_SETTLEMENT),
                (OrderState.AWAITING_SETTLEMENT, OrderState.PAID),
            ]:
                changed = await repo.transition_to(order, frozenset({from_state}), to, now=now)
                if changed is not None:
                    steps.append(to)
                    await repo.add_event(changed, await self.sequences.next(session), now)
        if steps:
            self.events.notify()
        return True

    async def run_settlement_consumer(self, stopping: asyncio.Event, max_backoff: float = 5.0) -> None:
        backoff = 0.1
        while not stopping.is_set():
            try:
                async with self.db.read() as session:
                    after = await self.repo(session).cursor(PAYMENT_EVENTS_CURSOR)
                self._payment_cursor_saved = self._payment_cursor_seen = after
                # aclosing: on an error here the upstream stream is cancelled now, not at GC.
                async with contextlib.aclosing(self.payments.events(after, stopping)) as events:
                    async for event in events:
                        await self.apply_payment_event(event)
                        backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("payment_events_interrupted", error=type(exc).__name__, retry_in_s=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), backoff)
            backoff = min(backoff * 2, max_backoff)

    # ---- reconciler -------------------------------------------------------------------------------

    async def reconcile_once(self) -> int:
        """Finish, undo or give up sagas that nobody drives any more, each at most once per backoff
        period and never beyond self.bound. Returns how many orders it looked at."""
        now = self.clock()
        async with self.db.read() as session:
            stuck = await self.repo(session).stuck(now - self.stuck_after, now, now - self.bound.max_age, 100)
        for order, attempts in stuck:
            try:
                await self._reconcile(order, attempts, now)
            except DomainError as exc:
                log.warning(
                    "reconcile_failed", order_id=order.order_id, attempts=attempts + 1, error=exc.reason
                )
        return len(stuck)

    async def _reconcile(self, order: Order, attempts: int, now: datetime) -> None:
        releasing = order.state.terminal  # final already, only its release is pending
        out_of_attempts = attempts >= self.bound.max_attempts
        if not releasing and (out_of_attempts or now - order.create_time >= self.bound.max_age):
            if order.state is OrderState.AWAITING_SETTLEMENT:
                # One last look first: a settlement whose event we missed makes it PAID, not refunded.
                try:
                    order = await self._check_settlement(order)
                except DomainError as exc:
                    log.warning("settlement_check_failed", order_id=order.order_id, error=exc.reason)
                if order.state is not OrderState.AWAITING_SETTLEMENT:
                    return
            log.warning("saga_timeout", order_id=order.order_id, state=order.state.value, attempts=attempts)
            await self._abandon(order, "SAGA_TIMEOUT")
            return
        if releasing and out_of_attempts:
            # Never loop forever, not even on a refund: an operator takes over from this line.
            log.error("release_abandoned", order_id=order.order_id, attempts=attempts)
            async with self.db.transaction() as session:
                await self.repo(session).set_release_done(order.order_id, None)
            return
        # Counted before trying, so a crash mid-attempt still uses up an attempt.
        async with self.db.transaction() as session:
            claimed = await self.repo(session).claim_attempt(
                order.order_id, attempts, self.bound.next_attempt(now, attempts)
            )
        if not claimed:
            return  # another reconciler (replica) took this attempt
        if releasing:
            await self._release_order_payments(order)
        elif order.state is OrderState.AWAITING_SETTLEMENT:
            await self._check_settlement(order)
        else:
            await self._advance_for_owner(order)

    async def _check_settlement(self, order: Order) -> Order:
        """Captured, but no settlement event applied yet: ask the payment itself (the event may have
        been missed). SETTLED -> PAID; given back by someone else -> CANCELLED; else unchanged."""
        payment = await self.payments.get(order.payment_id)
        if payment.state is PaymentState.SETTLED:
            return await self._transition(order, {OrderState.AWAITING_SETTLEMENT}, OrderState.PAID)
        if payment.state in (PaymentState.REFUNDED, PaymentState.VOIDED):
            return await self._transition(
                order, {OrderState.AWAITING_SETTLEMENT}, OrderState.CANCELLED, reason="PAYMENT_REFUNDED"
            )
        return order

    async def _release_order_payments(self, order: Order) -> None:
        """Cancelled while PENDING, or given up: an authorization may exist (or land late); release it."""
        payment_id: str | None = None
        for payment in await self.payments.payments_of_order(order.order_id):
            await self._release(order.order_id, payment, order.reason or "order cancelled")
            payment_id = payment.payment_id
        async with self.db.transaction() as session:
            await self.repo(session).set_release_done(order.order_id, payment_id)

    async def run_reconciler(self, stopping: asyncio.Event, interval: float) -> None:
        while not stopping.is_set():
            try:
                count = await self.reconcile_once()
                if count:
                    log.info("reconciled", orders=count)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconcile_round_failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)


def _order_not_found(order_id: str) -> NotFound:
    return NotFound(f"order {order_id} not found", reason="ORDER_NOT_FOUND")
