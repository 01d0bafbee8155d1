"""Proto <-> domain for PaymentService. Request rules live in payment.proto
(shop_mesh.services.common.validation)."""

from __future__ import annotations

from dataclasses import dataclass

from shop.payment.v1 import payment_pb2

from shop_mesh.services.common.convert import money_from_proto, money_to_proto, timestamp
from shop_mesh.services.common.pagination import Page, PageRequest, next_page_token, page_request
from shop_mesh.services.payment.domain import (
    AuthorizeCommand,
    Payment,
    PaymentEvent,
    PaymentEventType,
    PaymentState,
    RefundCommand,
)

_STATES = {
    PaymentState.AUTHORIZED: payment_pb2.PAYMENT_STATE_AUTHORIZED,
    PaymentState.DECLINED: payment_pb2.PAYMENT_STATE_DECLINED,
    PaymentState.CAPTURED: payment_pb2.PAYMENT_STATE_CAPTURED,
    PaymentState.SETTLED: payment_pb2.PAYMENT_STATE_SETTLED,
    PaymentState.VOIDED: payment_pb2.PAYMENT_STATE_VOIDED,
    PaymentState.PARTIALLY_REFUNDED: payment_pb2.PAYMENT_STATE_PARTIALLY_REFUNDED,
    PaymentState.REFUNDED: payment_pb2.PAYMENT_STATE_REFUNDED,
}
_EVENT_TYPES = {
    PaymentEventType.AUTHORIZED: payment_pb2.PAYMENT_EVENT_TYPE_AUTHORIZED,
    PaymentEventType.DECLINED: payment_pb2.PAYMENT_EVENT_TYPE_DECLINED,
    PaymentEventType.CAPTURED: payment_pb2.PAYMENT_EVENT_TYPE_CAPTURED,
    PaymentEventType.SETTLED: payment_pb2.PAYMENT_EVENT_TYPE_SETTLED,
    PaymentEventType.VOIDED: payment_pb2.PAYMENT_EVENT_TYPE_VOIDED,
    PaymentEventType.REFUNDED: payment_pb2.PAYMENT_EVENT_TYPE_REFUNDED,
}


@dataclass(frozen=True)
class PaymentTarget:
    """Capture and void: which payment, under which request_id."""

    request_id: str
    payment_id: str


@dataclass(frozen=True)
class ListQuery:
    order_id: str | None
    page: PageRequest
    filter_key: str


@dataclass(frozen=True)
class WatchQuery:
    after_sequence: int
    order_id: str | None


def authorize_command(request: payment_pb2.AuthorizePaymentRequest) -> AuthorizeCommand:
    # The request's rules (payment.proto) were checked before any handler.
    return AuthorizeCommand(
        request_id=request.request_id,
        order_id=request.order_id,
        amount=money_from_proto(request.amount),
        payment_method_token=request.payment_method_token,
    )


def payment_target(
    request: payment_pb2.CapturePaymentRequest | payment_pb2.VoidPaymentRequest,
) -> PaymentTarget:
    return PaymentTarget(request_id=request.request_id, payment_id=request.payment_id)


def refund_command(request: payment_pb2.RefundPaymentRequest) -> RefundCommand:
    amount = money_from_proto(request.amount) if request.HasField("amount") else None
    return RefundCommand(
        request_id=request.request_id, payment_id=request.payment_id, amount=amount, reason=request.reason
    )


def payment_id(request: payment_pb2.GetPaymentRequest) -> str:
    return request.payment_id


def list_query(request: payment_pb2.ListPaymentsRequest) -> ListQuery:
    filter_key = f"order_id={request.order_id}"
    page = page_request(request.page_size, request.page_token, filter_key)
    return ListQuery(order_id=request.order_id or None, page=page, filter_key=filter_key)


def watch_query(request: payment_pb2.WatchPaymentEventsRequest) -> WatchQuery:
    return WatchQuery(after_sequence=request.after_sequence, order_id=request.order_id or None)


def payment_to_proto(payment: Payment) -> payment_pb2.Payment:
    return payment_pb2.Payment(
        payment_id=payment.payment_id,
        order_id=payment.order_id,
        amount=money_to_proto(payment.amount),
        state=_STATES[payment.state],
        decline_reason=payment.decline_reason,
        captured_amount=money_to_proto(payment.captured_amount),
        refunded_amount=money_to_proto(payment.refunded_amount),
        create_time=timestamp(payment.create_time),
        update_time=timestamp(payment.update_time),
    )


def event_to_proto(event: PaymentEvent) -> payment_pb2.PaymentEvent:
    return payment_pb2.PaymentEvent(
        sequence=event.sequence,
        type=_EVENT_TYPES[event.type],
        payment_id=event.payment_id,
        order_id=event.order_id,
        payment=payment_to_proto(event.payment),
        create_time=timestamp(event.create_time),
    )


def list_response(page: Page[Payment], query: ListQuery) -> payment_pb2.ListPaymentsResponse:
    token = next_page_token(page, query.filter_key)
    return payment_pb2.ListPaymentsResponse(
        payments=[payment_to_proto(p) for p in page.items], next_page_token=token
    )
