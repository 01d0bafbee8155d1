"""The payment state machine: decisions, transitions and the reasons a client sees on conflicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shop_mesh.services.common.errors import FailedPrecondition, InvalidArgument
from shop_mesh.services.common.money import Money
from shop_mesh.services.payment.domain import (
    AuthorizeCommand,
    Payment,
    PaymentEventType,
    PaymentState,
    capture,
    decide_authorization,
    decode_payment,
    encode_payment,
    refund,
    settle,
    void,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
LATER = NOW + timedelta(seconds=5)
ORDER = "ord_01JC" + "0" * 22
PAY = "pay_01JC" + "0" * 22


HUNDRED_EUR = Money.of("EUR", 100)


def _authorized(amount: Money = HUNDRED_EUR) -> Payment:
    payment, _ = decide_authorization(AuthorizeCommand("r", ORDER, amount, "tok_ok"), 10_000, NOW, PAY)
    return payment


def _in_state(state: PaymentState) -> Payment:
    payment = _authorized()
    if state is PaymentState.AUTHORIZED:
        return payment
    if state is PaymentState.DECLINED:
        return decide_authorization(
            AuthorizeCommand("r", ORDER, payment.amount, "tok_decline"), 10, NOW, PAY
        )[0]
    if state is PaymentState.VOIDED:
        return void(payment, NOW)
    payment = capture(payment, NOW)
    if state is PaymentState.SETTLED:
        return settle(payment, NOW)
    if state is PaymentState.PARTIALLY_REFUNDED:
        return refund(payment, Money.of("EUR", 1), NOW)
    if state is PaymentState.REFUNDED:
        return refund(payment, None, NOW)
    return payment


@pytest.mark.parametrize(
    ("token", "amount", "state", "reason", "event"),
    [
        ("tok_ok", Money.of("EUR", 10_000), PaymentState.AUTHORIZED, "", PaymentEventType.AUTHORIZED),
        (
            "tok_ok",
            Money.of("EUR", 10_000, 1),
            PaymentState.DECLINED,
            "AMOUNT_LIMIT_EXCEEDED",
            PaymentEventType.DECLINED,
        ),
        (
            "tok_ok",
            Money.of("JPY", 10_001),
            PaymentState.DECLINED,
            "AMOUNT_LIMIT_EXCEEDED",
            PaymentEventType.DECLINED,
        ),
        (
            "tok_decline",
            Money.of("EUR", 1),
            PaymentState.DECLINED,
            "CARD_DECLINED",
            PaymentEventType.DECLINED,
        ),
        (
            "tok_decline",
            Money.of("EUR", 20_000),
            PaymentState.DECLINED,
            "CARD_DECLINED",
            PaymentEventType.DECLINED,
        ),
    ],
)
def test_authorization_decision(
    token: str, amount: Money, state: PaymentState, reason: str, event: PaymentEventType
) -> None:
    payment, event_type = decide_authorization(AuthorizeCommand("r", ORDER, amount, token), 10_000, NOW, PAY)
    assert (payment.state, payment.decline_reason, event_type) == (state, reason, event)
    assert payment.captured_amount == Money.zero(amount.currency_code)
    assert payment.refunded_amount == Money.zero(amount.currency_code)
    assert payment.create_time == payment.update_time == NOW


def test_capture_takes_the_whole_amount_and_records_when() -> None:
    captured = capture(_authorized(Money.of("USD", 7, 5)), LATER)
    assert captured.state is PaymentState.CAPTURED
    assert captured.captured_amount == Money.of("USD", 7, 5)
    assert captured.capture_time == captured.update_time == LATER
    assert settle(captured, LATER).state is PaymentState.SETTLED


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (PaymentState.DECLINED, "PAYMENT_NOT_AUTHORIZED"),
        (PaymentState.VOIDED, "PAYMENT_NOT_AUTHORIZED"),
        (PaymentState.CAPTURED, "ALREADY_CAPTURED"),
        (PaymentState.SETTLED, "ALREADY_CAPTURED"),
        (PaymentState.PARTIALLY_REFUNDED, "ALREADY_CAPTURED"),
        (PaymentState.REFUNDED, "ALREADY_CAPTURED"),
    ],
)
def test_capture_conflicts(state: PaymentState, reason: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        capture(_in_state(state), NOW)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (PaymentState.VOIDED, "ALREADY_VOIDED"),
        (PaymentState.DECLINED, "PAYMENT_NOT_AUTHORIZED"),
        (PaymentState.CAPTURED, "PAYMENT_NOT_AUTHORIZED"),
        (PaymentState.SETTLED, "PAYMENT_NOT_AUTHORIZED"),
    ],
)
def test_void_only_from_authorized(state: PaymentState, reason: str) -> None:
    assert void(_authorized(), NOW).state is PaymentState.VOIDED
    with pytest.raises(FailedPrecondition) as caught:
        void(_in_state(state), NOW)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (PaymentState.AUTHORIZED, "PAYMENT_NOT_CAPTURED"),
        (PaymentState.DECLINED, "PAYMENT_NOT_CAPTURED"),
        (PaymentState.VOIDED, "PAYMENT_NOT_CAPTURED"),
        (PaymentState.REFUNDED, "ALREADY_REFUNDED"),
    ],
)
def test_refund_conflicts(state: PaymentState, reason: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        refund(_in_state(state), None, NOW)
    assert caught.value.reason == reason


def test_refund_partial_then_remaining_from_settled() -> None:
    settled = _in_state(PaymentState.SETTLED)
    partial = refund(settled, Money.of("EUR", 40, 500_000_000), NOW)
    assert partial.state is PaymentState.PARTIALLY_REFUNDED
    assert partial.refundable == Money.of("EUR", 59, 500_000_000)
    with pytest.raises(FailedPrecondition) as caught:
        refund(partial, Money.of("EUR", 59, 500_000_001), NOW)
    assert caught.value.reason == "REFUND_EXCEEDS_CAPTURED"
    full = refund(partial, Money.of("EUR", 59, 500_000_000), NOW)
    assert full.state is PaymentState.REFUNDED
    assert full.refunded_amount == full.captured_amount


def test_refund_in_another_currency_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        refund(_in_state(PaymentState.CAPTURED), Money.of("USD", 1), NOW)
    assert [v.field for v in caught.value.violations] == ["amount.currency_code"]


def test_stored_form_round_trips() -> None:
    for state in PaymentState:
        payment = _in_state(state)
        assert decode_payment(encode_payment(payment)) == payment
