"""Checks shared by every service's request validation."""

from __future__ import annotations

import re

from services.common.errors import Violations
from services.common.ids import is_valid_id

REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")


def check_request_id(v: Violations, value: str, field: str = "request_id") -> None:
    if not value:
        v.add(field, "required: a client-chosen idempotency key")
    elif REQUEST_ID.fullmatch(value) is None:
        v.add(field, "must be 1 to 128 characters of letters, digits, '_', '.', ':' or '-'")


def check_resource_id(v: Violations, value: str, field: str, prefix: str) -> None:
    if not value:
        v.add(field, "required")
    elif not is_valid_id(value, prefix):
        v.add(field, f"malformed: expected an id like {prefix}_01J... ")


def check_text(v: Violations, value: str, field: str, *, max_len: int, required: bool = True) -> None:
    if required and not value.strip():
        v.add(field, "required")
    elif len(value) > max_len:
        v.add(field, f"must be at most {max_len} characters")
