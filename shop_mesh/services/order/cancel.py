"""CancelOrder: give the money back (void or refund), then record the order CANCELLED, idempotently."""

from __future__ import annotations

from shop_mesh.services.common.errors import Aborted, FailedPrecondition
from shop_mesh.services.common.idempotency import fingerprint, replayed_result
from shop_mesh.services.common.principal import SERVICE, Principal
from shop_mesh.services.order.model import Order, OrderState, Step, allowed, change, order_not_found
from shop_mesh.services.order.ports import PaymentGateway
from shop_mesh.services.order.queries import OrderQueries
from shop_mesh.services.order.saga import release
from shop_mesh.services.order.store import OrderStore, store_change


class _Retry(Exception):
    """Internal: roll the transaction back and try again with fresh state."""


class CancelOrder:
    def __init__(self, store: OrderStore, payments: PaymentGateway, queries: OrderQueries):
        self.store = store
        self.db = store.db
        self.repo = store.repo
        self.idempotency = store.idempotency
        self.payments = payments
        self.queries = queries

    async def cancel_order(
        self, request_id: str, order_id: str, reason: str, *, principal: Principal = SERVICE
    ) -> Order:
        print_ = fingerprint({"order_id": order_id, "reason": reason})
        for _ in range(5):
            async with self.db.read() as session:
                repo = self.repo(session)
                prior = await repo.idempotent_result("CancelOrder", request_id)
                order = await repo.get(order_id)
            if order is None or not principal.owns(order.user_id):
                raise order_not_found(order_id)
            if prior is not None:
                return await self.queries.get_order(replayed_result("CancelOrder", request_id, print_, prior))
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
                return await self._commit_cancel(order, request_id, print_, reason)
            except _Retry:
                continue  # the saga moved the order meanwhile; release what it holds now
        raise Aborted("the order kept changing while cancelling; retry", reason="ORDER_CHANGED")

    async def _commit_cancel(self, order: Order, request_id: str, print_: str, reason: str) -> Order:
        update = change(order, Step.CANCELLED, reason=reason)
        now = self.store.clock()
        async with self.db.transaction() as session:
            repo = self.repo(session)
            stored = await self.idempotency.claim(session, "CancelOrder", request_id, print_)
            if stored is not None:
                current = await repo.get(stored)
                assert current is not None
                return current
            updated = await store_change(repo, order, update, now)
            changed = updated is not None
            current = updated if updated is not None else await repo.get(order.order_id)
            assert current is not None
            if not changed and current.state is not OrderState.CANCELLED:
                raise _Retry
            # Also when a racing driver recorded the cancellation first (it saw our void): the
            # order is cancelled, as asked, so this request succeeded.
            await self.idempotency.complete(session, "CancelOrder", request_id, order.order_id)
            if changed:
                await repo.add_event(current, await self.store.sequences.next(session), now)
        if changed:
            self.store.events.notify()
        return current
