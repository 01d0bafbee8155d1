"""The reconciler: finishes, undoes or gives up sagas nobody drives any more (their driver died, an
upstream was down), within a bound. Its loop (`run`) is started by the composition root."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from shop_mesh.services.common.errors import DomainError
from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.order.model import Order, OrderState
from shop_mesh.services.order.saga import OrderSaga

log = get_logger("order")


@dataclass(frozen=True)
class SagaBound:
    """How long the reconciler keeps trying (docs/decisions.md): an order still not final after
    `max_attempts` reconciler attempts or `max_age` since it was created is compensated and REJECTED
    (SAGA_TIMEOUT); for AWAITING_SETTLEMENT an attempt is a look at the payment (SETTLED -> PAID).
    Attempts back off exponentially from `backoff` up to `max_backoff`. A release (void/refund)
    still pending on a final order gets `max_attempts` attempts of its own, then is given up with
    an error log for an operator. Sagas untouched for `stuck_after` are the reconciler's."""

    max_attempts: int = 10
    max_age: timedelta = timedelta(minutes=5)
    backoff: timedelta = timedelta(seconds=5)
    max_backoff: timedelta = timedelta(minutes=1)
    stuck_after: timedelta = timedelta(seconds=30)

    def next_attempt(self, now: datetime, attempts: int) -> datetime:
        """When attempt number `attempts + 1` may follow the one starting now."""
        delay: timedelta = min(self.backoff * (2 ** min(attempts, 30)), self.max_backoff)
        return now + delay


class Reconciler:
    def __init__(self, saga: OrderSaga, bound: SagaBound):
        self.saga = saga
        self.store = saga.store
        self.db = saga.store.db
        self.repo = saga.store.repo
        self.bound = bound

    async def reconcile_once(self) -> int:
        """Finish, undo or give up sagas that nobody drives any more, each at most once per backoff
        period and never beyond self.bound. Returns how many orders it looked at."""
        now = self.store.clock()
        bound = self.bound
        stuck = await self.db.read(
            lambda session: self.repo(session).stuck(now - bound.stuck_after, now, now - bound.max_age, 100)
        )
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
                    order = await self.saga.check_settlement(order)
                except DomainError as exc:
                    log.warning("settlement_check_failed", order_id=order.order_id, error=exc.reason)
                if order.state is not OrderState.AWAITING_SETTLEMENT:
                    return
            log.warning("saga_timeout", order_id=order.order_id, state=order.state.value, attempts=attempts)
            await self.saga.abandon(order, "SAGA_TIMEOUT")
            return
        if releasing and out_of_attempts:
            # Never loop forever, not even on a refund: an operator takes over from this line.
            log.error("release_abandoned", order_id=order.order_id, attempts=attempts)
            await self.db.write(lambda session: self.repo(session).set_release_done(order.order_id, None))
            return
        # Counted before trying, so a crash mid-attempt still uses up an attempt.
        next_attempt = self.bound.next_attempt(now, attempts)
        claimed = await self.db.write(
            lambda session: self.repo(session).claim_attempt(order.order_id, attempts, next_attempt)
        )
        if not claimed:
            return  # another reconciler (replica) took this attempt
        if releasing:
            await self.saga.release_order_payments(order)
        elif order.state is OrderState.AWAITING_SETTLEMENT:
            await self.saga.check_settlement(order)
        else:
            await self.saga.advance_for_owner(order)

    async def run(self, stopping: asyncio.Event, interval: float) -> None:
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
