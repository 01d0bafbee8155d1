"""CancelOrder: give the money back (void or refund), then record the order CANCELLED, idempotently."""

from __future__ import annotations

from shop_mesh.services.common.errors import Aborted, FailedPrecondition
from shop_mesh.services.common.idempotency import Codec
from shop_mesh.services.common.principal import SERVICE, Principal
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import Order, OrderState, Step, allowed, change, order_not_found
from shop_mesh.services.order.ports import PaymentGateway
from shop_mesh.services.order.queries import OrderQueries
from shop_mesh.services.order.saga import release
from shop_mesh.services.order.store import OrderStore


class _Retry(Exception):
    """Internal: roll the transaction back and try again with fresh state."""


# CancelOrder stores the order's id: a repeat answers with the order as it is now.
_ORDER_ID: Codec[str] = Codec(str, str)


class CancelOrder:
    def __init__(self, store: OrderStore, payments: PaymentGateway, queries: OrderQueries):
        self.store = store
        self.db = store.db
        self.repo = store.repo
        self.commands = store.commands
        self.payments = payments
        self.queries = queries

    async def cancel_order(
        self, request_id: str, order_id: str, reason: str, *, principal: Principal = SERVICE
    ) -> Order:
        payload = {"order_id": order_id, "reason": reason}
        for _ in range(5):

            def read(session: Session) -> tuple[Order, str | None]:
                order = self.repo(session).get(order_id)
                if order is None or not principal.owns(order.user_id):
                    raise order_not_found(order_id)
                # Known before any money moves: a repeat must not void or refund again.
                return order, self.commands.replayed(session, "CancelOrder", request_id, payload, _ORDER_ID)

            order, prior = await self.db.read(read)
            if prior is not None:
                return await self.queries.get_order(prior)
            if not allowed(order.state, Step.CANCELLED):
                raise FailedPrecondition(
                    f"order {order_id} is {order.state.value} and cannot be cancelled",
                    reason="ORDER_NOT_CANCELLABLE",
                    metadata={"state": order.state.value},
                )
            # Money first, then the record: if we crash in between, the order is still cancellable
            # and a retry (same derived void/refund ids) has no second effect.
            if order.payment_id:
                await release(self.payments, order_id, await self.payments.get(order.payment_id), reason)
            try:
                return await self._commit_cancel(order, request_id, payload)
            except _Retry:
                continue  # the saga moved the order meanwhile; release what it holds now
        raise Aborted("the order kept changing while cancelling; retry", reason="ORDER_CHANGED")

    async def _commit_cancel(self, order: Order, request_id: str, payload: dict[str, str]) -> Order:
        update = change(order, Step.CANCELLED, reason=payload["reason"])
        now = self.store.clock()
        # What the transaction left: the order, and whether this request changed it (so the event).
        outcome: list[tuple[Order, bool]] = []

        def cancel(session: Session) -> str:
            repo = self.repo(session)
            updated = repo.transition_to(order, update, now)
            current = updated if updated is not None else repo.get(order.order_id)
            assert current is not None
            if updated is None and current.state is not OrderState.CANCELLED:
                raise _Retry
            # Also when a racing driver recorded the cancellation first (it saw our void): the
            # order is cancelled, as asked, so this request succeeded.
            outcome.append((current, updated is not None))
            return order.order_id

        def add_event(session: Session, _order_id: str) -> None:
            current, changed = outcome[0]
            if changed:
                self.repo(session).add_event(current, self.store.sequences.next(session), now)

        done = await self.commands.run("CancelOrder", request_id, payload, _ORDER_ID, cancel, last=add_event)
        if done.replayed:  # a concurrent repeat committed first
            return await self.queries.get_order(done.result)
        current, changed = outcome[0]
        if changed:
            self.store.events.notify()
        return current
