"""request_id idempotency: the rules, without the storage (which is `idempotency_sql.IdempotencyStore`,
behind the `unit_of_work.IdempotencyKeys` port).

Use inside the write transaction that performs the effect:

    async with units.transaction() as session:
        stored = await keys.claim(session, "CapturePayment", request_id, fingerprint)
        if stored is not None:
            return decode(stored)            # a repeat: the first result, no second effect
        result = ...perform the effect...
        await keys.complete(session, "CapturePayment", request_id, encode(result))

A concurrent duplicate blocks on the key's row (PostgreSQL) or on the write lock (SQLite) until the
first transaction commits, then finds the key and returns the stored result.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from shop_mesh.services.common.errors import AlreadyExists, Unavailable, quote


def fingerprint(payload: Any) -> str:
    """A stable hash of a request's meaningful fields (JSON-able), to detect a reused request_id."""
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def replayed_result(scope: str, request_id: str, print_: str, stored: tuple[str, str | None]) -> str:
    """The first request's result for a repeat of `request_id` whose stored (fingerprint, result) is
    `stored`. Raises AlreadyExists(REQUEST_ID_REUSED) if the payload differs, Unavailable if the first
    request has not completed. Counting the replay is the adapters' business (no metrics here)."""
    stored_print, result = stored
    if stored_print != print_:
        raise AlreadyExists(
            f"request_id {quote(request_id)} was already used for a different {scope} request",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": request_id},
        )
    if result is None:
        # Claimed by a transaction that is still running, or committed without completing (a bug).
        raise Unavailable("the first request with this request_id has not finished; retry")
    return result
