"""Payment storage in memory: the `PaymentRepo` port with the SQL adapter's rules (a save only if the
stored state is the expected one, events with the log's increasing sequences, the first owner of an
order stays, pages in id order, settlement in capture order)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.payment.domain import Payment, PaymentEvent, PaymentEventType, PaymentState
from tests.unit.fakes.units import InMemoryUnits, Tables, next_sequence, tables_of

EVENT_SEQUENCE = "payment_events"


@dataclass
class PaymentTables(Tables):
    payments: dict[str, Payment] = field(default_factory=dict)
    events: list[PaymentEvent] = field(default_factory=list)  # in sequence order
    owners: dict[str, str] = field(default_factory=dict)  # order_id -> user_id


class InMemoryPaymentRepository:
    def __init__(self, session: Session):
        self._session = session

    @property
    def session(self) -> Session:
        return self._session

    def _tables(self, *, write: bool = False) -> PaymentTables:
        return tables_of(self._session, PaymentTables, write=write)

    def get(self, payment_id: str, *, for_update: bool = False) -> Payment | None:
        return self._tables().payments.get(payment_id)

    def add(self, payment: Payment) -> None:
        payments = self._tables(write=True).payments
        if payment.payment_id in payments:  # the primary key
            raise KeyError(f"duplicate payment {payment.payment_id}")
        payments[payment.payment_id] = payment

    def save(self, payment: Payment, *, expected_state: PaymentState) -> bool:
        payments = self._tables(write=True).payments
        stored = payments.get(payment.payment_id)
        if stored is None or stored.state is not expected_state:
            return False
        # create_time is not among the columns a save sets.
        payments[payment.payment_id] = replace(payment, create_time=stored.create_time)
        return True

    def append_event(
        self, type_: PaymentEventType, payment: Payment, at: datetime, note: str = ""
    ) -> PaymentEvent:
        tables = self._tables(write=True)
        event = PaymentEvent(next_sequence(tables, EVENT_SEQUENCE), type_, payment, at)
        tables.events.append(event)
        return event

    def list_payments(self, order_id: str | None, after_id: str | None, limit: int) -> list[Payment]:
        return _page(
            (p for p in self._tables().payments.values() if order_id is None or p.order_id == order_id),
            after_id,
            limit,
        )

    def events_after(self, after_sequence: int, order_id: str | None, limit: int) -> list[PaymentEvent]:
        found = [
            e
            for e in self._tables().events
            if e.sequence > after_sequence and (order_id is None or e.order_id == order_id)
        ]
        return found[:limit]

    def max_event_sequence(self) -> int:
        return max((e.sequence for e in self._tables().events), default=0)

    def due_for_settlement(self, captured_before: datetime, limit: int) -> list[str]:
        due = sorted(
            (p.capture_time, p.payment_id)
            for p in self._captured()
            if p.capture_time is not None and p.capture_time <= captured_before
        )
        return [payment_id for _, payment_id in due[:limit]]

    def earliest_capture(self) -> datetime | None:
        return min((p.capture_time for p in self._captured() if p.capture_time is not None), default=None)

    def set_owner(self, order_id: str, user_id: str) -> None:
        self._tables(write=True).owners.setdefault(order_id, user_id)

    def owner_of(self, order_id: str) -> str | None:
        return self._tables().owners.get(order_id)

    def list_payments_of_owner(self, user_id: str, after_id: str | None, limit: int) -> list[Payment]:
        owners = self._tables().owners
        return _page(
            (p for p in self._tables().payments.values() if owners.get(p.order_id) == user_id),
            after_id,
            limit,
        )

    def _captured(self) -> list[Payment]:
        return [p for p in self._tables().payments.values() if p.state is PaymentState.CAPTURED]


def _page(payments: Iterable[Payment], after_id: str | None, limit: int) -> list[Payment]:
    found = sorted((p for p in payments if after_id is None or p.payment_id > after_id), key=_payment_id)
    return found[:limit]


def _payment_id(payment: Payment) -> str:
    return payment.payment_id


def payment_units() -> InMemoryUnits[PaymentTables, InMemoryPaymentRepository]:
    """`PaymentUnits`: each unit hands its function the repository."""
    return InMemoryUnits(PaymentTables(), InMemoryPaymentRepository)
