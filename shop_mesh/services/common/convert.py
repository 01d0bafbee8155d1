"""Conversions between wire types (protobuf) and domain values, shared by the servicers."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from shop.common.v1 import money_pb2

from shop_mesh.services.common.money import Money

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> Timestamp:
    # Same result as Timestamp.FromDatetime (naive values are UTC; nanos never negative, as
    # timedelta normalises), at a seventh of its cost: every read maps two timestamps per row.
    delta = (value if value.tzinfo else value.replace(tzinfo=UTC)) - _EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1_000)


def set_timestamp(target: Timestamp, value: datetime) -> None:
    """`timestamp(value)` written into a Timestamp field of a message being built, without a
    separate Timestamp object to copy in (responses are filled in place on the hot reads)."""
    delta = (value if value.tzinfo else value.replace(tzinfo=UTC)) - _EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1_000


def money_to_proto(value: Money) -> money_pb2.Money:
    return money_pb2.Money(currency_code=value.currency_code, units=value.units, nanos=value.nanos)


def money_from_proto(value: money_pb2.Money) -> Money:
    """A wire Money the request rules (shop.common.v1.Money) already accepted."""
    return Money.of(value.currency_code, value.units, value.nanos)
