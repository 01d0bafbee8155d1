"""Keyset pagination: page_size (0 = default, capped) and opaque page tokens bound to their filter.

A page token is `base64url(version | HMAC-SHA256(secret, filter, last key)[:16] | last key)`: flat
(nothing to parse but a byte string, so no input can nest or recurse), tamper-evident (a flipped bit,
a truncation or a token made for another filter fails the MAC) and stateless (any replica, and the
same process after a restart, accepts it as long as they share PAGE_TOKEN_SECRET).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from shop_mesh.services.common.errors import Violations
from shop_mesh.services.common.ids import is_valid_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Longer than any token we make (keys are ids of at most a few dozen characters): refused unread.
MAX_PAGE_TOKEN_CHARS = 512

_VERSION = 1
_MAC_BYTES = 16
# Without PAGE_TOKEN_SECRET every process derives the same key, so tokens still work across restarts
# and replicas. A forger who knows it can only start a page at a key of their choosing within the
# filter of their own request (access is checked on the request, not the token); deployments set
# the secret anyway (docs/runtime-contract.md).
_DEV_KEY = hashlib.sha256(b"shop-mesh page tokens: development default; set PAGE_TOKEN_SECRET").digest()
_key = _DEV_KEY
_INVALID = "invalid or made for a different query"


def configure_page_tokens(secret: str) -> None:
    """Set the process's signing secret (the service host does, from PAGE_TOKEN_SECRET); "" = dev key."""
    global _key
    _key = hashlib.sha256(secret.encode()).digest() if secret else _DEV_KEY


T = TypeVar("T")


@dataclass(frozen=True)
class PageRequest:
    size: int
    after_key: str | None  # the last key of the previous page, None for the first page

    @property
    def fetch_size(self) -> int:
        """Rows a repository fetches after `after_key`: one more than the page, to know if more follow."""
        return self.size + 1


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a List use case, whatever it lists."""

    items: Sequence[T]
    next_key: str | None  # the last key of this page when another may follow


def page_of(rows: Sequence[T], request: PageRequest, key: Callable[[T], str]) -> Page[T]:
    """The paging rule: `rows` were fetched with `request.fetch_size` after its key, in key order."""
    items = rows[: request.size]
    more = len(rows) > request.size and bool(items)
    return Page(items, key(items[-1]) if more else None)


def next_page_token(page: Page[T], filter_key: str) -> str:
    """The response's next_page_token: "" on the last page."""
    return "" if page.next_key is None else make_page_token(page.next_key, filter_key)


def _mac(last_key: bytes, filter_key: str) -> bytes:
    f = filter_key.encode()
    # Length-prefixed: no (filter, key) pair can be re-split into another one with the same MAC.
    message = struct.pack(">BI", _VERSION, len(f)) + f + last_key
    return hmac.new(_key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _decode(page_token: str, filter_key: str) -> str | None:
    """The token's last key, or None if it is not a token we made for this filter."""
    if len(page_token) > MAX_PAGE_TOKEN_CHARS:
        return None
    try:
        raw = base64.b64decode(page_token + "=" * (-len(page_token) % 4), altchars=b"-_", validate=True)
        if len(raw) <= 1 + _MAC_BYTES or raw[0] != _VERSION:
            return None
        mac, key = raw[1 : 1 + _MAC_BYTES], raw[1 + _MAC_BYTES :]
        if not hmac.compare_digest(mac, _mac(key, filter_key)):
            return None
        return key.decode()
    except (ValueError, binascii.Error):  # not ASCII, not base64, not UTF-8
        return None


def parse_page(v: Violations, page_size: int, page_token: str, filter_key: str) -> PageRequest:
    """Validate page_size/page_token; a token is only valid with the filter it was made for."""
    size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
    if page_size < 0:
        v.add("page_size", "must not be negative")
    after: str | None = None
    if page_token:
        after = _decode(page_token, filter_key)
        if after is None:
            v.add("page_token", _INVALID)
    return PageRequest(size=size, after_key=after)


def page_request(page_size: int, page_token: str, filter_key: str, *, id_prefix: str = "") -> PageRequest:
    """A List request's page, or InvalidArgument. With `id_prefix`, the token's key must also be an
    id of that kind."""
    v = Violations()
    page = parse_page(v, page_size, page_token, filter_key)
    if id_prefix and page.after_key is not None and not is_valid_id(page.after_key, id_prefix):
        v.add("page_token", _INVALID)
    v.raise_if_any()
    return page


def make_page_token(last_key: str, filter_key: str) -> str:
    key = last_key.encode()
    raw = bytes([_VERSION]) + _mac(key, filter_key) + key
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
