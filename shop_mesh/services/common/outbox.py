"""Event logs with commit-ordered sequences (the SQL side of `unit_of_work.SequenceNumbers`; streams
tail them via event_hub.EventHub).

Sequences come from a counter row that is incremented inside the writing transaction. The row lock
is held until commit, so sequence N+1 cannot commit before N: a reader that has seen N never later
finds a smaller sequence appear (the classic gap of auto-increment ids on PostgreSQL).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, MetaData, String, Table, bindparam, insert, select, update

from shop_mesh.services.common.db import db_session
from shop_mesh.services.common.unit_of_work import Session


def sequence_table(metadata: MetaData) -> Table:
    return Table(
        "sequences",
        metadata,
        Column("name", String(64), primary_key=True),
        Column("value", BigInteger, nullable=False),
    )


class SequenceAllocator:
    def __init__(self, table: Table, name: str):
        self.table = table
        self.name = name
        # Built once: constructing the statement per event cost more than running it.
        self._next = (
            update(table)
            .where(table.c.name == bindparam("_name"))
            .values(value=table.c.value + 1)
            .returning(table.c.value)
        )

    def ensure(self, session: Session) -> None:
        db = db_session(session)
        exists = db.scalar(select(self.table.c.value).where(self.table.c.name == self.name))
        if exists is None:
            db.execute(insert(self.table).values(name=self.name, value=0))

    def next(self, session: Session) -> int:
        """Allocate the next sequence; call it in the transaction that writes the event, last."""
        value = db_session(session).scalar(self._next, {"_name": self.name})
        if value is None:
            raise RuntimeError(f"sequence {self.name!r} missing: call ensure() at start")
        return int(value)
