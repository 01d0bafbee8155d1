"""Per-RPC context that outgoing calls inherit: the caller's deadline, x-request-id and principal."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from shop_mesh.services.common.principal import SERVICE, Principal

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


# Who the incoming call acts for (from the identity headers); SERVICE when it carries none.
principal_var: ContextVar[Principal] = ContextVar("principal", default=SERVICE)


def current_principal() -> Principal:
    return principal_var.get()


@contextmanager
def acting_for(principal: Principal) -> Iterator[None]:
    """Outgoing calls inside the block assert `principal` (e.g. order acting for an order's customer,
    also from its reconciler, where no end user called)."""
    token = principal_var.set(principal)
    try:
        yield
    finally:
        principal_var.reset(token)
