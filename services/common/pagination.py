"""Keyset pagination: page_size (0 = default, capped) and opaque page tokens bound to their filter."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from services.common.errors import Violations

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class PageRequest:
    size: int
    after_key: str | None  # the last key of the previous page, None for the first page


def parse_page(v: Violations, page_size: int, page_token: str, filter_key: str) -> PageRequest:
    """Validate page_size/page_token; a token is only valid with the filter it was made for."""
    size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
    if page_size < 0:
        v.add("page_size", "must not be negative")
    after: str | None = None
    if page_token:
        try:
            decoded = json.loads(base64.urlsafe_b64decode(page_token.encode() + b"=="))
            if not isinstance(decoded, dict) or decoded.get("f") != filter_key:
                raise ValueError("token made for another query")
            after = str(decoded["k"])
        except (ValueError, KeyError, binascii.Error, UnicodeDecodeError):
            v.add("page_token", "invalid or made for a different query")
    return PageRequest(size=size, after_key=after)


def make_page_token(last_key: str, filter_key: str) -> str:
    raw = json.dumps({"k": last_key, "f": filter_key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
