"""Request rules (payment.proto, checked by shop_mesh.services.common.validation; violations name proto field
paths) and proto conversion, without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from shop.common.v1 import money_pb2
from shop.payment.v1 import payment_pb2

from shop_mesh.services.common.errors import InvalidArgument
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, make_page_token
from shop_mesh.services.common.validation import MONEY_MAX_UNITS, check_request
from shop_mesh.services.payment import mapping
from shop_mesh.services.payment.domain import (
    AuthorizeCommand,
    PaymentEvent,
    PaymentEventType,
    PaymentState,
    capture,
    decide_authorization,
)

ORDER = "ord_01JC" + "0" * 22
PAY = "pay_01JC" + "0" * 22
NOW = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)


def _violations(call: object) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        call()  # type: ignore[operator]
    return {v.field: v.description for v in caught.value.violations}


def test_authorize_command_from_valid_request() -> None:
    command = mapping.authorize_command(
        payment_pb2.AuthorizePaymentRequest(
            request_id=f"{ORDER}:authorize",
            order_id=ORDER,
            amount=money_pb2.Money(currency_code="CHF", units=3, nanos=250_000_000),
            payment_method_token="tok_x",
        )
    )
    assert command == AuthorizeCommand(f"{ORDER}:authorize", ORDER, Money.of("CHF", 3, 250_000_000), "tok_x")


def test_authorize_reports_every_bad_field() -> None:
    request = payment_pb2.AuthorizePaymentRequest(
        request_id="bad id",
        order_id="pay_x",
        amount=money_pb2.Money(currency_code="XXX", units=1, nanos=-5),
        payment_method_token="t" * 129,
    )
    assert set(_violations(lambda: check_request(request))) == {
        "request_id",
        "order_id",
        "amount.currency_code",
        "amount.nanos",  # units and nanos of different signs
        "payment_method_token",
    }


def test_amount_bounds() -> None:
    def with_amount(units: int) -> payment_pb2.AuthorizePaymentRequest:
        return payment_pb2.AuthorizePaymentRequest(
            request_id="r",
            order_id=ORDER,
            amount=money_pb2.Money(currency_code="EUR", units=units),
            payment_method_token="t",
        )

    assert set(_violations(lambda: check_request(with_amount(0)))) == {"amount"}
    assert set(_violations(lambda: check_request(with_amount(MONEY_MAX_UNITS + 1)))) == {"amount.units"}
    check_request(with_amount(MONEY_MAX_UNITS))
    assert mapping.authorize_command(with_amount(MONEY_MAX_UNITS)).amount.units == MONEY_MAX_UNITS


def test_refund_amount_is_optional_but_checked_when_set() -> None:
    bare = mapping.refund_command(payment_pb2.RefundPaymentRequest(request_id="r", payment_id=PAY))
    assert bare.amount is None
    bad = payment_pb2.RefundPaymentRequest(
        request_id="r", payment_id=PAY, amount=money_pb2.Money(currency_code="EUR"), reason="x" * 501
    )
    assert set(_violations(lambda: check_request(bad))) == {"amount", "reason"}


def test_list_query_paging_and_filter() -> None:
    query = mapping.list_query(payment_pb2.ListPaymentsRequest())
    assert (query.order_id, query.page.size, query.page.after_key) == (None, DEFAULT_PAGE_SIZE, None)
    capped = mapping.list_query(payment_pb2.ListPaymentsRequest(page_size=10_000, order_id=ORDER))
    assert (capped.order_id, capped.page.size) == (ORDER, MAX_PAGE_SIZE)
    token = make_page_token(PAY, capped.filter_key)
    resumed = mapping.list_query(payment_pb2.ListPaymentsRequest(page_token=token, order_id=ORDER))
    assert resumed.page.after_key == PAY
    assert set(
        _violations(lambda: mapping.list_query(payment_pb2.ListPaymentsRequest(page_token=token)))
    ) == {"page_token"}
    assert set(_violations(lambda: check_request(payment_pb2.ListPaymentsRequest(page_size=-1)))) == {
        "page_size"
    }


def test_watch_query() -> None:
    assert mapping.watch_query(payment_pb2.WatchPaymentEventsRequest(after_sequence=7)).after_sequence == 7
    bad = payment_pb2.WatchPaymentEventsRequest(after_sequence=-1, order_id="ord_1")
    assert set(_violations(lambda: check_request(bad))) == {"after_sequence", "order_id"}


def test_event_to_proto() -> None:
    authorized, _ = decide_authorization(
        AuthorizeCommand("r", ORDER, Money.of("EUR", 12, 5), "tok"), 10_000, NOW, PAY
    )
    event = PaymentEvent(
        sequence=42, type=PaymentEventType.CAPTURED, payment=capture(authorized, NOW), create_time=NOW
    )
    proto = mapping.event_to_proto(event)
    assert (proto.sequence, proto.type, proto.payment_id, proto.order_id) == (
        42,
        payment_pb2.PAYMENT_EVENT_TYPE_CAPTURED,
        PAY,
        ORDER,
    )
    assert proto.payment.state == payment_pb2.PAYMENT_STATE_CAPTURED
    assert proto.payment.captured_amount == money_pb2.Money(currency_code="EUR", units=12, nanos=5)
    assert proto.payment.refunded_amount == money_pb2.Money(currency_code="EUR")
    assert proto.create_time.ToDatetime(tzinfo=UTC) == NOW


def test_every_domain_enum_has_a_proto_value() -> None:
    assert set(mapping._STATES) == set(PaymentState)
    assert set(mapping._EVENT_TYPES) == set(PaymentEventType)
