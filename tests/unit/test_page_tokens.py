"""Page tokens are opaque and tamper-evident: every forgery is a page_token violation, never a crash."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import pytest

from shop_mesh.services.common.config import ServiceSettings
from shop_mesh.services.common.errors import Violations
from shop_mesh.services.common.pagination import configure_page_tokens, make_page_token, parse_page

FILTER = "user_id=usr_01"


@pytest.fixture(autouse=True)
def _dev_key() -> Iterator[None]:
    configure_page_tokens("")
    yield
    configure_page_tokens("")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _flip(token: str, bit: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[bit // 8] ^= 1 << (bit % 8)
    return _b64(bytes(raw))


def _rejected(token: str, filter_key: str = FILTER) -> bool:
    v = Violations()
    page = parse_page(v, 10, token, filter_key)
    fields = [i.field for i in v.items]
    assert fields in ([], ["page_token"])
    # Nothing of the token is echoed back.
    assert all(token[:8] not in i.description for i in v.items if len(token) >= 8)
    return bool(fields) and page.after_key is None


def test_round_trip_and_filter_binding() -> None:
    token = make_page_token("ord_01JD3", FILTER)
    v = Violations()
    assert parse_page(v, 10, token, FILTER).after_key == "ord_01JD3"
    assert not v
    assert _rejected(token, "user_id=usr_02")
    assert _rejected(token, "")


def test_every_bit_flip_is_detected() -> None:
    token = make_page_token("pay_01JD3ABCDEF", FILTER)
    bits = len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) * 8
    assert all(_rejected(_flip(token, bit)) for bit in range(bits))


def test_every_truncation_is_detected() -> None:
    token = make_page_token("usr_01JD3ABCDEF", FILTER)
    assert all(_rejected(token[:n]) for n in range(1, len(token)))


@pytest.mark.parametrize(
    "token",
    [
        _b64(b"[" * 1000),  # the nesting bomb that used to be INTERNAL
        _b64(json.dumps({"k": "usr_01", "f": FILTER}).encode()),  # the old unsigned format
        "!!garbage",
        "ümlaut",
        "a" * 100_000,
        "====",
        _b64(bytes([1]) + b"\x00" * 16 + b"usr_01"),  # right shape, wrong MAC
        _b64(bytes([2]) + b"\x00" * 40),  # unknown version
    ],
)
def test_forgeries_are_invalid_argument(token: str) -> None:
    assert _rejected(token)


def test_random_bytes_are_rejected() -> None:
    for _ in range(500):
        assert _rejected(_b64(os.urandom(1 + os.urandom(1)[0] % 64)))


def test_tokens_survive_a_restart_with_the_same_secret_only() -> None:
    configure_page_tokens("s3cret")
    token = make_page_token("usr_01", FILTER)
    configure_page_tokens("s3cret")  # a restart, or another replica with the same secret
    assert not _rejected(token)
    configure_page_tokens("another")
    assert _rejected(token)


def test_the_secret_comes_from_page_token_secret_and_is_never_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGE_TOKEN_SECRET", "from-the-environment")
    settings = ServiceSettings(service_name="probe")
    assert settings.page_token_secret.get_secret_value() == "from-the-environment"
    assert "from-the-environment" not in repr(settings)
