"""request_id idempotency, enforced by the database (a primary key), not by an in-memory set.

Use inside the write transaction that performs the effect:

    async with db.transaction() as session:
        stored = await store.claim(session, "CapturePayment", request_id, fingerprint)
        if stored is not None:
            return decode(stored)            # a repeat: the first result, no second effect
        result = ...perform the effect...
        await store.complete(session, "CapturePayment", request_id, encode(result))

A concurrent duplicate blocks on the key's row (PostgreSQL) or on the write lock (SQLite) until the
first transaction commits, then finds the key and returns the stored result.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, Text, bindparam, select, update

from shop_mesh.services.common.db import DbSession, insert_unless_present
from shop_mesh.services.common.errors import AlreadyExists, Unavailable, quote
from shop_mesh.services.common.metrics import IDEMPOTENT_REPLAYS
from shop_mesh.services.common.sqltypes import UtcDateTime


def idempotency_table(metadata: MetaData) -> Table:
    return Table(
        "idempotency_keys",
        metadata,
        Column("scope", String(64), primary_key=True),
        Column("request_id", String(128), primary_key=True),
        Column("fingerprint", String(64), nullable=False),
        Column("result", Text, nullable=True),
        Column("create_time", UtcDateTime(), nullable=False),
    )


def fingerprint(payload: Any) -> str:
    """A stable hash of a request's meaningful fields (JSON-able), to detect a reused request_id."""
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def replayed_result(scope: str, request_id: str, print_: str, stored: tuple[str, str | None]) -> str:
    """The first request's result for a repeat of `request_id` whose stored (fingerprint, result) is
    `stored`. Raises AlreadyExists(REQUEST_ID_REUSED) if the payload differs, Unavailable if the first
    request has not completed."""
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
    IDEMPOTENT_REPLAYS.labels(scope).inc()
    return result


class IdempotencyStore:
    def __init__(self, table: Table):
        self.table = table
        # Statements built once: constructing one per call cost more than running it.
        by_key = (table.c.scope == bindparam("_scope"), table.c.request_id == bindparam("_request_id"))
        self._complete = update(table).where(*by_key).values(result=bindparam("_result"))
        self._lookup_statement = select(table.c.fingerprint, table.c.result).where(*by_key)
        self._key = (table.c.scope, table.c.request_id)

    async def claim(self, session: DbSession, scope: str, request_id: str, print_: str) -> str | None:
        """None if this request_id is new (now claimed); else the stored result of the first request.

        Raises AlreadyExists(REQUEST_ID_REUSED) if the id was used with a different payload.
        """
        claimed = await insert_unless_present(
            session,
            self.table,
            {
                "scope": scope,
                "request_id": request_id,
                "fingerprint": print_,
                "result": None,
                "create_time": datetime.now(UTC),
            },
            self._key,
        )
        if claimed:
            return None
        # A repeat: the first request's row is committed and visible now.
        existing = await self._lookup(session, scope, request_id)
        if existing is None:
            raise Unavailable("concurrent request with the same request_id; retry")
        return replayed_result(scope, request_id, print_, existing)

    async def complete(self, session: DbSession, scope: str, request_id: str, result: str) -> None:
        await session.execute(self._complete, {"_scope": scope, "_request_id": request_id, "_result": result})

    async def _lookup(self, session: DbSession, scope: str, request_id: str) -> tuple[str, str | None] | None:
        row = (
            await session.execute(self._lookup_statement, {"_scope": scope, "_request_id": request_id})
        ).first()
        return None if row is None else (str(row.fingerprint), row.result)
