"""Per-RPC context that outgoing calls inherit: the caller's deadline and x-request-id."""

from __future__ import annotations

import time
from contextvars import ContextVar

REQUEST_ID_HEADER = "x-request-id"

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
# Absolute time.monotonic() by which the incoming call must be answered; None if it has no deadline.
deadline_var: ContextVar[float | None] = ContextVar("deadline", default=None)


def remaining_time() -> float | None:
    """Seconds left of the incoming call's deadline (never negative), or None without a deadline."""
    deadline = deadline_var.get()
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
