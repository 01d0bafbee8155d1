"""The settlement consumer: reads payment events from the payment service and applies each once, across
restarts and replicas, with its position (cursor) in the payment event log. Its loop (`run`) is started
by the composition root."""

from __future__ import annotations

import asyncio
import contextlib

from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import Step, change
from shop_mesh.services.order.ports import PaymentEvent, PaymentGateway
from shop_mesh.services.order.store import OrderStore

log = get_logger("order")

PAYMENT_EVENTS_CURSOR = "payment-events"
# Payment events that change no order, at most this many between two stores of the cursor.
PAYMENT_CURSOR_SAVE_EVERY = 100


class SettlementConsumer:
    def __init__(self, store: OrderStore, payments: PaymentGateway):
        self.store = store
        self.db = store.db
        self.repo = store.repo
        self.payments = payments
        # The position in the payment event log: seen, and stored.
        self._payment_cursor_seen = self._payment_cursor_saved = 0

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
        now = self.store.clock()

        def apply(session: Session) -> list[Step] | None:
            """None if the event was applied before; else the steps it recorded."""
            repo = self.repo(session)
            # Cursor first: it locks the cursor row, so replicas apply events one at a time.
            if not repo.advance_cursor(PAYMENT_EVENTS_CURSOR, event.sequence):
                return None
            if not event.settled:
                return []
            order = repo.get(event.order_id)
            if order is None or order.payment_id != event.payment_id:
                return []
            # Conditional updates only (no decision on a row read earlier): on PostgreSQL a saga
            # step may commit between our read and our write. If settlement overtook our capture
            # step, the capture evidently happened: record AWAITING_SETTLEMENT first.
            steps = []
            for step in (Step.CAPTURED, Step.SETTLED):
                changed = repo.transition_to(order, change(order, step), now)
                if changed is not None:
                    steps.append(step)
                    repo.add_event(changed, self.store.sequences.next(session), now)
            return steps

        steps = await self.db.write(apply)
        if steps is None:
            return False
        self._payment_cursor_saved = self._payment_cursor_seen = event.sequence
        if steps:
            self.store.events.notify()
        return True

    async def run(self, stopping: asyncio.Event, max_backoff: float = 5.0) -> None:
        backoff = 0.1
        while not stopping.is_set():
            try:
                after = await self.db.read(lambda session: self.repo(session).cursor(PAYMENT_EVENTS_CURSOR))
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
