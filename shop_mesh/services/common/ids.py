"""Resource ids: a type prefix and a ULID (time-ordered, so ids sort by creation for paging)."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
_RANDOM_BITS = 80


class MonotonicUlid:
    """ULIDs that sort by creation even within one millisecond (the ULID spec's monotonic mode).

    A new millisecond starts from fresh randomness; within the same (or an earlier, if the clock
    stepped back) millisecond the previous value's random part is incremented by one.
    """

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = 0
        self._lock = threading.Lock()

    def new(self) -> str:
        with self._lock:
            now_ms = self._clock_ms()
            if now_ms > self._last >> _RANDOM_BITS:
                value = (now_ms << _RANDOM_BITS) | int.from_bytes(os.urandom(10), "big")
            else:
                value = self._last + 1  # a carry into the time part keeps the order
            self._last = value
        chars = []
        for _ in range(26):
            value, digit = divmod(value, 32)
            chars.append(_CROCKFORD[digit])
        return "".join(reversed(chars))


_generator = MonotonicUlid()


def new_id(prefix: str) -> str:
    return f"{prefix}_{_generator.new()}"


def is_valid_id(value: str, prefix: str) -> bool:
    head, sep, tail = value.partition("_")
    return sep == "_" and head == prefix and _ULID.fullmatch(tail) is not None
