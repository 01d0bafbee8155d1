"""The user tables and the one repository that reads and writes them (SQLAlchemy Core)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Column,
    Index,
    MetaData,
    String,
    Table,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from shop_mesh.services.common.db import Database, db_session
from shop_mesh.services.common.idempotency_sql import idempotency_table
from shop_mesh.services.common.outbox import sequence_table
from shop_mesh.services.common.sqltypes import UtcDateTime
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.user.domain import (
    MAX_DISPLAY_NAME_LENGTH,
    MAX_EMAIL_LENGTH,
    User,
    UserState,
    email_taken,
)

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("user_id", String(32), primary_key=True),
    Column("email", String(MAX_EMAIL_LENGTH), nullable=False),
    Column("display_name", String(MAX_DISPLAY_NAME_LENGTH), nullable=False),
    Column("state", String(16), nullable=False),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
)

# An email is unique among live users: deleting an account frees its address for a new sign-up.
_LIVE = users.c.state != UserState.DELETED.value
Index("uq_users_live_email", users.c.email, unique=True, sqlite_where=_LIVE, postgresql_where=_LIVE)
# ListUsers with a state filter walks this index in id order.
Index("ix_users_state_user_id", users.c.state, users.c.user_id)

idempotency_keys = idempotency_table(metadata)
sequences = sequence_table(metadata)

_COLUMNS = (
    users.c.user_id,
    users.c.email,
    users.c.display_name,
    users.c.state,
    users.c.create_time,
    users.c.update_time,
)


def _to_user(row: Sequence[Any]) -> User:
    # By position (the order of _COLUMNS): rows of a session and plain tuples of read_first alike.
    user_id, email, display_name, state, create_time, update_time = row
    return User(
        user_id=user_id,
        email=email,
        display_name=display_name,
        state=UserState(state),
        create_time=create_time,
        update_time=update_time,
    )


def _values(user: User) -> dict[str, Any]:
    return {
        "user_id": user.user_id,
        "email": user.email,
        "display_name": user.display_name,
        "state": user.state.value,
        "create_time": user.create_time,
        "update_time": user.update_time,
    }


# GetUser's hot path (order-service checks every order's user): one primary-key lookup, the
# statement built once so SQLAlchemy's compiled cache is hit by identity.
_BY_ID = select(*_COLUMNS).where(users.c.user_id == bindparam("user_id"))
_BY_ID_FOR_UPDATE = _BY_ID.with_for_update()


class SqlUserLookup:
    """The `UserLookup` port: the user by id through `Database.read_first`, a one-statement read unit
    (on a SQLite file, one SELECT compiled once and run on the driver)."""

    def __init__(self, db: Database):
        self._db = db

    async def get(self, user_id: str) -> User | None:
        row = await self._db.read_first(_BY_ID, {"user_id": user_id})
        return None if row is None else _to_user(row)


class SqlUserRepository:
    def __init__(self, session: Session):
        self.session = db_session(session)

    def get(self, user_id: str, *, for_update: bool = False) -> User | None:
        # Reads inside a write transaction (with for_update); GetUser itself uses SqlUserLookup.
        query = _BY_ID_FOR_UPDATE if for_update else _BY_ID
        row = self.session.execute(query, {"user_id": user_id}).first()
        return None if row is None else _to_user(row)

    def email_owner(self, email: str) -> str | None:
        owner = self.session.scalar(select(users.c.user_id).where(users.c.email == email, _LIVE).limit(1))
        return None if owner is None else str(owner)

    def insert(self, user: User) -> None:
        self._write(insert(users).values(**_values(user)), user.email)

    def save(self, user: User) -> None:
        values = _values(user)
        del values["user_id"], values["create_time"]
        self._write(update(users).where(users.c.user_id == user.user_id).values(**values), user.email)

    def list_page(self, state: UserState | None, after_id: str | None, limit: int) -> list[User]:
        query = select(*_COLUMNS).order_by(users.c.user_id).limit(limit)
        if state is not None:
            query = query.where(users.c.state == state.value)
        if after_id is not None:
            query = query.where(users.c.user_id > after_id)
        return [_to_user(row) for row in self.session.execute(query).all()]

    def _write(self, statement: Any, email: str) -> None:
        try:
            # A savepoint, so a lost race on the email index leaves the transaction usable.
            with self.session.begin_nested():
                self.session.execute(statement)
        except IntegrityError:
            raise email_taken(email) from None
