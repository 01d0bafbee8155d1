"""Reading orders: GetOrder, ListOrders and the WatchOrder stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from shop_mesh.services.common.errors import NotFound, StreamShutdown
from shop_mesh.services.common.pagination import Page, PageRequest, page_of
from shop_mesh.services.common.principal import SERVICE, Principal
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import Order, OrderEvent, order_not_found
from shop_mesh.services.order.store import OrderStore

# Events per catch-up query of one WatchOrder stream.
WATCH_BATCH = 100


class OrderQueries:
    def __init__(self, store: OrderStore):
        self.db = store.db
        self.repo = store.repo
        self.events = store.events

    async def get_order(self, order_id: str, *, principal: Principal = SERVICE) -> Order:
        order = await self.db.read(lambda session: self.repo(session).get(order_id))
        # Another customer's order looks exactly like a missing one: ids cannot be probed.
        if order is None or not principal.owns(order.user_id):
            raise order_not_found(order_id)
        return order

    async def list_orders(
        self, user_id: str | None, page: PageRequest, *, principal: Principal = SERVICE
    ) -> Page[Order]:
        """One page ordered by id. A customer lists only their own orders (no user_id means theirs;
        another user's id is NOT_FOUND, whether that user exists or not)."""
        if not principal.privileged:
            if user_id is not None and user_id != principal.user_id:
                raise NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND")
            user_id = principal.user_id
        owner = user_id
        rows = await self.db.read(
            lambda session: self.repo(session).page(owner, page.after_key, page.fetch_size)
        )
        return page_of(rows, page, _order_id)

    async def watch_order(
        self, order_id: str, after_sequence: int, stopping: asyncio.Event, *, principal: Principal = SERVICE
    ) -> AsyncIterator[OrderEvent]:
        """Events after the cursor, then live ones; ends after a terminal event.

        Raises StreamShutdown if the server stops first, so the client resumes.
        """

        def read(session: Session) -> tuple[Order, int]:
            repo = self.repo(session)
            order = repo.get(order_id)
            if order is None or not principal.owns(order.user_id):
                raise order_not_found(order_id)
            return order, repo.last_event_sequence(order_id)

        order, last = await self.db.read(read)
        if order.state.terminal and last <= after_sequence:
            return

        async def fetch(cursor: int) -> list[OrderEvent]:
            return await self.db.read(
                lambda session: self.repo(session).events_after(order_id, cursor, WATCH_BATCH)
            )

        async for event in self.events.subscribe(
            after_sequence, lambda e: e.order_id == order_id, fetch, WATCH_BATCH, stopping
        ):
            yield event
            if event.state.terminal:
                return
        raise StreamShutdown()


def _order_id(order: Order) -> str:
    return order.order_id
