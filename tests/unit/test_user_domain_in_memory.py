"""The user use cases against in-memory fakes of the unit-of-work port, its repository and its
idempotency keys: no database at all, the pattern any service's domain tests can follow."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shop_mesh.services.common.errors import AlreadyExists, FailedPrecondition, NotFound, PermissionDenied
from shop_mesh.services.common.pagination import PageRequest
from shop_mesh.services.common.principal import customer
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.user.domain import NewUser, UserChanges, UserService, UserState
from tests.unit.fakes.units import InMemoryKeys, InMemoryUnits
from tests.unit.fakes.user import InMemoryUserRepository, UserTables, user_units

Units = InMemoryUnits[UserTables, Session]


@pytest.fixture
def units() -> Units:
    return user_units()


@pytest.fixture
def service(units: Units) -> UserService:
    return UserService(
        units, InMemoryUserRepository, InMemoryKeys(), clock=lambda: datetime(2026, 1, 1, tzinfo=UTC)
    )


async def test_a_created_user_is_committed_and_a_repeat_returns_it(
    service: UserService, units: Units
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
    service: UserService, units: Units
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


async def test_an_admin_suspends_and_reactivates_a_user(service: UserService, units: Units) -> None:
    user = await service.create_user("r1", NewUser("a@b.co", "A"))
    suspended = await service.update_user("u1", UserChanges(user.user_id, state=UserState.SUSPENDED))
    assert units.committed.users[user.user_id].state is UserState.SUSPENDED == suspended.state
    active = await service.update_user("u2", UserChanges(user.user_id, state=UserState.ACTIVE))
    assert units.committed.users[user.user_id] == active and active.state is UserState.ACTIVE
    with pytest.raises(FailedPrecondition) as refused:
        await service.update_user("u3", UserChanges(user.user_id, state=UserState.DELETED))
    assert refused.value.reason == "USE_DELETE_USER"


async def test_a_deleted_user_is_final_and_deleting_it_again_is_a_no_op(
    service: UserService, units: Units
) -> None:
    user = await service.create_user("r1", NewUser("a@b.co", "A"))
    deleted = await service.delete_user("d1", user.user_id)
    assert units.committed.users[user.user_id] == deleted and deleted.state is UserState.DELETED
    for changes in (
        UserChanges(user.user_id, display_name="B"),
        UserChanges(user.user_id, state=UserState.ACTIVE),
    ):
        with pytest.raises(FailedPrecondition) as refused:
            await service.update_user("u1", changes)
        assert refused.value.reason == "USER_DELETED"
    commits = units.commits
    # A new request_id: the intent already holds, the user comes back unchanged.
    assert await service.delete_user("d2", user.user_id) == deleted
    assert units.committed.users[user.user_id] == deleted
    assert units.commits == commits + 1  # only its request id was stored


async def test_reads_are_owned_and_lists_page_in_id_order(service: UserService) -> None:
    made = [await service.create_user(f"r{i}", NewUser(f"u{i}@b.co", "U")) for i in range(3)]
    await service.update_user("s1", UserChanges(made[1].user_id, state=UserState.SUSPENDED))
    me = customer(made[0].user_id)
    assert await service.get_user(made[0].user_id, principal=me) == made[0]
    with pytest.raises(NotFound):  # another customer's record looks missing
        await service.get_user(made[2].user_id, principal=me)
    with pytest.raises(PermissionDenied) as listing:
        await service.list_users(None, PageRequest(10, None), principal=me)
    assert listing.value.reason == "ADMIN_ONLY"
    ids = sorted(u.user_id for u in made)
    first = await service.list_users(None, PageRequest(2, None))
    assert [u.user_id for u in first.items] == ids[:2] and first.next_key == ids[1]
    rest = await service.list_users(None, PageRequest(2, first.next_key))
    assert [u.user_id for u in rest.items] == ids[2:] and rest.next_key is None
    active = await service.list_users(UserState.ACTIVE, PageRequest(10, None))
    assert {u.user_id for u in active.items} == {made[0].user_id, made[2].user_id}
