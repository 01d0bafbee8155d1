"""Payment persistence: tables on the service's own MetaData and the repository over one session."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    func,
    insert,
    select,
    update,
)

from shop_mesh.services.common.db import Database, db_session, insert_unless_present
from shop_mesh.services.common.idempotency_sql import idempotency_table
from shop_mesh.services.common.outbox import SequenceAllocator, sequence_table
from shop_mesh.services.common.sqltypes import UtcDateTime
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.payment.domain import (
    Payment,
    PaymentEvent,
    PaymentEventType,
    PaymentState,
    decode_payment,
    encode_payment,
    payment_from_record,
    payment_record,
)

R = TypeVar("R")

metadata = MetaData()

payments = Table(
    "payments",
    metadata,
    Column("payment_id", String(40), primary_key=True),
    Column("order_id", String(40), nullable=False, index=True),
    Column("currency_code", String(3), nullable=False),
    # Money as integer nano-units of currency_code: never a float.
    Column("amount_nanos", BigInteger, nullable=False),
    Column("captured_nanos", BigInteger, nullable=False),
    Column("refunded_nanos", BigInteger, nullable=False),
    Column("state", String(32), nullable=False),
    Column("decline_reason", String(64), nullable=False, default=""),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
    Column("capture_time", UtcDateTime(), nullable=True),
    Index("ix_payments_state_capture_time", "state", "capture_time"),
)

payment_events = Table(
    "payment_events",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("event_type", String(32), nullable=False),
    Column("payment_id", String(40), nullable=False),
    Column("order_id", String(40), nullable=False),
    # The payment right after the event, as JSON: events are immutable history, not a join.
    Column("payment", Text, nullable=False),
    Column("note", Text, nullable=False, default=""),
    Column("create_time", UtcDateTime(), nullable=False),
    Index("ix_payment_events_order_sequence", "order_id", "sequence"),
)

# Who owns the payments of an order: the customer order asserted when it authorized (a table of its
# own: schema changes are additive, see docs/decisions.md).
payment_owners = Table(
    "payment_owners",
    metadata,
    Column("order_id", String(40), primary_key=True),
    Column("user_id", String(40), nullable=False, index=True),
)

idempotency_keys = idempotency_table(metadata)
sequences = sequence_table(metadata)
EVENT_SEQUENCE = "payment_events"


# The statements of the authorize/capture/settle paths, built once: constructing a statement per
# call (coercions, a fresh cache key) cost more CPU than executing it (docs/performance.md).
_INSERT_PAYMENT = insert(payments)
_INSERT_EVENT = insert(payment_events)
_BY_ID = select(payments).where(payments.c.payment_id == bindparam("_payment_id"))
_BY_ID_FOR_UPDATE = _BY_ID.with_for_update()
# SET comes from the params' column keys; the WHERE makes the update conditional on the state read.
_SAVE_IF_STATE = update(payments).where(
    payments.c.payment_id == bindparam("_payment_id"), payments.c.state == bindparam("_expected_state")
)
_EVENTS_AFTER = (
    select(payment_events)
    .where(payment_events.c.sequence > bindparam("_after"))
    .order_by(payment_events.c.sequence)
    .limit(bindparam("_limit"))
)
_EVENTS_OF_ORDER_AFTER = _EVENTS_AFTER.where(payment_events.c.order_id == bindparam("_order_id"))
_DUE_FOR_SETTLEMENT = (
    select(payments.c.payment_id)
    .where(
        payments.c.state == PaymentState.CAPTURED.value,
        payments.c.capture_time <= bindparam("_captured_before"),
    )
    .order_by(payments.c.capture_time)
    .limit(bindparam("_limit"))
)
_EARLIEST_CAPTURE = select(func.min(payments.c.capture_time)).where(
    payments.c.state == PaymentState.CAPTURED.value
)
_MAX_EVENT_SEQUENCE = select(func.max(payment_events.c.sequence))
_OWNER_OF = select(payment_owners.c.user_id).where(payment_owners.c.order_id == bindparam("_order_id"))
_OWNER_KEY = (payment_owners.c.order_id,)


class PaymentRepository:
    """Every SQL statement of the payment service; one instance per session."""

    _sequence = SequenceAllocator(sequences, EVENT_SEQUENCE)

    def __init__(self, session: Session):
        self.session = db_session(session)

    def ensure_sequence(self) -> None:
        self._sequence.ensure(self.session)

    def get(self, payment_id: str, *, for_update: bool = False) -> Payment | None:
        query = _BY_ID_FOR_UPDATE if for_update else _BY_ID
        row = self.session.execute(query, {"_payment_id": payment_id}).mappings().first()
        return None if row is None else payment_from_record(row)

    def add(self, payment: Payment) -> None:
        self.session.execute(_INSERT_PAYMENT, payment_record(payment))

    def save(self, payment: Payment, *, expected_state: PaymentState) -> bool:
        values = payment_record(payment)
        del values["payment_id"], values["create_time"]
        values |= {"_payment_id": payment.payment_id, "_expected_state": expected_state.value}
        result = self.session.execute(_SAVE_IF_STATE, values)
        return bool(result.rowcount == 1)

    def append_event(
        self, type_: PaymentEventType, payment: Payment, at: datetime, note: str = ""
    ) -> PaymentEvent:
        sequence = self._sequence.next(self.session)
        self.session.execute(
            _INSERT_EVENT,
            {
                "sequence": sequence,
                "event_type": type_.value,
                "payment_id": payment.payment_id,
                "order_id": payment.order_id,
                "payment": encode_payment(payment),
                "note": note,
                "create_time": at,
            },
        )
        return PaymentEvent(sequence=sequence, type=type_, payment=payment, create_time=at)

    def list_payments(self, order_id: str | None, after_id: str | None, limit: int) -> list[Payment]:
        query = select(payments).order_by(payments.c.payment_id).limit(limit)
        if order_id is not None:
            query = query.where(payments.c.order_id == order_id)
        if after_id is not None:
            query = query.where(payments.c.payment_id > after_id)
        rows = self.session.execute(query).mappings().all()
        return [payment_from_record(row) for row in rows]

    def set_owner(self, order_id: str, user_id: str) -> None:
        # One statement: the key keeps the first owner (a SELECT then an INSERT, each built per call,
        # were ~8 % of the payment app's CPU under CreateOrder).
        values = {"order_id": order_id, "user_id": user_id}
        insert_unless_present(self.session, payment_owners, values, _OWNER_KEY)

    def owner_of(self, order_id: str) -> str | None:
        value = self.session.scalar(_OWNER_OF, {"_order_id": order_id})
        return None if value is None else str(value)

    def list_payments_of_owner(self, user_id: str, after_id: str | None, limit: int) -> list[Payment]:
        owned = select(payment_owners.c.order_id).where(payment_owners.c.user_id == user_id)
        query = (
            select(payments)
            .where(payments.c.order_id.in_(owned))
            .order_by(payments.c.payment_id)
            .limit(limit)
        )
        if after_id is not None:
            query = query.where(payments.c.payment_id > after_id)
        rows = self.session.execute(query).mappings().all()
        return [payment_from_record(row) for row in rows]

    def events_after(self, after_sequence: int, order_id: str | None, limit: int) -> list[PaymentEvent]:
        params: dict[str, Any] = {"_after": after_sequence, "_limit": limit}
        query = _EVENTS_AFTER
        if order_id is not None:
            query, params["_order_id"] = _EVENTS_OF_ORDER_AFTER, order_id
        rows = self.session.execute(query, params).mappings().all()
        return [
            PaymentEvent(
                sequence=int(row["sequence"]),
                type=PaymentEventType(row["event_type"]),
                payment=decode_payment(row["payment"]),
                create_time=row["create_time"],
            )
            for row in rows
        ]

    def max_event_sequence(self) -> int:
        return int(self.session.scalar(_MAX_EVENT_SEQUENCE) or 0)

    def due_for_settlement(self, captured_before: datetime, limit: int) -> list[str]:
        rows = self.session.scalars(
            _DUE_FOR_SETTLEMENT, {"_captured_before": captured_before, "_limit": limit}
        )
        return list(rows)

    def earliest_capture(self) -> datetime | None:
        earliest: datetime | None = self.session.scalar(_EARLIEST_CAPTURE)
        return earliest


class PaymentUnitsOnDatabase:
    """PaymentUnits (see domain.py) on a Database: each unit gets a repository on its session."""

    def __init__(self, db: Database):
        self.db = db

    async def read(self, fn: Callable[[PaymentRepository], R]) -> R:
        return await self.db.read(lambda session: fn(PaymentRepository(session)))

    async def write(self, fn: Callable[[PaymentRepository], R]) -> R:
        return await self.db.write(lambda session: fn(PaymentRepository(session)))
