"""The states of a payment as payment.proto names them: the payment service's state machine runs on
them and order's saga reads them from its answers, so both share this one definition."""

from __future__ import annotations

from enum import Enum


class PaymentState(Enum):
    AUTHORIZED = "AUTHORIZED"
    DECLINED = "DECLINED"
    CAPTURED = "CAPTURED"
    SETTLED = "SETTLED"
    VOIDED = "VOIDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"
