"""The user domain rules on a throwaway SQLite database (no gRPC)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from shop_mesh.services.common.idempotency_sql import IdempotencyStore
from shop_mesh.services.common.ids import is_valid_id, new_id
from shop_mesh.services.common.pagination import PageRequest
from shop_mesh.services.user.domain import (
    NewUser,
    User,
    UserChanges,
    UserService,
    UserState,
    user_from_json,
    user_to_json,
)
from shop_mesh.services.user.repository import SqlUserLookup, SqlUserRepository, idempotency_keys, metadata


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[UserService]:
    db = Database(f"sqlite:///{tmp_path / 'user.db'}", metadata)
    await db.create_schema()
    try:
        yield UserService(db, SqlUserRepository, IdempotencyStore(idempotency_keys), clock=Clock())
    finally:
        await db.dispose()


async def test_get_user_through_the_lookup_port_sees_what_the_unit_wrote(tmp_path: Path) -> None:
    # The composition root's wiring: GetUser served by SqlUserLookup (read_first, the fast path).
    db = Database(f"sqlite:///{tmp_path / 'user.db'}", metadata)
    await db.create_schema()
    try:
        service = UserService(
            db, SqlUserRepository, IdempotencyStore(idempotency_keys), lookup=SqlUserLookup(db)
        )
        user = await service.create_user("r1", NewUser("a@b.co", "A"))
        assert await service.get_user(user.user_id) == user
        renamed = await service.update_user("r2", UserChanges(user.user_id, display_name="B"))
        assert await service.get_user(user.user_id) == renamed  # read-your-writes
        with pytest.raises(NotFound) as missing:
            await service.get_user(new_id("usr"))
        assert missing.value.reason == "USER_NOT_FOUND"
    finally:
        await db.dispose()


def test_snapshot_round_trips() -> None:
    when = datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    user = User(new_id("usr"), "a@b.co", 'Ä "quoted"', UserState.SUSPENDED, when, when + timedelta(days=1))
    assert user_from_json(user_to_json(user)) == user


async def test_create_is_active_and_repeatable(service: UserService) -> None:
    user = await service.create_user("r1", NewUser("a@b.co", "A"))
    assert is_valid_id(user.user_id, "usr")
    assert user.state is UserState.ACTIVE and user.create_time == user.update_time
    assert await service.create_user("r1", NewUser("a@b.co", "A")) == user
    assert await service.get_user(user.user_id) == user
    with pytest.raises(AlreadyExists) as err:
        await service.create_user("r2", NewUser("a@b.co", "Other"))
    assert err.value.reason == "EMAIL_TAKEN"
    with pytest.raises(AlreadyExists) as err:
        await service.create_user("r1", NewUser("a@b.co", "Other"))
    assert err.value.reason == "REQUEST_ID_REUSED"


async def test_update_rules(service: UserService) -> None:
    user = await service.create_user("c", NewUser("a@b.co", "A"))
    suspended = await service.update_user("u1", UserChanges(user.user_id, state=UserState.SUSPENDED))
    assert suspended.state is UserState.SUSPENDED and suspended.update_time > user.update_time
    unchanged = await service.update_user("u2", UserChanges(user.user_id, display_name="A"))
    assert unchanged == suspended
    with pytest.raises(FailedPrecondition):
        await service.update_user("u3", UserChanges(user.user_id, state=UserState.DELETED))
    with pytest.raises(NotFound) as missing:
        await service.update_user("u4", UserChanges(new_id("usr"), display_name="B"))
    assert missing.value.reason == "USER_NOT_FOUND"


async def test_delete_is_soft_repeatable_and_final(service: UserService) -> None:
    user = await service.create_user("c", NewUser("a@b.co", "A"))
    deleted = await service.delete_user("d1", user.user_id)
    assert deleted.state is UserState.DELETED
    assert await service.delete_user("d2", user.user_id) == deleted  # no second change
    with pytest.raises(FailedPrecondition) as err:
        await service.update_user("u", UserChanges(user.user_id, display_name="B"))
    assert err.value.reason == "USER_DELETED"
    with pytest.raises(NotFound):
        await service.delete_user("d3", new_id("usr"))
    # The address of a deleted user can be used again.
    again = await service.create_user("c2", NewUser("a@b.co", "A2"))
    assert again.user_id != user.user_id


async def test_list_pages_in_id_order(service: UserService) -> None:
    created = [await service.create_user(f"c{i}", NewUser(f"u{i}@b.co", "U")) for i in range(5)]
    await service.update_user("s", UserChanges(created[1].user_id, state=UserState.SUSPENDED))
    first = await service.list_users(None, PageRequest(2, None))
    assert [u.user_id for u in first.items] == [u.user_id for u in created[:2]]
    assert first.next_key == created[1].user_id
    rest = await service.list_users(None, PageRequest(10, first.next_key))
    assert [u.user_id for u in rest.items] == [u.user_id for u in created[2:]] and rest.next_key is None
    active = await service.list_users(UserState.ACTIVE, PageRequest(10, None))
    assert created[1].user_id not in {u.user_id for u in active.items} and len(active.items) == 4
