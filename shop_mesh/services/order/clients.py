"""Adapters of the saga's ports onto UserService and PaymentService over gRPC.

Unary calls go through shop_mesh.services.common.channels.unary_call (deadline, x-request-id, identity
and traceparent propagate there); retries, TLS and discovery are the mesh's job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.services.common.channels import unary_call
from shop_mesh.services.common.convert import money_to_proto
from shop_mesh.services.common.errors import DomainError, NotFound, Unavailable
from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.money import Money
from shop_mesh.services.order.ports import (
    Payment,
    PaymentConflict,
    PaymentEvent,
    PaymentState,
    UpstreamRefused,
    UserStatus,
)

log = get_logger("order")

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
# The upstream failed without saying no (a bug, or grpc-core reporting a broken stream as INTERNAL):
# the outcome is unknown, so the saga may not end on it; retried like a transient fault, within the
# reconciler's bound.
_OUTCOME_UNKNOWN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})

_PAYMENT_SERVICE = "shop.payment.v1.PaymentService"

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
    """Transient or unknown outcome -> Unavailable (retry); any other answer is a refusal the saga
    acts on (docs/decisions.md). Never a bare DomainError: that would reach the client as INTERNAL."""
    code = exc.code()
    if code in _TRANSIENT:
        return Unavailable(
            f"{service} unavailable ({code.name}); retry with the same request_id",
            reason=f"{service.upper()}_UNAVAILABLE",
        )
    # Upstream details may quote user input: logged (bounded), not passed on.
    details = (exc.details() or "")[:200]
    if code in _OUTCOME_UNKNOWN:
        log.warning("upstream_failed", service=service, code=code.name, details=details)
        return Unavailable(
            f"{service} failed ({code.name}); retry with the same request_id",
            reason=f"{service.upper()}_ERROR",
        )
    log.info("upstream_refused", service=service, code=code.name, details=details)
    if code == grpc.StatusCode.FAILED_PRECONDITION and service == "payment_service":
        return PaymentConflict(details)
    return UpstreamRefused(service, code.name)


class GrpcUserDirectory:
    def __init__(self, channel: grpc.aio.Channel, timeout: float):
        self.stub = user_pb2_grpc.UserServiceStub(channel)
        self.timeout = timeout

    async def user_status(self, user_id: str) -> UserStatus | None:
        try:
            reply = await unary_call(
                self.stub.GetUser,
                user_pb2.GetUserRequest(user_id=user_id),
                name="shop.user.v1.UserService/GetUser",
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _upstream_error("user_service", exc) from None
        return UserStatus.ACTIVE if reply.user.state == user_pb2.USER_STATE_ACTIVE else UserStatus.INACTIVE


def _payment(p: payment_pb2.Payment) -> Payment:
    state = _PAYMENT_STATES.get(p.state)
    if state is None:  # a newer payment-service than this order-service knows
        raise UpstreamRefused("payment_service", f"UNKNOWN_PAYMENT_STATE_{int(p.state)}")
    return Payment(p.payment_id, p.order_id, state, p.decline_reason)


class GrpcPaymentGateway:
    def __init__(self, channel: grpc.aio.Channel, timeout: float):
        self.stub = payment_pb2_grpc.PaymentServiceStub(channel)
        self.timeout = timeout

    async def _call(self, name: str, request: Any) -> Payment:
        """One PaymentService call with the default deadline; failures become domain errors."""
        try:
            reply = await unary_call(
                getattr(self.stub, name), request, name=f"{_PAYMENT_SERVICE}/{name}", timeout=self.timeout
            )
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
        return await self._call("AuthorizePayment", request)

    async def capture(self, request_id: str, payment_id: str) -> Payment:
        request = payment_pb2.CapturePaymentRequest(request_id=request_id, payment_id=payment_id)
        return await self._call("CapturePayment", request)

    async def void(self, request_id: str, payment_id: str) -> Payment:
        request = payment_pb2.VoidPaymentRequest(request_id=request_id, payment_id=payment_id)
        return await self._call("VoidPayment", request)

    async def refund(self, request_id: str, payment_id: str, reason: str) -> Payment:
        # No amount: "everything not yet refunded".
        request = payment_pb2.RefundPaymentRequest(
            request_id=request_id, payment_id=payment_id, reason=reason
        )
        return await self._call("RefundPayment", request)

    async def get(self, payment_id: str) -> Payment:
        try:
            reply = await unary_call(
                self.stub.GetPayment,
                payment_pb2.GetPaymentRequest(payment_id=payment_id),
                name=f"{_PAYMENT_SERVICE}/GetPayment",
                timeout=self.timeout,
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
                reply = await unary_call(
                    self.stub.ListPayments,
                    payment_pb2.ListPaymentsRequest(order_id=order_id, page_size=100, page_token=token),
                    name=f"{_PAYMENT_SERVICE}/ListPayments",
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
