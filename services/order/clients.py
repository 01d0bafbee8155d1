"""Adapters of the saga's ports onto UserService and PaymentService over gRPC.

Plain calls through services.common.channels (deadline, x-request-id and traceparent propagate
there); retries, TLS and discovery are the mesh's job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from services.common.convert import money_to_proto
from services.common.errors import DomainError, NotFound, Unavailable
from services.common.money import Money
from services.order.domain import Payment, PaymentConflict, PaymentEvent, PaymentState, UserStatus

# What a retry (by the client, the mesh or the reconciler) may fix.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)

_PAYMENT_STATES = {
    payment_pb2.PAYMENT_STATE_AUTHORIZED: PaymentState.AUTHORIZED,
    payment_pb2.PAYMENT_STATE_DECLINED: PaymentState.DECLINED,
    payment_pb2.PAYMENT_STATE_CAPTURED: PaymentState.CAPTURED,
    payment_pb2.PAYMENT_STATE_SETTLED: PaymentState.SETTLED,
    payment_pb2.PAYMENT_STATE_VOIDED: PaymentState.VOIDED,
    payment_pb2.PAYMENT_STATE_PARTIALLY_REFUNDED: PaymentState.PARTIALLY_REFUNDED,
    payment_pb2.PAYMENT_STATE_REFUNDED: PaymentState.REFUNDED,
}


def _upstream_error(service: str, exc: grpc.aio.AioRpcError) -> DomainError:
    code = exc.code()
    if code in _TRANSIENT:
        return Unavailable(
            f"{service} unavailable ({code.name}); retry with the same request_id",
            reason=f"{service.upper()}_UNAVAILABLE",
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return PaymentConflict(f"{service} refused: {exc.details()}")
    # Anything else is a bug between the two services, not the caller's fault.
    return DomainError(f"{service} failed ({code.name})", reason=f"{service.upper()}_ERROR")


class GrpcUserDirectory:
    def __init__(self, channel: grpc.aio.Channel, timeout: float):
        self.stub = user_pb2_grpc.UserServiceStub(channel)
        self.timeout = timeout

    async def user_status(self, user_id: str) -> UserStatus | None:
        try:
            reply = await self.stub.GetUser(user_pb2.GetUserRequest(user_id=user_id), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _upstream_error("user_service", exc) from None
        return UserStatus.ACTIVE if reply.user.state == user_pb2.USER_STATE_ACTIVE else UserStatus.INACTIVE


def _payment(p: payment_pb2.Payment) -> Payment:
    state = _PAYMENT_STATES.get(p.state)
    if state is None:
        raise DomainError(
            f"payment {p.payment_id} in unknown state {p.state}", reason="PAYMENT_SERVICE_ERROR"
        )
    return Payment(p.payment_id, p.order_id, state, p.decline_reason)


class GrpcPaymentGateway:
    def __init__(self, channel: grpc.aio.Channel, timeout: float):
        self.stub = payment_pb2_grpc.PaymentServiceStub(channel)
        self.timeout = timeout

    async def _call(self, method: Any, request: Any) -> Payment:
        """One PaymentService call with the default deadline; failures become domain errors."""
        try:
            reply = await method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _upstream_error("payment_service", exc) from None
        return _payment(reply.payment)

    async def authorize(self, request_id: str, order_id: str, amount: Money, token: str) -> Payment:
        request = payment_pb2.AuthorizePaymentRequest(
            request_id=request_id,
            order_id=order_id,
            amount=money_to_proto(amount),
            payment_method_token=token,
        )
        return await self._call(self.stub.AuthorizePayment, request)

    async def capture(self, request_id: str, payment_id: str) -> Payment:
        request = payment_pb2.CapturePaymentRequest(request_id=request_id, payment_id=payment_id)
        return await self._call(self.stub.CapturePayment, request)

    async def void(self, request_id: str, payment_id: str) -> Payment:
        request = payment_pb2.VoidPaymentRequest(request_id=request_id, payment_id=payment_id)
        return await self._call(self.stub.VoidPayment, request)

    async def refund(self, request_id: str, payment_id: str, reason: str) -> Payment:
        # No amount: "everything not yet refunded".
        request = payment_pb2.RefundPaymentRequest(
            request_id=request_id, payment_id=payment_id, reason=reason
        )
        return await self._call(self.stub.RefundPayment, request)

    async def get(self, payment_id: str) -> Payment:
        try:
            reply = await self.stub.GetPayment(
                payment_pb2.GetPaymentRequest(payment_id=payment_id), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"payment {payment_id} not found", reason="PAYMENT_NOT_FOUND") from None
            raise _upstream_error("payment_service", exc) from None
        return _payment(reply.payment)

    async def payments_of_order(self, order_id: str) -> list[Payment]:
        payments: list[Payment] = []
        token = ""
        while True:
            try:
                reply = await self.stub.ListPayments(
                    payment_pb2.ListPaymentsRequest(order_id=order_id, page_size=100, page_token=token),
                    timeout=self.timeout,
                )
            except grpc.aio.AioRpcError as exc:
                raise _upstream_error("payment_service", exc) from None
            payments.extend(_payment(p) for p in reply.payments)
            token = reply.next_page_token
            if not token:
                return payments

    async def events(
        self, after_sequence: int, stopping: asyncio.Event
    ) -> AsyncGenerator[PaymentEvent, None]:
        # A stream: no deadline; it ends when payment-service drains (UNAVAILABLE) or we stop.
        call = self.stub.WatchPaymentEvents(
            payment_pb2.WatchPaymentEventsRequest(after_sequence=after_sequence)
        )

        async def cancel_on_stop() -> None:
            await stopping.wait()
            call.cancel()

        watcher = asyncio.create_task(cancel_on_stop())
        try:
            async for reply in call:
                e = reply.event
                yield PaymentEvent(
                    e.sequence, e.type == payment_pb2.PAYMENT_EVENT_TYPE_SETTLED, e.payment_id, e.order_id
                )
        except asyncio.CancelledError:
            if not stopping.is_set():
                raise
        except grpc.aio.AioRpcError as exc:
            if stopping.is_set():
                return
            raise _upstream_error("payment_service", exc) from None
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            call.cancel()
