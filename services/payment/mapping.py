"""Proto <-> domain for PaymentService, and request validation (violations name proto field paths)."""

from __future__ import annotations

from dataclasses import dataclass

from shop.payment.v1 import payment_pb2

from services.common.convert import money_from_proto, money_to_proto, timestamp
from services.common.errors import Violations
from services.common.money import Money
from services.common.pagination import PageRequest, make_page_token, parse_page
from services.common.validation import check_request_id, check_resource_id, check_text
from services.payment.domain import (
    AuthorizeCommand,
    Page,
    Payment,
    PaymentEvent,
    PaymentEventType,
    PaymentState,
    RefundCommand,
)

# Amounts are stored as int64 nano-units; this keeps every sum well inside that range.
MAX_PAYMENT_UNITS = 1_000_000_000
MAX_TOKEN_LENGTH = 128
MAX_REASON_LENGTH = 512

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


def _amount(v: Violations, field: str, money: Money | None) -> Money | None:
    if money is not None and money.units > MAX_PAYMENT_UNITS:
        v.add(f"{field}.units", f"must be at most {MAX_PAYMENT_UNITS}")
        return None
    return money


def authorize_command(request: payment_pb2.AuthorizePaymentRequest) -> AuthorizeCommand:
    v = Violations()
    check_request_id(v, request.request_id)
    check_resource_id(v, request.order_id, "order_id", "ord")
    amount = _amount(
        v, "amount", money_from_proto(v, "amount", request.amount, present=request.HasField("amount"))
    )
    check_text(v, request.payment_method_token, "payment_method_token", max_len=MAX_TOKEN_LENGTH)
    v.raise_if_any()
    assert amount is not None  # no violations means the amount parsed
    return AuthorizeCommand(
        request_id=request.request_id,
        order_id=request.order_id,
        amount=amount,
        payment_method_token=request.payment_method_token,
    )


def payment_target(
    request: payment_pb2.CapturePaymentRequest | payment_pb2.VoidPaymentRequest,
) -> PaymentTarget:
    v = Violations()
    check_request_id(v, request.request_id)
    check_resource_id(v, request.payment_id, "payment_id", "pay")
    v.raise_if_any()
    return PaymentTarget(request_id=request.request_id, payment_id=request.payment_id)


def refund_command(request: payment_pb2.RefundPaymentRequest) -> RefundCommand:
    v = Violations()
    check_request_id(v, request.request_id)
    check_resource_id(v, request.payment_id, "payment_id", "pay")
    amount: Money | None = None
    if request.HasField("amount"):
        amount = _amount(v, "amount", money_from_proto(v, "amount", request.amount, present=True))
    check_text(v, request.reason, "reason", max_len=MAX_REASON_LENGTH, required=False)
    v.raise_if_any()
    return RefundCommand(
        request_id=request.request_id, payment_id=request.payment_id, amount=amount, reason=request.reason
    )


def payment_id(request: payment_pb2.GetPaymentRequest) -> str:
    v = Violations()
    check_resource_id(v, request.payment_id, "payment_id", "pay")
    v.raise_if_any()
    return request.payment_id


def _optional_order_id(v: Violations, value: str) -> str | None:
    if not value:
        return None
    check_resource_id(v, value, "order_id", "ord")
    return value


def list_query(request: payment_pb2.ListPaymentsRequest) -> ListQuery:
    v = Violations()
    order_id = _optional_order_id(v, request.order_id)
    filter_key = f"order_id={request.order_id}"
    page = parse_page(v, request.page_size, request.page_token, filter_key)
    v.raise_if_any()
    return ListQuery(order_id=order_id, page=page, filter_key=filter_key)


def watch_query(request: payment_pb2.WatchPaymentEventsRequest) -> WatchQuery:
    v = Violations()
    if request.after_sequence < 0:
        v.add("after_sequence", "must not be negative")
    order_id = _optional_order_id(v, request.order_id)
    v.raise_if_any()
    return WatchQuery(after_sequence=request.after_sequence, order_id=order_id)


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


def list_response(page: Page, query: ListQuery) -> payment_pb2.ListPaymentsResponse:
    token = "" if page.last_key is None else make_page_token(page.last_key, query.filter_key)
    return payment_pb2.ListPaymentsResponse(
        payments=[payment_to_proto(p) for p in page.payments], next_page_token=token
    )
