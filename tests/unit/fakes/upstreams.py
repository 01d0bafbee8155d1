"""Order's upstreams in memory: the `UserDirectory` and `PaymentGateway` ports as the saga sees them
(the payment service's idempotency by request_id and its state rules), with switches for faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from shop_mesh.services.common.errors import Unavailable
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.order.ports import Payment, PaymentConflict, PaymentEvent, PaymentState, UserStatus


class FakeUsers:
    def __init__(self) -> None:
        self.status: dict[str, UserStatus] = {}
        self.down = False

    async def user_status(self, user_id: str) -> UserStatus | None:
        if self.down:
            raise Unavailable("user service down")
        return self.status.get(user_id)


class FakePayments:
    """Idempotent by request_id like the real service; counts the money movements."""

    def __init__(self) -> None:
        self.by_id: dict[str, Payment] = {}
        self.results: dict[str, Payment] = {}
        self.calls: list[str] = []
        self.authorize_down = False
        self.authorize_gate: asyncio.Event | None = None

    def _set(self, payment: Payment, state: PaymentState) -> Payment:
        updated = Payment(payment.payment_id, payment.order_id, state, payment.decline_reason)
        self.by_id[payment.payment_id] = updated
        return updated

    async def authorize(self, request_id: str, order_id: str, amount: Money, token: str) -> Payment:
        if self.authorize_gate is not None:
            await self.authorize_gate.wait()
        if self.authorize_down:
            raise Unavailable("payment service down")
        if request_id not in self.results:
            self.calls.append("authorize")
            declined = token == "tok_decline"
            payment = Payment(
                new_id("pay"),
                order_id,
                PaymentState.DECLINED if declined else PaymentState.AUTHORIZED,
                "CARD_DECLINED" if declined else "",
            )
            self.by_id[payment.payment_id] = payment
            self.results[request_id] = payment
        return self.by_id[self.results[request_id].payment_id]

    async def _move(
        self, kind: str, request_id: str, payment_id: str, allowed: set[PaymentState], to: PaymentState
    ) -> Payment:
        if request_id in self.results:
            return self.by_id[payment_id]
        payment = self.by_id[payment_id]
        if payment.state not in allowed:
            raise PaymentConflict(f"cannot {kind} a {payment.state.value} payment")
        self.calls.append(kind)
        self.results[request_id] = payment
        return self._set(payment, to)

    async def capture(self, request_id: str, payment_id: str) -> Payment:
        return await self._move(
            "capture", request_id, payment_id, {PaymentState.AUTHORIZED}, PaymentState.CAPTURED
        )

    async def void(self, request_id: str, payment_id: str) -> Payment:
        return await self._move(
            "void", request_id, payment_id, {PaymentState.AUTHORIZED}, PaymentState.VOIDED
        )

    async def refund(self, request_id: str, payment_id: str, reason: str) -> Payment:
        allowed = {PaymentState.CAPTURED, PaymentState.SETTLED}
        return await self._move("refund", request_id, payment_id, allowed, PaymentState.REFUNDED)

    async def get(self, payment_id: str) -> Payment:
        return self.by_id[payment_id]

    async def payments_of_order(self, order_id: str) -> list[Payment]:
        return [p for p in self.by_id.values() if p.order_id == order_id]

    async def events(
        self, after_sequence: int, stopping: asyncio.Event
    ) -> AsyncGenerator[PaymentEvent, None]:
        await stopping.wait()
        for _ in ():
            yield _
