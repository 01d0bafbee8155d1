"""The SQL adapter of the `unit_of_work.IdempotencyKeys` port: request ids claimed by a primary key,
decided by the database, not by an in-memory set (the rules are in idempotency.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, Connection, MetaData, String, Table, Text, bindparam, select, update

from shop_mesh.services.common.db import db_session, insert_unless_present
from shop_mesh.services.common.errors import Unavailable
from shop_mesh.services.common.idempotency import replayed_result
from shop_mesh.services.common.metrics import IDEMPOTENT_REPLAYS
from shop_mesh.services.common.sqltypes import UtcDateTime
from shop_mesh.services.common.unit_of_work import Session


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


class IdempotencyStore:
    def __init__(self, table: Table):
        self.table = table
        # Statements built once: constructing one per call cost more than running it.
        by_key = (table.c.scope == bindparam("_scope"), table.c.request_id == bindparam("_request_id"))
        self._complete = update(table).where(*by_key).values(result=bindparam("_result"))
        self._lookup_statement = select(table.c.fingerprint, table.c.result).where(*by_key)
        self._key = (table.c.scope, table.c.request_id)

    def claim(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        """None if this request_id is new (now claimed); else the stored result of the first request.

        Raises AlreadyExists(REQUEST_ID_REUSED) if the id was used with a different payload.
        """
        db = db_session(session)
        claimed = insert_unless_present(
            db,
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
        existing = self._lookup(db, scope, request_id)
        if existing is None:
            raise Unavailable("concurrent request with the same request_id; retry")
        result = replayed_result(scope, request_id, print_, existing)
        IDEMPOTENT_REPLAYS.labels(scope).inc()
        return result

    def complete(self, session: Session, scope: str, request_id: str, result: str) -> None:
        db_session(session).execute(
            self._complete, {"_scope": scope, "_request_id": request_id, "_result": result}
        )

    def replay(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        existing = self._lookup(db_session(session), scope, request_id)
        if existing is None:
            return None
        result = replayed_result(scope, request_id, print_, existing)
        IDEMPOTENT_REPLAYS.labels(scope).inc()
        return result

    def _lookup(self, session: Connection, scope: str, request_id: str) -> tuple[str, str | None] | None:
        row = session.execute(self._lookup_statement, {"_scope": scope, "_request_id": request_id}).first()
        return None if row is None else (str(row.fingerprint), row.result)
