"""Money, ids, pagination and request validation: the rules every service shares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.convert import timestamp
from services.common.errors import InvalidArgument, Violations
from services.common.ids import is_valid_id, new_id
from services.common.money import Money, validate_money
from services.common.pagination import MAX_PAGE_SIZE, make_page_token, parse_page
from services.common.validation import check_request_id


def test_money_is_exact_and_keeps_sign_rule() -> None:
    price = Money.of("EUR", 12, 500_000_000)
    assert price.times(3) == Money.of("EUR", 37, 500_000_000)
    negative = Money.zero("EUR") - price
    assert (negative.units, negative.nanos) == (-12, -500_000_000)
    assert str(price) == "12.5 EUR"
    with pytest.raises(ValueError, match="currency mismatch"):
        _ = price + Money.of("USD", 1)


@pytest.mark.parametrize(
    ("currency", "units", "nanos", "field"),
    [
        ("", 1, 0, "amount.currency_code"),
        ("eur", 1, 0, "amount.currency_code"),
        ("XYZ", 1, 0, "amount.currency_code"),
        ("EUR", 1, 1_000_000_000, "amount.nanos"),
        ("EUR", 1, -5, "amount.nanos"),
        ("EUR", 0, 0, "amount"),
        ("EUR", -3, 0, "amount"),
    ],
)
def test_invalid_money_names_the_field(currency: str, units: int, nanos: int, field: str) -> None:
    v = Violations()
    assert validate_money(v, "amount", currency, units, nanos) is None
    assert field in {item.field for item in v.items}


def test_ids_are_prefixed_ulids_in_creation_order() -> None:
    first, second = new_id("ord"), new_id("ord")
    assert is_valid_id(first, "ord") and not is_valid_id(first, "usr")
    assert not is_valid_id("ord_not-a-ulid", "ord")
    assert first[:14] <= second[:14]  # the millisecond timestamp prefix never goes backwards


def test_page_size_defaults_caps_and_rejects_negative() -> None:
    v = Violations()
    assert parse_page(v, 0, "", "f").size == 50
    assert parse_page(v, 10_000, "", "f").size == MAX_PAGE_SIZE
    assert not v
    parse_page(v, -1, "", "f")
    assert [i.field for i in v.items] == ["page_size"]


def test_page_token_round_trips_and_is_bound_to_its_filter() -> None:
    token = make_page_token("usr_01", "state=1")
    v = Violations()
    assert parse_page(v, 5, token, "state=1").after_key == "usr_01"
    parse_page(v, 5, token, "state=2")
    parse_page(v, 5, "!!garbage", "state=1")
    assert [i.field for i in v.items] == ["page_token", "page_token"]


@pytest.mark.parametrize("value", ["", "has space", "x" * 129, "-leading-dash"])
def test_bad_request_ids_are_rejected(value: str) -> None:
    v = Violations()
    check_request_id(v, value)
    with pytest.raises(InvalidArgument) as err:
        v.raise_if_any()
    assert err.value.violations[0].field == "request_id"


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 23, 20, 1, 2, 345678, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch: nanos stay >= 0
        datetime(1960, 5, 3, 1, 2, 3, tzinfo=UTC),
        datetime(2026, 11, 23, 21, 0, 0, tzinfo=timezone(timedelta(hours=1))),  # another zone
        datetime(2026, 11, 23, 20, 0, 0),  # naive means UTC
    ],
)
def test_timestamp_matches_protobufs_own_conversion(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    assert timestamp(value) == expected
