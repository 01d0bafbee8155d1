"""The order saga's business metrics, recorded in adapters around the domain (which knows nothing of
Prometheus): a repository that records each committed state change, a payment gateway that records
compensations, and a background job for the gauges (settlement backlog, event reader lag).

Counts are per process and only for changes this process committed (after-commit records), so a
sum over replicas counts every order once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.metrics import (
    IDEMPOTENT_REPLAYS,
    on_commit,
    reason_label,
    record_event_log_lag,
    sampling_job,
)
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.clients import GrpcPaymentGateway
from shop_mesh.services.order.model import Change, Order, OrderState
from shop_mesh.services.order.ports import Payment
from shop_mesh.services.order.repository import SqlOrderLookup, SqlOrderRepository, settlement_backlog
from shop_mesh.services.order.store import OrderStore

ORDERS_CREATED = Counter("shop_orders_created", "Orders created (CreateOrder replays not counted).")
ORDERS_COMPLETED = Counter(
    "shop_orders_completed",
    "Orders that reached a final state: outcome paid | rejected | cancelled; reason: the rejection's "
    "reason code (e.g. PAYMENT_DECLINED), empty otherwise.",
    ["outcome", "reason"],
)
SAGA_TRANSITIONS = Counter(
    "shop_order_saga_transitions", "Order state changes committed, by the state entered.", ["state"]
)
SAGA_COMPENSATIONS = Counter(
    "shop_order_saga_compensations",
    "Money given back by the saga: void of an authorization, refund of a capture.",
    ["action"],
)
PAYMENT_DECLINES = Counter(
    "shop_order_payment_declines", "Payments declined during CreateOrder (the order is REJECTED)."
)
SETTLEMENT_LAG = Histogram(
    "shop_order_settlement_lag_seconds",
    "From the order's last saga step (capture) to its settlement (PAID).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
AWAITING_SETTLEMENT = Gauge("shop_orders_awaiting_settlement", "Orders captured and waiting for settlement.")
OLDEST_AWAITING = Gauge(
    "shop_orders_awaiting_settlement_oldest_age_seconds",
    "How long the oldest order waiting for settlement has waited (0 when none waits).",
)
RECONCILER_ACTIONS = Counter(
    "shop_order_reconciler_actions",
    "Stuck sagas the reconciler took up: advance (finish it), release (undo a final one's money) or"
    " give_up (past its bound: REJECTED SAGA_TIMEOUT and compensated).",
    ["action"],
)
STUCK_SAGAS = Gauge(
    "shop_order_stuck_sagas",
    "Sagas nobody drove for longer than RECONCILE_STUCK_AFTER_SECONDS at the reconciler's last round "
    "(at most 100 are looked at per round).",
)

# Series that exist from the start (at 0): rates and alerts see "none yet", not "no data".
for _action in ("void", "refund"):
    SAGA_COMPENSATIONS.labels(_action)
for _action in ("advance", "release"):
    RECONCILER_ACTIONS.labels(_action)
for _outcome in ("paid", "cancelled"):
    ORDERS_COMPLETED.labels(_outcome, "")

_OUTCOMES = {OrderState.PAID: "paid", OrderState.REJECTED: "rejected", OrderState.CANCELLED: "cancelled"}


def _record_event(order: Order) -> None:
    state = order.state
    SAGA_TRANSITIONS.labels(state.value).inc()
    if state is OrderState.PENDING:
        ORDERS_CREATED.inc()
        return
    outcome = _OUTCOMES.get(state)
    if outcome is None:
        return
    reason = reason_label(order.reason) if state is OrderState.REJECTED else ""
    ORDERS_COMPLETED.labels(outcome, reason).inc()
    if order.reason == "PAYMENT_DECLINED":
        PAYMENT_DECLINES.inc()


class MeteredOrderRepository(SqlOrderRepository):
    """SqlOrderRepository that records what a committed transaction changed."""

    def add_event(self, order: Order, sequence: int, now: datetime) -> None:
        super().add_event(order, sequence, now)
        on_commit(lambda: _record_event(order))

    def transition_to(self, order: Order, update: Change, now: datetime) -> Order | None:
        updated = super().transition_to(order, update, now)
        if updated is not None and update.reason == "SAGA_TIMEOUT":
            on_commit(lambda: RECONCILER_ACTIONS.labels("give_up").inc())
        if updated is not None and update.target is OrderState.PAID:
            lag = max((now - order.update_time).total_seconds(), 0.0)
            on_commit(lambda: SETTLEMENT_LAG.observe(lag))
        return updated

    def stuck(
        self, older_than: datetime, now: datetime, expired_before: datetime, limit: int
    ) -> list[tuple[Order, int]]:
        found = super().stuck(older_than, now, expired_before, limit)
        STUCK_SAGAS.set(len(found))
        for order, _attempts in found:
            RECONCILER_ACTIONS.labels("release" if order.state.terminal else "advance").inc()
        return found


class MeteredOrderLookup(SqlOrderLookup):
    """CreateOrder's duplicate check: a hit is an idempotent replay."""

    async def by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        found = await super().by_request_id(request_id)
        if found is not None:
            IDEMPOTENT_REPLAYS.labels("CreateOrder").inc()
        return found


class MeteredPaymentGateway(GrpcPaymentGateway):
    """Counts the saga's compensations (the calls that give money back)."""

    async def void(self, request_id: str, payment_id: str) -> Payment:
        payment = await super().void(request_id, payment_id)
        SAGA_COMPENSATIONS.labels("void").inc()
        return payment

    async def refund(self, request_id: str, payment_id: str, reason: str) -> Payment:
        payment = await super().refund(request_id, payment_id, reason)
        SAGA_COMPENSATIONS.labels("refund").inc()
        return payment


def gauge_job(database: Database, store: OrderStore) -> Callable[[asyncio.Event], Awaitable[None]]:
    """Background job: the settlement backlog and the event reader's lag, every few seconds."""

    async def sample() -> None:
        def read(session: Session) -> tuple[int, datetime | None, int]:
            waiting, oldest = settlement_backlog(session)
            return waiting, oldest, SqlOrderRepository(session).max_event_sequence()

        waiting, oldest, last = await database.read(read)
        AWAITING_SETTLEMENT.set(waiting)
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        OLDEST_AWAITING.set(max(age, 0.0))
        record_event_log_lag("order_events", last, store.events.position(last))

    return sampling_job(sample)
