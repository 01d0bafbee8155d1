"""User storage in memory: the `UserRepository` port with the SQL adapter's rules (an email is unique
among live users; pages in id order)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.user.domain import User, UserState, email_taken
from tests.unit.fakes.units import InMemoryUnits, Tables, session_units, tables_of


@dataclass
class UserTables(Tables):
    users: dict[str, User] = field(default_factory=dict)


class InMemoryUserRepository:
    def __init__(self, session: Session):
        self._session = session

    def _users(self, *, write: bool = False) -> dict[str, User]:
        return tables_of(self._session, UserTables, write=write).users

    def get(self, user_id: str, *, for_update: bool = False) -> User | None:
        return self._users().get(user_id)

    def email_owner(self, email: str) -> str | None:
        live = (u for u in self._users().values() if u.email == email and u.state is not UserState.DELETED)
        return next((u.user_id for u in live), None)

    def insert(self, user: User) -> None:
        self._write(user)

    def save(self, user: User) -> None:
        self._write(user)

    def list_page(self, state: UserState | None, after_id: str | None, limit: int) -> list[User]:
        found = [
            u
            for _, u in sorted(self._users().items())
            if (state is None or u.state is state) and (after_id is None or u.user_id > after_id)
        ]
        return found[:limit]

    def _write(self, user: User) -> None:
        users = self._users(write=True)
        # The unique index on live users' emails (uq_users_live_email).
        owner = self.email_owner(user.email)
        if user.state is not UserState.DELETED and owner not in (None, user.user_id):
            raise email_taken(user.email)
        users[user.user_id] = user


def user_units() -> InMemoryUnits[UserTables, Session]:
    return session_units(UserTables())
