"""Order storage in memory: the `OrderRepository` port with the SQL adapter's rules (one order per
request_id, conditional transitions, event snapshots built as the SQL reader builds them, the stuck
sagas' query, the reconciler's attempt counter and the consumer cursor)."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import Change, Order, OrderEvent, OrderState, apply
from shop_mesh.services.order.settlement import PAYMENT_EVENTS_CURSOR
from tests.unit.fakes.units import InMemoryUnits, Tables, session_units, tables_of

ORDER_EVENTS_SEQUENCE = "order_events"
_STUCK_STATES = frozenset({OrderState.PENDING, OrderState.PAYMENT_AUTHORIZED, OrderState.AWAITING_SETTLEMENT})
# Terminal states whose release of the payment may still be pending.
_RELEASE_STATES = frozenset({OrderState.CANCELLED, OrderState.REJECTED})


@dataclass(frozen=True)
class EventRow:
    """A row of order_events: what changed; the rest of an event's snapshot comes from its order."""

    sequence: int
    order_id: str
    state: OrderState
    reason: str
    payment_id: str
    create_time: datetime


@dataclass
class OrderTables(Tables):
    orders: dict[str, Order] = field(default_factory=dict)
    request_ids: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> (order_id, fingerprint)
    events: list[EventRow] = field(default_factory=list)  # in sequence order
    cursors: dict[str, int] = field(default_factory=dict)
    retries: dict[str, tuple[int, datetime]] = field(default_factory=dict)  # -> (attempts, next attempt)


class InMemoryOrderRepository:
    def __init__(self, session: Session):
        self._session = session

    def _tables(self, *, write: bool = False) -> OrderTables:
        return tables_of(self._session, OrderTables, write=write)

    def get(self, order_id: str) -> Order | None:
        return self._tables().orders.get(order_id)

    def get_by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        tables = self._tables()
        found = tables.request_ids.get(request_id)
        return None if found is None else (tables.orders[found[0]], found[1])

    def insert(self, order: Order, request_id: str, fingerprint: str) -> bool:
        tables = self._tables(write=True)
        if request_id in tables.request_ids:  # the unique request_id
            return False
        if order.order_id in tables.orders:  # the primary key
            raise KeyError(f"duplicate order {order.order_id}")
        tables.orders[order.order_id] = replace(order, release_pending=False)
        tables.request_ids[request_id] = (order.order_id, fingerprint)
        return True

    def transition_to(self, order: Order, update: Change, now: datetime) -> Order | None:
        orders = self._tables(write=True).orders
        stored = orders.get(order.order_id)
        updated = None if stored is None else apply(stored, update, now)
        if updated is not None:
            orders[order.order_id] = updated
        return updated

    def set_release_done(self, order_id: str, payment_id: str | None) -> None:
        orders = self._tables(write=True).orders
        stored = orders.get(order_id)
        if stored is not None:
            # The payment id only fills an empty one (COALESCE).
            orders[order_id] = replace(
                stored, release_pending=False, payment_id=stored.payment_id or payment_id or ""
            )

    def add_event(self, order: Order, sequence: int, now: datetime) -> None:
        row = EventRow(sequence, order.order_id, order.state, order.reason, order.payment_id, now)
        self._tables(write=True).events.append(row)

    def events_after(self, order_id: str, after_sequence: int, limit: int) -> list[OrderEvent]:
        rows = [r for r in self._tables().events if r.order_id == order_id and r.sequence > after_sequence]
        return self._events(rows[:limit])

    def all_events_after(
        self, after_sequence: int, limit: int, known: MutableMapping[str, Order] | None = None
    ) -> list[OrderEvent]:
        rows = [r for r in self._tables().events if r.sequence > after_sequence]
        return self._events(rows[:limit], known)

    def _events(
        self, rows: list[EventRow], known: MutableMapping[str, Order] | None = None
    ) -> list[OrderEvent]:
        bases: MutableMapping[str, Order] = {} if known is None else known
        orders = self._tables().orders
        events = []
        for row in rows:
            base = bases.setdefault(row.order_id, orders[row.order_id])
            snapshot = Order(
                order_id=base.order_id,
                user_id=base.user_id,
                line_items=base.line_items,
                total=base.total,
                state=row.state,
                payment_id=row.payment_id,
                reason=row.reason,
                create_time=base.create_time,
                update_time=row.create_time,
            )
            events.append(
                OrderEvent(row.sequence, row.order_id, row.state, row.reason, snapshot, row.create_time)
            )
        return events

    def last_event_sequence(self, order_id: str) -> int:
        return max((r.sequence for r in self._tables().events if r.order_id == order_id), default=0)

    def max_event_sequence(self) -> int:
        return max((r.sequence for r in self._tables().events), default=0)

    def page(self, user_id: str | None, after_key: str | None, limit: int) -> list[Order]:
        found = [
            o
            for _, o in sorted(self._tables().orders.items())
            if (not user_id or o.user_id == user_id) and (not after_key or o.order_id > after_key)
        ]
        return found[:limit]

    def stuck(
        self, older_than: datetime, now: datetime, expired_before: datetime, limit: int
    ) -> list[tuple[Order, int]]:
        tables = self._tables()
        found = []
        for order in tables.orders.values():
            running = order.state in _STUCK_STATES
            if order.update_time > older_than:
                continue
            if not (running or (order.state in _RELEASE_STATES and order.release_pending)):
                continue
            attempts, next_attempt = tables.retries.get(order.order_id, (0, None))
            # A saga past its bound does not wait out a backoff (a pending release does).
            expired = running and order.create_time <= expired_before
            if next_attempt is None or next_attempt <= now or expired:
                found.append((order, attempts))
        found.sort(key=lambda pair: pair[0].update_time)
        return found[:limit]

    def claim_attempt(self, order_id: str, seen: int, next_attempt_time: datetime) -> bool:
        retries = self._tables(write=True).retries
        attempts = retries[order_id][0] if order_id in retries else 0
        if (order_id in retries) != (seen > 0) or attempts != seen:
            return False  # another reconciler counted one since `seen` was read
        retries[order_id] = (seen + 1, next_attempt_time)
        return True

    def reset_attempts(self, order_id: str) -> None:
        self._tables(write=True).retries.pop(order_id, None)

    def advance_cursor(self, name: str, sequence: int) -> bool:
        cursors = self._tables(write=True).cursors
        if name not in cursors or cursors[name] >= sequence:
            return False
        cursors[name] = sequence
        return True

    def cursor(self, name: str) -> int:
        return self._tables().cursors.get(name, 0)

    def ensure_cursor(self, name: str) -> None:
        self._tables(write=True).cursors.setdefault(name, 0)


def order_units() -> InMemoryUnits[OrderTables, Session]:
    """Units on empty order tables, with the consumer cursor the composition root ensures at start."""
    return session_units(OrderTables(cursors={PAYMENT_EVENTS_CURSOR: 0}))
