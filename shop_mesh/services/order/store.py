"""What every order use case shares: the storage ports, the clock, the event log they notify after
a commit, and the one way a state change is stored (`record`, through the model's TRANSITIONS)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from shop_mesh.services.common.event_hub import EventHub
from shop_mesh.services.common.idempotency import IdempotentCommands
from shop_mesh.services.common.unit_of_work import IdempotencyKeys, SequenceNumbers, Session, UnitOfWork
from shop_mesh.services.order.model import Order, OrderEvent, Step, change, order_not_found
from shop_mesh.services.order.ports import RepositoryFactory

# Orders whose immutable fields the event reader keeps, so that an event does not re-read them.
KNOWN_ORDERS_KEPT = 10_000

Clock = Callable[[], datetime]


class OrderStore:
    def __init__(
        self,
        db: UnitOfWork[Session],
        repository: RepositoryFactory,
        idempotency: IdempotencyKeys,
        sequences: SequenceNumbers,
        *,
        poll_interval: float = 0.2,
        clock: Clock = lambda: datetime.now(UTC),
    ):
        self.db = db
        self.repo = repository
        self.idempotency = idempotency
        self.commands = IdempotentCommands(db, idempotency)
        self.sequences = sequences
        self.clock = clock
        # The process's one reader of the order event log; WatchOrder streams are served from it.
        # Its loop (`events.run`) is started by the composition root.
        self.events: EventHub[OrderEvent] = EventHub(
            self._all_events_after, self._max_event_sequence, lambda e: e.sequence, poll_interval
        )
        # Orders the event reader has seen (or this process created), so that reading an event
        # does not re-read its order and items: the fields an event takes from them never change.
        self.known_orders: dict[str, Order] = {}

    async def _all_events_after(self, after_sequence: int, limit: int) -> list[OrderEvent]:
        known = self.known_orders
        events = await self.db.read(
            lambda session: self.repo(session).all_events_after(after_sequence, limit, known)
        )
        self._forget_oldest()
        return events

    def remember(self, order: Order) -> None:
        """An order this process created, for the event reader (which idles while nobody watches)."""
        self.known_orders[order.order_id] = order
        self._forget_oldest()

    def _forget_oldest(self) -> None:
        known = self.known_orders
        for _ in range(len(known) - KNOWN_ORDERS_KEPT):
            del known[next(iter(known))]  # the oldest first (dicts keep insertion order)

    async def _max_event_sequence(self) -> int:
        return await self.db.read(lambda session: self.repo(session).max_event_sequence())

    async def record(
        self, order: Order, step: Step, *, reason: str | None = None, payment_id: str | None = None
    ) -> Order:
        """Store one step with its event; if another driver moved the order first (the guard
        refused), return the order as that driver left it."""
        update = change(order, step, reason=reason, payment_id=payment_id)
        now = self.clock()

        def unit(session: Session) -> tuple[Order, bool]:
            repo = self.repo(session)
            updated = repo.transition_to(order, update, now)
            if updated is not None:
                repo.add_event(updated, self.sequences.next(session), now)
                return updated, True
            found = repo.get(order.order_id)
            if found is None:  # pragma: no cover - orders are never deleted
                raise order_not_found(order.order_id)
            return found, False

        current, changed = await self.db.write(unit)
        if changed:
            self.events.notify()
        return current
