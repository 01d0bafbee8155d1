"""Order storage (SQLAlchemy Core). The only module with SQL in it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.db import insert_unless_present
from services.common.idempotency import idempotency_table
from services.common.money import Money
from services.common.outbox import sequence_table
from services.order.domain import LineItem, Order, OrderEvent, OrderState

metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("order_id", String(40), primary_key=True),
    # The database enforces CreateOrder idempotency: one order per request_id, ever.
    Column("request_id", String(128), nullable=False, unique=True),
    Column("fingerprint", String(64), nullable=False),
    Column("user_id", String(40), nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("total_nanos", BigInteger, nullable=False),
    Column("state", String(32), nullable=False),
    Column("payment_id", String(40), nullable=True),
    Column("reason", String(500), nullable=False, default=""),
    Column("payment_method_token", String(256), nullable=False),
    Column("release_pending", Boolean, nullable=False, default=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Index("ix_orders_user_id_order_id", "user_id", "order_id"),
    Index("ix_orders_state_update_time", "state", "update_time"),
)

line_items = Table(
    "order_line_items",
    metadata,
    Column("order_id", String(40), ForeignKey("orders.order_id"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("sku", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("unit_price_nanos", BigInteger, nullable=False),
)

order_events = Table(
    "order_events",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("order_id", String(40), nullable=False),
    Column("state", String(32), nullable=False),
    Column("reason", String(500), nullable=False),
    Column("payment_id", String(40), nullable=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Index("ix_order_events_order_id_sequence", "order_id", "sequence"),
)

# Where the payment-event consumer is: updated in the transaction that applies the event.
consumer_cursors = Table(
    "consumer_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

idempotency_keys = idempotency_table(metadata)
sequences = sequence_table(metadata)
ORDER_EVENTS_SEQUENCE = "order_events"
_STUCK_STATES = (OrderState.PENDING.value, OrderState.PAYMENT_AUTHORIZED.value)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _item(row: Row[Any]) -> LineItem:
    return LineItem(row.sku, row.quantity, Money(row.currency_code, row.unit_price_nanos))


# Hot statements built once, so SQLAlchemy's compiled cache is hit by identity.
_BY_REQUEST_ID = select(orders).where(orders.c.request_id == bindparam("request_id"))
_ITEMS_OF = (
    select(line_items).where(line_items.c.order_id == bindparam("order_id")).order_by(line_items.c.position)
)


def read_order_by_request_id(conn: Connection, request_id: str) -> tuple[Order, str] | None:
    """The order created by this request_id and that request's fingerprint, on a synchronous
    connection (for `Database.read_now`: CreateOrder's duplicate check is on the hot path)."""
    row = conn.execute(_BY_REQUEST_ID, {"request_id": request_id}).first()
    if row is None:
        return None
    items = [_item(r) for r in conn.execute(_ITEMS_OF, {"order_id": row.order_id})]
    return SqlOrderRepository._order(row, items), str(row.fingerprint)


class SqlOrderRepository:
    def __init__(self, session: AsyncSession):
        self.session = session

    async def _items(self, order_ids: list[str]) -> dict[str, list[LineItem]]:
        result: dict[str, list[LineItem]] = {oid: [] for oid in order_ids}
        if not order_ids:
            return result
        rows = await self.session.execute(
            select(line_items)
            .where(line_items.c.order_id.in_(order_ids))
            .order_by(line_items.c.order_id, line_items.c.position)
        )
        for row in rows:
            result[row.order_id].append(_item(row))
        return result

    @staticmethod
    def _order(r: Row[Any], items: list[LineItem]) -> Order:
        return Order(
            order_id=r.order_id,
            user_id=r.user_id,
            line_items=tuple(items),
            total=Money(r.currency_code, r.total_nanos),
            state=OrderState(r.state),
            payment_id=r.payment_id or "",
            reason=r.reason,
            create_time=_utc(r.create_time),
            update_time=_utc(r.update_time),
            payment_method_token=r.payment_method_token,
            release_pending=bool(r.release_pending),
        )

    async def _orders(self, rows: list[Row[Any]]) -> list[Order]:
        items = await self._items([str(r.order_id) for r in rows])
        return [self._order(r, items[str(r.order_id)]) for r in rows]

    async def get(self, order_id: str) -> Order | None:
        row = (await self.session.execute(select(orders).where(orders.c.order_id == order_id))).first()
        return None if row is None else (await self._orders([row]))[0]

    async def get_by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        row = (await self.session.execute(select(orders).where(orders.c.request_id == request_id))).first()
        if row is None:
            return None
        return (await self._orders([row]))[0], str(row.fingerprint)

    async def insert(self, order: Order, request_id: str, fingerprint: str) -> bool:
        # The unique request_id decides whether this is the first CreateOrder with it.
        inserted = await insert_unless_present(
            self.session,
            orders,
            {
                "order_id": order.order_id,
                "request_id": request_id,
                "fingerprint": fingerprint,
                "user_id": order.user_id,
                "currency_code": order.total.currency_code,
                "total_nanos": order.total.total_nanos,
                "state": order.state.value,
                "payment_id": order.payment_id or None,
                "reason": order.reason,
                "payment_method_token": order.payment_method_token,
                "release_pending": False,
                "create_time": order.create_time,
                "update_time": order.update_time,
            },
            [orders.c.request_id],
        )
        if not inserted:
            return False
        await self.session.execute(
            insert(line_items),
            [
                {
                    "order_id": order.order_id,
                    "position": i,
                    "sku": item.sku,
                    "quantity": item.quantity,
                    "currency_code": item.unit_price.currency_code,
                    "unit_price_nanos": item.unit_price.total_nanos,
                }
                for i, item in enumerate(order.line_items)
            ],
        )
        return True

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
        """Conditional update, only if the order is in one of from_states: the updated order (None if
        unchanged) from the UPDATE itself (RETURNING), not a second read; line items never change,
        so `order`'s are reused."""
        values: dict[str, object] = {"state": to.value, "update_time": now}
        if reason is not None:
            values["reason"] = reason
        if payment_id is not None:
            values["payment_id"] = payment_id
        if release_pending is not None:
            values["release_pending"] = release_pending
        row = (
            await self.session.execute(
                update(orders)
                .where(
                    orders.c.order_id == order.order_id,
                    orders.c.state.in_([s.value for s in from_states]),
                )
                .values(**values)
                .returning(*orders.c)
            )
        ).first()
        return None if row is None else self._order(row, list(order.line_items))

    async def set_release_done(self, order_id: str, payment_id: str | None) -> None:
        values: dict[str, object] = {"release_pending": False}
        if payment_id:
            values["payment_id"] = func.coalesce(orders.c.payment_id, payment_id)
        await self.session.execute(update(orders).where(orders.c.order_id == order_id).values(**values))

    async def add_event(self, order: Order, sequence: int, now: datetime) -> None:
        await self.session.execute(
            insert(order_events).values(
                sequence=sequence,
                order_id=order.order_id,
                state=order.state.value,
                reason=order.reason,
                payment_id=order.payment_id or None,
                create_time=now,
            )
        )

    async def events_after(self, order_id: str, after_sequence: int, limit: int) -> list[OrderEvent]:
        return await self._events_after(after_sequence, limit, order_events.c.order_id == order_id)

    async def all_events_after(self, after_sequence: int, limit: int) -> list[OrderEvent]:
        """Events of every order, for the process's one event reader (EventHub)."""
        return await self._events_after(after_sequence, limit)

    async def _events_after(
        self, after_sequence: int, limit: int, *conditions: ColumnElement[bool]
    ) -> list[OrderEvent]:
        query = (
            select(order_events)
            .where(order_events.c.sequence > after_sequence, *conditions)
            .order_by(order_events.c.sequence)
            .limit(limit)
        )
        return await self._events((await self.session.execute(query)).all())

    async def max_event_sequence(self) -> int:
        return int(await self.session.scalar(select(func.max(order_events.c.sequence))) or 0)

    async def _events(self, rows: Sequence[Row[Any]]) -> list[OrderEvent]:
        # Every order of the batch in two queries (orders, then their items), not two per order.
        order_ids = list(dict.fromkeys(str(row.order_id) for row in rows))
        bases: dict[str, Order] = {}
        if order_ids:
            found = (await self.session.execute(select(orders).where(orders.c.order_id.in_(order_ids)))).all()
            bases = {o.order_id: o for o in await self._orders(list(found))}
        events = []
        for row in rows:
            order_id = row.order_id
            base = bases[order_id]  # events are only written with their order
            state = OrderState(row.state)
            at = _utc(row.create_time)
            snapshot = Order(
                order_id=base.order_id,
                user_id=base.user_id,
                line_items=base.line_items,
                total=base.total,
                state=state,
                payment_id=row.payment_id or "",
                reason=row.reason,
                create_time=base.create_time,
                update_time=at,
            )
            events.append(OrderEvent(int(row.sequence), order_id, state, row.reason, snapshot, at))
        return events

    async def last_event_sequence(self, order_id: str) -> int:
        value = await self.session.scalar(
            select(func.max(order_events.c.sequence)).where(order_events.c.order_id == order_id)
        )
        return int(value or 0)

    async def page(self, user_id: str | None, after_key: str | None, limit: int) -> list[Order]:
        query = select(orders).order_by(orders.c.order_id).limit(limit)
        if user_id:
            query = query.where(orders.c.user_id == user_id)
        if after_key:
            query = query.where(orders.c.order_id > after_key)
        return await self._orders(list((await self.session.execute(query)).all()))

    async def stuck(self, older_than: datetime, limit: int) -> list[Order]:
        query = (
            select(orders)
            .where(
                orders.c.update_time <= older_than,
                or_(
                    orders.c.state.in_(_STUCK_STATES),
                    and_(orders.c.state == OrderState.CANCELLED.value, orders.c.release_pending.is_(True)),
                ),
            )
            .order_by(orders.c.update_time)
            .limit(limit)
        )
        return await self._orders(list((await self.session.execute(query)).all()))

    async def idempotent_result(self, scope: str, request_id: str) -> tuple[str, str | None] | None:
        row = (
            await self.session.execute(
                select(idempotency_keys.c.fingerprint, idempotency_keys.c.result).where(
                    idempotency_keys.c.scope == scope, idempotency_keys.c.request_id == request_id
                )
            )
        ).first()
        return None if row is None else (str(row[0]), row[1])

    async def advance_cursor(self, name: str, sequence: int) -> bool:
        result = await self.session.execute(
            update(consumer_cursors)
            .where(consumer_cursors.c.name == name, consumer_cursors.c.position < sequence)
            .values(position=sequence)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def cursor(self, name: str) -> int:
        value = await self.session.scalar(
            select(consumer_cursors.c.position).where(consumer_cursors.c.name == name)
        )
        return int(value or 0)

    async def ensure_cursor(self, name: str) -> None:
        exists = await self.session.scalar(
            select(consumer_cursors.c.position).where(consumer_cursors.c.name == name)
        )
        if exists is None:
            await self.session.execute(insert(consumer_cursors).values(name=name, position=0))
