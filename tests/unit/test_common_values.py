"""Money, ids, pagination and request validation: the rules every service shares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from shop.common.v1 import money_pb2
from shop.user.v1 import user_pb2

from shop_mesh.services.common.convert import set_timestamp, timestamp
from shop_mesh.services.common.errors import QUOTE_LIMIT, FieldViolation, InvalidArgument, Violations, quote
from shop_mesh.services.common.ids import is_valid_id, new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.pagination import MAX_PAGE_SIZE, make_page_token, parse_page
from shop_mesh.services.common.status import domain_error_status
from shop_mesh.services.common.validation import check_request


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
        ("", 1, 0, "currency_code"),
        ("eur", 1, 0, "currency_code"),
        ("XYZ", 1, 0, "currency_code"),
        ("EUR", 1, 1_000_000_000, "nanos"),
        ("EUR", -1, -1_000_000_000, "nanos"),
        ("EUR", 1, -5, "nanos"),  # units and nanos of different signs
        ("EUR", -1, 5, "nanos"),
        ("EUR", 1_000_000_001, 0, "units"),
        ("EUR", -1_000_000_001, 0, "units"),
    ],
)
def test_invalid_money_names_the_field(currency: str, units: int, nanos: int, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_request(money_pb2.Money(currency_code=currency, units=units, nanos=nanos))
    assert [v.field for v in err.value.violations] == [field]


@pytest.mark.parametrize(
    ("units", "nanos"), [(0, 0), (1_000_000_000, 999_999_999), (-1_000_000_000, -999_999_999), (0, -1)]
)
def test_money_bounds_are_inclusive(units: int, nanos: int) -> None:
    check_request(money_pb2.Money(currency_code="JPY", units=units, nanos=nanos))


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


USER = "usr_01JC" + "0" * 22


@pytest.mark.parametrize(
    "value", ["", "has space", "x" * 129, "-leading-dash", "r1\n", "r1\r\n", "\nr1", "r\u00e9", "r1\x00"]
)
def test_bad_request_ids_are_rejected(value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_request(user_pb2.DeleteUserRequest(request_id=value, user_id=USER))
    assert [v.field for v in err.value.violations] == ["request_id"]


@pytest.mark.parametrize("value", ["r", "x" * 128, "ord_01JC:authorize", "a.b-c_d:e"])
def test_good_request_ids_pass(value: str) -> None:
    check_request(user_pb2.DeleteUserRequest(request_id=value, user_id=USER))


@pytest.mark.parametrize(
    "value",
    [
        USER + "\n",
        USER + "\r",
        " " + USER,
        USER[:-1],
        USER + "0",
        USER.lower(),
        "usr_" + "I" * 26,
        "ord" + USER[3:],
    ],
)
def test_ids_match_the_whole_string(value: str) -> None:
    """RE2's `$` does not accept a trailing newline (Python's re.match with `$` did)."""
    with pytest.raises(InvalidArgument) as err:
        check_request(user_pb2.GetUserRequest(user_id=value))
    assert [v.field for v in err.value.violations] == ["user_id"]


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
    filled = user_pb2.User()  # the in-place form the hot reads use, into a message's field
    set_timestamp(filled.create_time, value)
    assert filled.HasField("create_time") and filled.create_time == expected


def test_quote_shows_a_short_prefix_only() -> None:
    assert quote("EUR") == "'EUR'"
    quoted = quote("X" * 100_000)
    assert quoted.startswith("'XXX") and quoted.endswith("…") and len(quoted) <= QUOTE_LIMIT + 3


def test_statuses_stay_small_whatever_the_error_carries() -> None:
    """A status travels in trailers, which clients cap at 8-16 KB: every text in it is bounded."""
    huge = "X" * 100_000
    err = InvalidArgument([FieldViolation(huge, huge) for _ in range(500)])
    err.metadata = {"value": huge}
    status = domain_error_status(err)
    trailers = dict(status.trailing_metadata)
    assert len(status.details) <= 256
    assert len(trailers["grpc-status-details-bin"]) < 8_000
    assert "of 500 violations shown" in status.details
