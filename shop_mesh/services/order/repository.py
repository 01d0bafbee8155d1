"""Order storage (SQLAlchemy Core). The only module with SQL in it."""

from __future__ import annotations

import functools
from collections.abc import MutableMapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from shop_mesh.services.common.db import Database, db_session, insert_unless_present
from shop_mesh.services.common.idempotency_sql import idempotency_table
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.outbox import sequence_table
from shop_mesh.services.common.sqltypes import UtcDateTime
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import Change, LineItem, Order, OrderEvent, OrderState

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
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
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
    Column("create_time", UtcDateTime(), nullable=False),
    Index("ix_order_events_order_id_sequence", "order_id", "sequence"),
)

# Where the payment-event consumer is: updated in the transaction that applies the event.
consumer_cursors = Table(
    "consumer_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

# The reconciler's attempts per saga (a table of its own, so existing databases get it from
# create_all): how many it made and when it may try again (exponential backoff).
saga_retries = Table(
    "order_saga_retries",
    metadata,
    Column("order_id", String(40), primary_key=True),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_time", UtcDateTime(), nullable=False),
)

idempotency_keys = idempotency_table(metadata)
sequences = sequence_table(metadata)
ORDER_EVENTS_SEQUENCE = "order_events"
_STUCK_STATES = (
    OrderState.PENDING.value,
    OrderState.PAYMENT_AUTHORIZED.value,
    OrderState.AWAITING_SETTLEMENT.value,  # its settlement event may have been missed
)
# Terminal states whose release of the payment may still be pending.
_RELEASE_STATES = (OrderState.CANCELLED.value, OrderState.REJECTED.value)


def _item(row: Row[Any]) -> LineItem:
    return LineItem(row.sku, row.quantity, Money(row.currency_code, row.unit_price_nanos))


# Statements are built once, here, and run with a params dict: building one per call (coercions,
# a fresh cache key) cost several times more CPU than executing it. A bindparam in a WHERE is named
# with a leading "_" where the statement also SETs/INSERTs columns from the params' keys. Expanding
# IN and LIMIT binds carry their type, as a literal would.
_BY_ORDER_ID = select(orders).where(orders.c.order_id == bindparam("order_id"))
_BY_REQUEST_ID = select(orders).where(orders.c.request_id == bindparam("request_id"))
_ORDERS_IN = select(orders).where(orders.c.order_id.in_(bindparam("order_ids", expanding=True, type_=String)))
_ITEMS_OF = (
    select(line_items).where(line_items.c.order_id == bindparam("order_id")).order_by(line_items.c.position)
)
_ITEMS_OF_ORDERS = (
    select(line_items)
    .where(line_items.c.order_id.in_(bindparam("order_ids", expanding=True, type_=String)))
    .order_by(line_items.c.order_id, line_items.c.position)
)
_INSERT_LINE_ITEMS = insert(line_items)  # executemany: one dict per item


@functools.cache
def _transition(guard: frozenset[OrderState]) -> Update:
    """The conditional update of one guard (there are a handful): its states are bound values of the
    statement, not an expanding IN, whose SQL was rendered anew on every execution (~25 us of ~130).
    No .values(): the SET clause is the params' keys other than the "_" ones (state, update_time, …)."""
    states = sorted(s.value for s in guard)
    allowed = [orders.c.state == bindparam(f"_from_{i}", v, type_=String) for i, v in enumerate(states)]
    return (
        update(orders).where(orders.c.order_id == bindparam("_order_id"), or_(*allowed)).returning(*orders.c)
    )


_RELEASE_DONE = (
    update(orders).where(orders.c.order_id == bindparam("_order_id")).values(release_pending=False)
)
_RELEASE_DONE_WITH_PAYMENT = _RELEASE_DONE.values(
    payment_id=func.coalesce(orders.c.payment_id, bindparam("_payment_id", type_=String))
)
_INSERT_EVENT = insert(order_events)
_EVENTS_AFTER = (
    select(order_events)
    .where(order_events.c.sequence > bindparam("after"))
    .order_by(order_events.c.sequence)
    .limit(bindparam("limit", type_=Integer))
)
_ORDER_EVENTS_AFTER = _EVENTS_AFTER.where(order_events.c.order_id == bindparam("order_id"))
_MAX_EVENT_SEQUENCE = select(func.max(order_events.c.sequence))
_LAST_EVENT_SEQUENCE = _MAX_EVENT_SEQUENCE.where(order_events.c.order_id == bindparam("order_id"))
_STUCK = (
    select(orders, saga_retries.c.attempts)
    .select_from(orders.outerjoin(saga_retries, saga_retries.c.order_id == orders.c.order_id))
    .where(
        orders.c.update_time <= bindparam("older_than"),
        or_(
            orders.c.state.in_(_STUCK_STATES),
            and_(orders.c.state.in_(_RELEASE_STATES), orders.c.release_pending.is_(True)),
        ),
        or_(
            saga_retries.c.next_attempt_time.is_(None),
            saga_retries.c.next_attempt_time <= bindparam("now"),
            # A saga past its bound does not wait out a backoff (a pending release does).
            and_(orders.c.create_time <= bindparam("expired_before"), orders.c.state.in_(_STUCK_STATES)),
        ),
    )
    .order_by(orders.c.update_time)
    .limit(bindparam("limit", type_=Integer))
)
_CLAIM_SAGA_RETRY = (
    update(saga_retries)
    .where(saga_retries.c.order_id == bindparam("_order_id"), saga_retries.c.attempts == bindparam("_seen"))
    .values(attempts=bindparam("_attempts"), next_attempt_time=bindparam("_next"))
)
_RESET_SAGA_RETRIES = delete(saga_retries).where(saga_retries.c.order_id == bindparam("order_id"))
_CURSOR = select(consumer_cursors.c.position).where(consumer_cursors.c.name == bindparam("name"))
_ADVANCE_CURSOR = (
    update(consumer_cursors)
    .where(
        consumer_cursors.c.name == bindparam("_name"),
        consumer_cursors.c.position < bindparam("_position"),
    )
    .values(position=bindparam("_position"))
)
_INSERT_CURSOR = insert(consumer_cursors)


class SqlOrderLookup:
    """The `OrderLookup` port: a read unit of the repository's own `get_by_request_id`."""

    def __init__(self, db: Database):
        self._db = db

    async def by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        # Nearly every CreateOrder is new: the miss is one `read_first` (on SQLite ~4x cheaper than a
        # read unit); a hit reads the order with its items in one unit.
        if await self._db.read_first(_BY_REQUEST_ID, {"request_id": request_id}) is None:
            return None
        return await self._db.read(lambda session: SqlOrderRepository(session).get_by_request_id(request_id))


class SqlOrderRepository:
    def __init__(self, session: Session):
        self.session = db_session(session)

    def _items(self, order_ids: list[str]) -> dict[str, list[LineItem]]:
        result: dict[str, list[LineItem]] = {oid: [] for oid in order_ids}
        if not order_ids:
            return result
        if len(order_ids) == 1:  # the hot case (an order by id or request id): no expanding IN
            rows = self.session.execute(_ITEMS_OF, {"order_id": order_ids[0]})
        else:
            rows = self.session.execute(_ITEMS_OF_ORDERS, {"order_ids": order_ids})
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
            create_time=r.create_time,
            update_time=r.update_time,
            payment_method_token=r.payment_method_token,
            release_pending=bool(r.release_pending),
        )

    def _orders(self, rows: list[Row[Any]]) -> list[Order]:
        items = self._items([str(r.order_id) for r in rows])
        return [self._order(r, items[str(r.order_id)]) for r in rows]

    def get(self, order_id: str) -> Order | None:
        row = self.session.execute(_BY_ORDER_ID, {"order_id": order_id}).first()
        return None if row is None else (self._orders([row]))[0]

    def get_by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        row = self.session.execute(_BY_REQUEST_ID, {"request_id": request_id}).first()
        if row is None:
            return None
        return (self._orders([row]))[0], str(row.fingerprint)

    def insert(self, order: Order, request_id: str, fingerprint: str) -> bool:
        # The unique request_id decides whether this is the first CreateOrder with it.
        inserted = insert_unless_present(
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
        self.session.execute(
            _INSERT_LINE_ITEMS,
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

    def transition_to(self, order: Order, update: Change, now: datetime) -> Order | None:
        """Conditional update, only if the order is in one of update.guard: the updated order (None if
        unchanged) from the UPDATE itself (RETURNING), not a second read; line items never change,
        so `order`'s are reused."""
        params: dict[str, object] = {
            "_order_id": order.order_id,
            "state": update.target.value,
            "update_time": now,
        }
        for name in ("reason", "payment_id", "release_pending"):
            value = getattr(update, name)
            if value is not None:  # None: left as it is
                params[name] = value
        row = self.session.execute(_transition(update.guard), params).first()
        return None if row is None else self._order(row, list(order.line_items))

    def set_release_done(self, order_id: str, payment_id: str | None) -> None:
        if payment_id:
            self.session.execute(
                _RELEASE_DONE_WITH_PAYMENT, {"_order_id": order_id, "_payment_id": payment_id}
            )
        else:
            self.session.execute(_RELEASE_DONE, {"_order_id": order_id})

    def add_event(self, order: Order, sequence: int, now: datetime) -> None:
        self.session.execute(
            _INSERT_EVENT,
            {
                "sequence": sequence,
                "order_id": order.order_id,
                "state": order.state.value,
                "reason": order.reason,
                "payment_id": order.payment_id or None,
                "create_time": now,
            },
        )

    def events_after(self, order_id: str, after_sequence: int, limit: int) -> list[OrderEvent]:
        params = {"after": after_sequence, "limit": limit, "order_id": order_id}
        return self._events(self.session.execute(_ORDER_EVENTS_AFTER, params).all())

    def all_events_after(
        self, after_sequence: int, limit: int, known: MutableMapping[str, Order] | None = None
    ) -> list[OrderEvent]:
        """Events of every order, for the process's one event reader (EventHub). `known`: orders
        already read, by id (only their immutable fields are used); orders read here are added."""
        params = {"after": after_sequence, "limit": limit}
        return self._events(self.session.execute(_EVENTS_AFTER, params).all(), known)

    def max_event_sequence(self) -> int:
        return int(self.session.scalar(_MAX_EVENT_SEQUENCE) or 0)

    def _events(
        self, rows: Sequence[Row[Any]], known: MutableMapping[str, Order] | None = None
    ) -> list[OrderEvent]:
        # An event row carries what changes (state, reason, payment); the rest of its snapshot comes
        # from the order, which is immutable in those fields: every order of the batch that is not
        # already `known` in two queries (orders, then their items), not two per order.
        bases: MutableMapping[str, Order] = {} if known is None else known
        order_ids = list(dict.fromkeys(oid for row in rows if (oid := str(row.order_id)) not in bases))
        if order_ids:
            found = self.session.execute(_ORDERS_IN, {"order_ids": order_ids}).all()
            for order in self._orders(list(found)):
                bases[order.order_id] = order
        events = []
        for row in rows:
            order_id = row.order_id
            base = bases[order_id]  # events are only written with their order
            state = OrderState(row.state)
            at = row.create_time
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

    def last_event_sequence(self, order_id: str) -> int:
        value = self.session.scalar(_LAST_EVENT_SEQUENCE, {"order_id": order_id})
        return int(value or 0)

    def page(self, user_id: str | None, after_key: str | None, limit: int) -> list[Order]:
        query = select(orders).order_by(orders.c.order_id).limit(limit)
        if user_id:
            query = query.where(orders.c.user_id == user_id)
        if after_key:
            query = query.where(orders.c.order_id > after_key)
        return self._orders(list(self.session.execute(query).all()))

    def stuck(
        self, older_than: datetime, now: datetime, expired_before: datetime, limit: int
    ) -> list[tuple[Order, int]]:
        params = {"older_than": older_than, "now": now, "expired_before": expired_before, "limit": limit}
        rows = list(self.session.execute(_STUCK, params).all())
        return list(zip(self._orders(rows), [int(r.attempts or 0) for r in rows], strict=True))

    def claim_attempt(self, order_id: str, seen: int, next_attempt_time: datetime) -> bool:
        """Count one more reconciler attempt, if nobody counted one since we read `seen`."""
        if seen == 0:
            values = {"order_id": order_id, "attempts": 1, "next_attempt_time": next_attempt_time}
            return insert_unless_present(self.session, saga_retries, values, [saga_retries.c.order_id])
        params = {"_order_id": order_id, "_seen": seen, "_attempts": seen + 1, "_next": next_attempt_time}
        result = self.session.execute(_CLAIM_SAGA_RETRY, params)
        return bool(result.rowcount)

    def reset_attempts(self, order_id: str) -> None:
        self.session.execute(_RESET_SAGA_RETRIES, {"order_id": order_id})

    def advance_cursor(self, name: str, sequence: int) -> bool:
        result = self.session.execute(_ADVANCE_CURSOR, {"_name": name, "_position": sequence})
        return bool(result.rowcount)

    def cursor(self, name: str) -> int:
        value = self.session.scalar(_CURSOR, {"name": name})
        return int(value or 0)

    def ensure_cursor(self, name: str) -> None:
        if self.session.scalar(_CURSOR, {"name": name}) is None:
            self.session.execute(_INSERT_CURSOR, {"name": name, "position": 0})


_SETTLEMENT_BACKLOG = select(func.count(), func.min(orders.c.update_time)).where(
    orders.c.state == OrderState.AWAITING_SETTLEMENT.value
)


def settlement_backlog(session: Session) -> tuple[int, datetime | None]:
    """Orders waiting for settlement, and when the oldest of them got there (for metrics)."""
    row: tuple[Any, ...] = tuple(db_session(session).execute(_SETTLEMENT_BACKLOG).one())
    return int(row[0]), row[1]
