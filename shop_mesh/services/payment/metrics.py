"""The payment service's business metrics, recorded by an adapter around its repository (the domain
knows nothing of Prometheus): every committed payment event, declines by reason, and the event
reader's lag."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from prometheus_client import Counter

from shop_mesh.services.common.metrics import on_commit, reason_label, record_event_log_lag, sampling_job
from shop_mesh.services.payment.domain import Payment, PaymentEvent, PaymentEventType, PaymentProcessor
from shop_mesh.services.payment.repository import PaymentRepository, PaymentUnitsOnDatabase

R = TypeVar("R")

PAYMENT_EVENTS = Counter(
    "shop_payment_events",
    "Payment state changes committed, by event type (AUTHORIZED, DECLINED, CAPTURED, SETTLED, ...).",
    ["type"],
)
PAYMENT_DECLINES = Counter(
    "shop_payment_declines", "Authorizations declined, by decline reason code.", ["reason"]
)
for _type in PaymentEventType:  # every series from the start, at 0
    PAYMENT_EVENTS.labels(_type.value)


def _record(type_: PaymentEventType, payment: Payment) -> None:
    PAYMENT_EVENTS.labels(type_.value).inc()
    if type_ is PaymentEventType.DECLINED:
        PAYMENT_DECLINES.labels(reason_label(payment.decline_reason)).inc()


class MeteredPaymentRepository(PaymentRepository):
    def append_event(
        self, type_: PaymentEventType, payment: Payment, at: datetime, note: str = ""
    ) -> PaymentEvent:
        event = super().append_event(type_, payment, at, note)
        on_commit(lambda: _record(type_, payment))
        return event


class MeteredPaymentUnits(PaymentUnitsOnDatabase):
    """PaymentUnits whose write transactions record the events they commit."""

    async def write(self, fn: Callable[[PaymentRepository], R]) -> R:
        return await self.db.write(lambda session: fn(MeteredPaymentRepository(session)))


def gauge_job(
    units: PaymentUnitsOnDatabase, processor: PaymentProcessor
) -> Callable[[asyncio.Event], Awaitable[None]]:
    """Background job: how far the event reader (serving WatchPaymentEvents) is behind the log."""

    async def sample() -> None:
        last = await units.read(lambda repo: repo.max_event_sequence())
        record_event_log_lag("payment_events", last, processor.events.position(last))

    return sampling_job(sample)
