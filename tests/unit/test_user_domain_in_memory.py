"""The user use cases against in-memory fakes of the unit-of-work port, its repository and its
idempotency keys: no database at all, the pattern any service's domain tests can follow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import pytest

from shop_mesh.services.common.errors import AlreadyExists, NotFound
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.user.domain import NewUser, User, UserChanges, UserService, UserState
from tests.unit.fake_keys import InMemoryKeys

R = TypeVar("R")


@dataclass
class Tables:
    users: dict[str, User] = field(default_factory=dict)
    keys: dict[tuple[str, str], tuple[str, str | None]] = field(default_factory=dict)


@dataclass
class FakeSession:
    tables: Tables


def _tables(session: Session) -> Tables:
    assert isinstance(session, FakeSession)
    return session.tables


class FakeUnits:
    """A write transaction works on a copy, published only if its block does not raise."""

    def __init__(self) -> None:
        self.committed = Tables()

    async def read(self, fn: Callable[[Session], R]) -> R:
        return fn(FakeSession(Tables(dict(self.committed.users), dict(self.committed.keys))))

    async def write(self, fn: Callable[[Session], R]) -> R:
        staged = Tables(dict(self.committed.users), dict(self.committed.keys))
        result = fn(FakeSession(staged))
        self.committed = staged
        return result


class FakeUserRepository:
    def __init__(self, session: Session):
        self._users = _tables(session).users

    def get(self, user_id: str, *, for_update: bool = False) -> User | None:
        return self._users.get(user_id)

    def email_owner(self, email: str) -> str | None:
        live = (u for u in self._users.values() if u.email == email and u.state is not UserState.DELETED)
        return next((u.user_id for u in live), None)

    def insert(self, user: User) -> None:
        self._users[user.user_id] = user

    def save(self, user: User) -> None:
        self._users[user.user_id] = user

    def list_page(self, state: UserState | None, after_id: str | None, limit: int) -> list[User]:
        found = [
            u
            for _, u in sorted(self._users.items())
            if (state is None or u.state is state) and (after_id is None or u.user_id > after_id)
        ]
        return found[:limit]


_KEYS = InMemoryKeys(lambda session: _tables(session).keys)


@pytest.fixture
def units() -> FakeUnits:
    return FakeUnits()


@pytest.fixture
def service(units: FakeUnits) -> UserService:
    return UserService(
        units,
        FakeUserRepository,
        InMemoryKeys(lambda session: _tables(session).keys),
        clock=lambda: datetime(2026, 1, 1, tzinfo=UTC),
    )


async def test_a_created_user_is_committed_and_a_repeat_returns_it(
    service: UserService, units: FakeUnits
) -> None:
    user = await service.create_user("r1", NewUser("a@b.co", "A"))
    assert units.committed.users == {user.user_id: user}
    assert await service.create_user("r1", NewUser("a@b.co", "A")) == user
    assert len(units.committed.users) == 1
    assert await service.get_user(user.user_id) == user  # no lookup port: a read unit serves it
    with pytest.raises(AlreadyExists) as reused:
        await service.create_user("r1", NewUser("x@b.co", "X"))
    assert reused.value.reason == "REQUEST_ID_REUSED"


async def test_a_refused_mutation_stores_neither_effect_nor_request_id(
    service: UserService, units: FakeUnits
) -> None:
    first = await service.create_user("r1", NewUser("a@b.co", "A"))
    with pytest.raises(AlreadyExists) as taken:
        await service.create_user("r2", NewUser("a@b.co", "B"))
    assert taken.value.reason == "EMAIL_TAKEN"
    assert ("CreateUser", "r2") not in units.committed.keys
    await service.delete_user("d1", first.user_id)
    # The same request_id is evaluated again, now that the email is free.
    second = await service.create_user("r2", NewUser("a@b.co", "B"))
    assert second.user_id != first.user_id and second.state is UserState.ACTIVE


async def test_updating_a_missing_user_is_not_found(service: UserService) -> None:
    with pytest.raises(NotFound) as missing:
        await service.update_user("u1", UserChanges("usr_missing", display_name="B"))
    assert missing.value.reason == "USER_NOT_FOUND"
