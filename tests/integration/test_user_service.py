"""UserService through a real in-process gRPC server on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from shop.user.v1 import user_pb2, user_pb2_grpc
from sqlalchemy import Table, func, insert, select

from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.pagination import make_page_token
from shop_mesh.services.common.server import ServiceHost
from shop_mesh.services.user.app import SERVICE_NAME, build
from shop_mesh.services.user.config import UserSettings
from shop_mesh.services.user.repository import idempotency_keys, users
from tests.support import error_details, wait_serving

TIMEOUT = 10.0
# Well-formed ids that no test creates (fixed, so xdist workers collect the same test ids).
ABSENT_USER = "usr_01J0000000000000000000ABSN"
ORDER_ID = "ord_01J0000000000000000000ABSN"


@dataclass
class Api:
    stub: user_pb2_grpc.UserServiceAsyncStub
    host: ServiceHost

    async def count(self, table: Table = users) -> int:
        query = select(func.count()).select_from(table)
        count: int | None = await self.host.parts.database.read(lambda session: session.scalar(query))
        return int(count or 0)

    async def create(self, email: str, name: str = "Ada", request_id: str | None = None) -> user_pb2.User:
        reply = await self.stub.CreateUser(
            user_pb2.CreateUserRequest(
                request_id=request_id or "c-" + re.sub(r"[^A-Za-z0-9]", "-", email.strip()),
                email=email,
                display_name=name,
            ),
            timeout=TIMEOUT,
        )
        return reply.user


@asynccontextmanager
async def running(url: str) -> AsyncIterator[Api]:
    stopping = asyncio.Event()
    settings = UserSettings(port=0, database_url=url)
    host = ServiceHost(settings, build(settings, stopping), stopping=stopping)
    port = await host.start()
    try:
        address = f"127.0.0.1:{port}"
        await wait_serving(address, SERVICE_NAME, timeout=TIMEOUT)
        async with grpc.aio.insecure_channel(address) as channel:
            yield Api(user_pb2_grpc.UserServiceStub(channel), host)
    finally:
        await host.stop(grace=1)


@pytest.fixture
async def api(database_url_factory: Callable[[str], str]) -> AsyncIterator[Api]:
    """Both backends: for persistence, idempotency and concurrency."""
    async with running(database_url_factory("user")) as service:
        yield service


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[Api]:
    """SQLite only: for validation and error mapping, which do not depend on the backend."""
    async with running(f"sqlite:///{tmp_path / 'user.db'}") as service:
        yield service


async def expect_error(call: Awaitable[object], code: grpc.StatusCode) -> tuple[str | None, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    return error_details(err.value)


def mask(*paths: str) -> FieldMask:
    return FieldMask(paths=list(paths))


# --- CreateUser / GetUser ---------------------------------------------------------------------


async def test_create_then_get_returns_the_normalized_active_user(api: Api) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    created = await api.create("  Ada.Lovelace@Example.COM ", "  Ada Lovelace  ")
    assert created.user_id.startswith("usr_")
    assert created.email == "ada.lovelace@example.com"
    assert created.display_name == "Ada Lovelace"
    assert created.state == user_pb2.USER_STATE_ACTIVE
    assert created.create_time.ToDatetime(UTC) >= before
    assert created.update_time == created.create_time

    got = await api.stub.GetUser(user_pb2.GetUserRequest(user_id=created.user_id), timeout=TIMEOUT)
    assert got.user == created


@pytest.mark.parametrize(
    ("request_id", "email", "name", "field"),
    [
        ("", "a@example.com", "Ada", "request_id"),
        ("bad id with spaces", "a@example.com", "Ada", "request_id"),
        ("r" * 129, "a@example.com", "Ada", "request_id"),
        ("r1", "", "Ada", "email"),
        ("r1", "   ", "Ada", "email"),
        ("r1", "no-at-sign.example.com", "Ada", "email"),
        ("r1", "a@localhost", "Ada", "email"),
        ("r1", "a..b@example.com", "Ada", "email"),
        ("r1", "a@exa mple.com", "Ada", "email"),
        ("r1", "x" * 65 + "@example.com", "Ada", "email"),
        ("r1", "a@" + "b" * 250 + ".com", "Ada", "email"),
        ("r1", "a@example.com", "", "display_name"),
        ("r1", "a@example.com", "   ", "display_name"),
        ("r1", "a@example.com", "x" * 201, "display_name"),
        ("r1", "a@example.com", "bell\x07", "display_name"),
    ],
)
async def test_create_rejects_each_bad_field_and_writes_nothing(
    lite: Api, request_id: str, email: str, name: str, field: str
) -> None:
    call = lite.stub.CreateUser(
        user_pb2.CreateUserRequest(request_id=request_id, email=email, display_name=name), timeout=TIMEOUT
    )
    reason, fields = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert reason == "INVALID_ARGUMENT"
    assert set(fields) == {field}
    assert await lite.count(users) == 0
    assert await lite.count(idempotency_keys) == 0


async def test_create_reports_every_bad_field_at_once(lite: Api) -> None:
    call = lite.stub.CreateUser(user_pb2.CreateUserRequest(), timeout=TIMEOUT)
    _, fields = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(fields) == {"request_id", "email", "display_name"}


async def test_display_name_limit_counts_characters_after_trimming(lite: Api) -> None:
    user = await lite.create("long@example.com", "  " + "é" * 200 + "  ")
    assert user.display_name == "é" * 200


async def test_email_is_unique_ignoring_case(api: Api) -> None:
    await api.create("grace@example.com", request_id="c1")
    call = api.stub.CreateUser(
        user_pb2.CreateUserRequest(request_id="c2", email="GRACE@example.com", display_name="G"),
        timeout=TIMEOUT,
    )
    reason, _ = await expect_error(call, grpc.StatusCode.ALREADY_EXISTS)
    assert reason == "EMAIL_TAKEN"
    assert await api.count(users) == 1


async def test_concurrent_identical_creates_make_one_user(api: Api) -> None:
    request = user_pb2.CreateUserRequest(request_id="same", email="dup@example.com", display_name="Dup")
    replies = await asyncio.gather(*(api.stub.CreateUser(request, timeout=TIMEOUT) for _ in range(10)))
    assert len({r.user.SerializeToString() for r in replies}) == 1
    assert await api.count(users) == 1
    assert await api.count(idempotency_keys) == 1

    reused = api.stub.CreateUser(
        user_pb2.CreateUserRequest(request_id="same", email="other@example.com", display_name="Dup"),
        timeout=TIMEOUT,
    )
    reason, _ = await expect_error(reused, grpc.StatusCode.ALREADY_EXISTS)
    assert reason == "REQUEST_ID_REUSED"
    assert await api.count(users) == 1


async def test_concurrent_creates_of_one_email_let_exactly_one_win(api: Api) -> None:
    calls = [
        api.stub.CreateUser(
            user_pb2.CreateUserRequest(request_id=f"r{i}", email="race@example.com", display_name="R"),
            timeout=TIMEOUT,
        )
        for i in range(8)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if isinstance(r, user_pb2.CreateUserResponse)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(failed) == 7
    for exc in failed:
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error_details(exc)[0] == "EMAIL_TAKEN"
    assert await api.count(users) == 1


@pytest.mark.parametrize(
    ("user_id", "code", "reason", "field"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "user_id"),
        ("usr_123", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "user_id"),
        (ORDER_ID, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "user_id"),
        ("'; DROP TABLE users; --", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "user_id"),
        (ABSENT_USER, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", None),
    ],
)
async def test_get_user_errors(
    lite: Api, user_id: str, code: grpc.StatusCode, reason: str, field: str | None
) -> None:
    call = lite.stub.GetUser(user_pb2.GetUserRequest(user_id=user_id), timeout=TIMEOUT)
    got_reason, fields = await expect_error(call, code)
    assert got_reason == reason
    assert set(fields) == ({field} if field else set())


# --- ListUsers --------------------------------------------------------------------------------


async def test_list_pages_by_creation_order_with_state_filter(api: Api) -> None:
    created = [await api.create(f"u{i}@example.com") for i in range(7)]
    for user in created[::3]:  # 0, 3, 6
        await api.stub.UpdateUser(
            user_pb2.UpdateUserRequest(
                request_id=f"s-{user.user_id}",
                user=user_pb2.User(user_id=user.user_id, state=user_pb2.USER_STATE_SUSPENDED),
                update_mask=mask("state"),
            ),
            timeout=TIMEOUT,
        )

    async def all_pages(state: int, size: int) -> list[list[str]]:
        pages: list[list[str]] = []
        token = ""
        while True:
            reply = await api.stub.ListUsers(
                user_pb2.ListUsersRequest(page_size=size, page_token=token, state=state),  # type: ignore[arg-type]
                timeout=TIMEOUT,
            )
            pages.append([u.user_id for u in reply.users])
            token = reply.next_page_token
            if not token:
                return pages

    ids = [u.user_id for u in created]
    assert ids == sorted(ids)
    assert await all_pages(user_pb2.USER_STATE_UNSPECIFIED, 3) == [ids[0:3], ids[3:6], ids[6:7]]
    assert await all_pages(user_pb2.USER_STATE_SUSPENDED, 2) == [[ids[0], ids[3]], [ids[6]]]
    active = [ids[1], ids[2], ids[4], ids[5]]
    # An exactly full last page has no next token.
    assert await all_pages(user_pb2.USER_STATE_ACTIVE, 2) == [active[0:2], active[2:4]]
    assert await all_pages(user_pb2.USER_STATE_DELETED, 0) == [[]]


async def test_list_default_page_size_and_cap(lite: Api) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "user_id": new_id("usr"),
            "email": f"bulk{i}@example.com",
            "display_name": "Bulk",
            "state": "ACTIVE",
            "create_time": now,
            "update_time": now,
        }
        for i in range(505)
    ]
    await lite.host.parts.database.write(lambda session: session.execute(insert(users), rows))
    default = await lite.stub.ListUsers(user_pb2.ListUsersRequest(), timeout=TIMEOUT)
    assert len(default.users) == 50 and default.next_page_token
    capped = await lite.stub.ListUsers(user_pb2.ListUsersRequest(page_size=10_000), timeout=TIMEOUT)
    assert len(capped.users) == 500 and capped.next_page_token
    rest = await lite.stub.ListUsers(
        user_pb2.ListUsersRequest(page_size=10_000, page_token=capped.next_page_token), timeout=TIMEOUT
    )
    assert len(rest.users) == 5 and not rest.next_page_token


async def test_list_rejects_bad_arguments(lite: Api) -> None:
    await lite.create("a@example.com")
    await lite.create("b@example.com")
    first = await lite.stub.ListUsers(
        user_pb2.ListUsersRequest(page_size=1, state=user_pb2.USER_STATE_ACTIVE), timeout=TIMEOUT
    )
    assert first.next_page_token
    cases: list[tuple[user_pb2.ListUsersRequest, str]] = [
        (user_pb2.ListUsersRequest(page_size=-1), "page_size"),
        (user_pb2.ListUsersRequest(state=9), "state"),  # type: ignore[arg-type]
        (user_pb2.ListUsersRequest(page_token="not-a-token"), "page_token"),
        # A token is bound to the filter it was made for.
        (user_pb2.ListUsersRequest(page_token=first.next_page_token), "page_token"),
        (user_pb2.ListUsersRequest(page_token=make_page_token("x' OR 1=1", "state=0")), "page_token"),
    ]
    for request, field in cases:
        reason, fields = await expect_error(
            lite.stub.ListUsers(request, timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (reason, set(fields)) == ("INVALID_ARGUMENT", {field}), request


# --- UpdateUser -------------------------------------------------------------------------------


async def test_update_changes_only_masked_fields(api: Api) -> None:
    user = await api.create("old@example.com", "Old Name")
    reply = await api.stub.UpdateUser(
        user_pb2.UpdateUserRequest(
            request_id="u1",
            user=user_pb2.User(
                user_id=user.user_id,
                email="New@Example.com",
                display_name="  New Name ",
                state=user_pb2.USER_STATE_SUSPENDED,
            ),
            update_mask=mask("display_name", "email"),
        ),
        timeout=TIMEOUT,
    )
    updated = reply.user
    assert (updated.email, updated.display_name, updated.state) == (
        "new@example.com",
        "New Name",
        user_pb2.USER_STATE_ACTIVE,
    )
    assert updated.create_time == user.create_time
    assert updated.update_time.ToDatetime(UTC) > user.update_time.ToDatetime(UTC)
    got = await api.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=TIMEOUT)
    assert got.user == updated
    # The old address is free again, the new one is taken.
    await api.create("old@example.com", request_id="again")
    taken = api.stub.CreateUser(
        user_pb2.CreateUserRequest(request_id="c9", email="new@example.com", display_name="X"),
        timeout=TIMEOUT,
    )
    assert (await expect_error(taken, grpc.StatusCode.ALREADY_EXISTS))[0] == "EMAIL_TAKEN"

    suspended = await api.stub.UpdateUser(
        user_pb2.UpdateUserRequest(
            request_id="u2",
            user=user_pb2.User(user_id=user.user_id, state=user_pb2.USER_STATE_SUSPENDED),
            update_mask=mask("state"),
        ),
        timeout=TIMEOUT,
    )
    assert suspended.user.state == user_pb2.USER_STATE_SUSPENDED
    assert suspended.user.email == "new@example.com"


async def test_update_duplicates_return_the_first_result(api: Api) -> None:
    user = await api.create("idem@example.com", "Start")

    def rename(request_id: str, name: str) -> user_pb2.UpdateUserRequest:
        return user_pb2.UpdateUserRequest(
            request_id=request_id,
            user=user_pb2.User(user_id=user.user_id, display_name=name),
            update_mask=mask("display_name"),
        )

    replies = await asyncio.gather(
        *(api.stub.UpdateUser(rename("u1", "First"), timeout=TIMEOUT) for _ in range(8))
    )
    assert len({r.user.SerializeToString() for r in replies}) == 1
    first = replies[0].user
    assert first.display_name == "First"

    await api.stub.UpdateUser(rename("u2", "Second"), timeout=TIMEOUT)
    repeat = await api.stub.UpdateUser(rename("u1", "First"), timeout=TIMEOUT)
    assert repeat.user == first  # the stored snapshot, not the current state
    got = await api.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=TIMEOUT)
    assert got.user.display_name == "Second"

    reused = api.stub.UpdateUser(rename("u1", "Other"), timeout=TIMEOUT)
    assert (await expect_error(reused, grpc.StatusCode.ALREADY_EXISTS))[0] == "REQUEST_ID_REUSED"
    query = select(idempotency_keys.c.scope)
    scopes = await api.host.parts.database.read(lambda session: session.scalars(query).all())
    assert sorted(scopes) == ["CreateUser", "UpdateUser", "UpdateUser"]


def _update(user_id: str, paths: list[str], **fields: object) -> user_pb2.UpdateUserRequest:
    return user_pb2.UpdateUserRequest(
        request_id="bad-update",
        user=user_pb2.User(user_id=user_id, **fields),  # type: ignore[arg-type]
        update_mask=FieldMask(paths=paths),
    )


@pytest.mark.parametrize(
    ("paths", "fields", "expected"),
    [
        ([], {"display_name": "X"}, {"update_mask"}),
        (["display_name", "nickname"], {"display_name": "X"}, {"update_mask"}),
        (["user_id"], {}, {"update_mask"}),
        (["create_time", "state"], {"state": 1}, {"update_mask"}),
        (["state"], {"state": 3}, {"user.state"}),
        (["state"], {"state": 0}, {"user.state"}),
        (["state"], {"state": 42}, {"user.state"}),
        (["email"], {"email": "not-an-email"}, {"user.email"}),
        (["email"], {"email": ""}, {"user.email"}),
        (["display_name"], {"display_name": " "}, {"user.display_name"}),
        (
            ["display_name", "email"],
            {"display_name": "y" * 201, "email": "@"},
            {"user.display_name", "user.email"},
        ),
    ],
)
async def test_update_rejects_bad_requests_and_writes_nothing(
    lite: Api, paths: list[str], fields: dict[str, object], expected: set[str]
) -> None:
    user = await lite.create("keep@example.com", "Keep")
    call = lite.stub.UpdateUser(_update(user.user_id, paths, **fields), timeout=TIMEOUT)
    reason, violations = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert reason == "INVALID_ARGUMENT"
    assert set(violations) == expected
    got = await lite.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=TIMEOUT)
    assert got.user == user
    assert await lite.count(idempotency_keys) == 1  # only the CreateUser key


async def test_update_rejects_missing_or_malformed_user_id(lite: Api) -> None:
    for user_id in ("", "usr_nope"):
        call = lite.stub.UpdateUser(_update(user_id, ["display_name"], display_name="X"), timeout=TIMEOUT)
        _, violations = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert set(violations) == {"user.user_id"}
    no_user = user_pb2.UpdateUserRequest(request_id="r", update_mask=mask("display_name"))
    _, violations = await expect_error(
        lite.stub.UpdateUser(no_user, timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(violations) == {"user", "user.display_name"}


async def test_update_state_errors(lite: Api) -> None:
    absent = lite.stub.UpdateUser(_update(new_id("usr"), ["display_name"], display_name="X"), timeout=TIMEOUT)
    assert (await expect_error(absent, grpc.StatusCode.NOT_FOUND))[0] == "USER_NOT_FOUND"

    await lite.create("first@example.com", request_id="c1")
    second = await lite.create("second@example.com", request_id="c2")
    steal = lite.stub.UpdateUser(
        _update(second.user_id, ["email"], email="FIRST@example.com"), timeout=TIMEOUT
    )
    assert (await expect_error(steal, grpc.StatusCode.ALREADY_EXISTS))[0] == "EMAIL_TAKEN"

    await lite.stub.DeleteUser(
        user_pb2.DeleteUserRequest(request_id="d1", user_id=second.user_id), timeout=TIMEOUT
    )
    for paths, fields in ((["display_name"], {"display_name": "Back"}), (["state"], {"state": 1})):
        call = lite.stub.UpdateUser(_update(second.user_id, paths, **fields), timeout=TIMEOUT)
        assert (await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION))[0] == "USER_DELETED"
    got = await lite.stub.GetUser(user_pb2.GetUserRequest(user_id=second.user_id), timeout=TIMEOUT)
    assert got.user.state == user_pb2.USER_STATE_DELETED


async def test_noop_update_keeps_update_time(lite: Api) -> None:
    user = await lite.create("same@example.com", "Same")
    reply = await lite.stub.UpdateUser(
        _update(user.user_id, ["display_name", "email"], display_name="Same", email="SAME@example.com"),
        timeout=TIMEOUT,
    )
    assert reply.user == user


# --- DeleteUser -------------------------------------------------------------------------------


async def test_delete_is_soft_and_idempotent(api: Api) -> None:
    user = await api.create("bye@example.com", "Bye")
    request = user_pb2.DeleteUserRequest(request_id="d1", user_id=user.user_id)
    replies = await asyncio.gather(*(api.stub.DeleteUser(request, timeout=TIMEOUT) for _ in range(8)))
    assert len({r.user.SerializeToString() for r in replies}) == 1
    deleted = replies[0].user
    assert deleted.state == user_pb2.USER_STATE_DELETED
    assert (deleted.user_id, deleted.email, deleted.create_time) == (
        user.user_id,
        user.email,
        user.create_time,
    )

    # A new request_id on a deleted user returns it unchanged: the intent already holds.
    again = await api.stub.DeleteUser(
        user_pb2.DeleteUserRequest(request_id="d2", user_id=user.user_id), timeout=TIMEOUT
    )
    assert again.user == deleted
    got = await api.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=TIMEOUT)
    assert got.user == deleted
    listed = await api.stub.ListUsers(
        user_pb2.ListUsersRequest(state=user_pb2.USER_STATE_DELETED), timeout=TIMEOUT
    )
    assert [u.user_id for u in listed.users] == [user.user_id]
    assert await api.count(users) == 1

    reused = api.stub.DeleteUser(
        user_pb2.DeleteUserRequest(request_id="d1", user_id=new_id("usr")), timeout=TIMEOUT
    )
    assert (await expect_error(reused, grpc.StatusCode.ALREADY_EXISTS))[0] == "REQUEST_ID_REUSED"

    # Deleting an account frees its address for a new sign-up.
    fresh = await api.create("bye@example.com", "Hello again", request_id="c-new")
    assert fresh.user_id != user.user_id
    assert await api.count(users) == 2


@pytest.mark.parametrize(
    ("request_id", "user_id", "code", "reason", "fields"),
    [
        ("", ABSENT_USER, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", {"request_id"}),
        ("d1", "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", {"user_id"}),
        (
            "d1",
            "pay_01J0000000000000000000ABSN",
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            {"user_id"},
        ),
        ("d1", ABSENT_USER, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", set()),
    ],
)
async def test_delete_errors_write_nothing(
    lite: Api, request_id: str, user_id: str, code: grpc.StatusCode, reason: str, fields: set[str]
) -> None:
    call = lite.stub.DeleteUser(
        user_pb2.DeleteUserRequest(request_id=request_id, user_id=user_id), timeout=TIMEOUT
    )
    got_reason, violations = await expect_error(call, code)
    assert (got_reason, set(violations)) == (reason, fields)
    assert await lite.count(idempotency_keys) == 0
