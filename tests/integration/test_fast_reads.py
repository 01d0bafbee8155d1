"""Hot point reads (`Database.read_now`): read-your-writes, never failing or stalling the event loop
because of a concurrent writer, falling back to the async path when SQLite is busy, and the same
behaviour on PostgreSQL (where it is the async path)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from shop.user.v1 import user_pb2
from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, event, insert, select, update

from services.common.db import Database
from tests.integration.test_user_service import ABSENT_USER, TIMEOUT, mask, running


def _schema() -> tuple[MetaData, Table]:
    metadata = MetaData()
    items = Table(
        "items",
        metadata,
        Column("id", String(32), primary_key=True),
        Column("value", Integer, nullable=False),
    )
    return metadata, items


def _value(items: Table) -> Callable[[Connection, str], int | None]:
    def read(conn: Connection, item_id: str) -> int | None:
        row = conn.execute(select(items.c.value).where(items.c.id == item_id)).first()
        return None if row is None else int(row.value)

    return read


async def test_read_now_sees_every_committed_write(database_url_factory: Callable[[str], str]) -> None:
    metadata, items = _schema()
    url = database_url_factory("ryw")
    db, other = Database(url, metadata), Database(url, metadata)  # `other`: another replica
    await db.create_schema()
    read = _value(items)
    try:
        assert db.is_sqlite == (db._fast is not None)
        assert await db.read_now(read, "a") is None
        for i in range(20):
            writer = db if i % 2 else other
            async with writer.transaction() as session:
                if i == 0:
                    await session.execute(insert(items).values(id="a", value=0))
                else:
                    await session.execute(update(items).where(items.c.id == "a").values(value=i))
            assert await db.read_now(read, "a") == i  # at once, with no retry
    finally:
        await db.dispose()
        await other.dispose()


async def test_open_write_transaction_neither_fails_nor_blocks_reads(
    database_url_factory: Callable[[str], str],
) -> None:
    metadata, items = _schema()
    url = database_url_factory("busy")
    db, writer = Database(url, metadata), Database(url, metadata)
    await db.create_schema()
    read = _value(items)
    async with writer.transaction() as session:
        await session.execute(insert(items).values(id="a", value=1))
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold_write_lock() -> None:
        async with writer.transaction() as session:  # BEGIN IMMEDIATE on SQLite: the write lock
            await session.execute(update(items).where(items.c.id == "a").values(value=2))
            holding.set()
            await release.wait()

    task = asyncio.create_task(hold_write_lock())
    try:
        await asyncio.wait_for(holding.wait(), TIMEOUT)
        slowest = 0.0
        for _ in range(200):
            started = time.perf_counter()
            assert await db.read_now(read, "a") == 1  # the committed value, not the pending one
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.5, f"a read waited {slowest:.3f} s for a writer"
        release.set()
        await asyncio.wait_for(task, TIMEOUT)
        assert await db.read_now(read, "a") == 2
    finally:
        release.set()
        await asyncio.gather(task, return_exceptions=True)
        await db.dispose()
        await writer.dispose()


async def test_busy_sqlite_falls_back_to_the_async_path(tmp_path: Any) -> None:
    metadata, items = _schema()
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'fallback.db'}", metadata)
    await db.create_schema()
    async with db.transaction() as session:
        await session.execute(insert(items).values(id="a", value=7))
    assert db._fast is not None
    fast_attempts = 0

    def locked(*_: Any) -> None:
        nonlocal fast_attempts
        fast_attempts += 1
        raise sqlite3.OperationalError("database is locked")

    event.listen(db._fast, "before_cursor_execute", locked)
    try:
        assert await db.read_now(_value(items), "a") == 7
        assert fast_attempts == 1
    finally:
        await db.dispose()


async def test_get_user_reads_its_own_writes_under_concurrent_writes(
    database_url_factory: Callable[[str], str],
) -> None:
    async with running(database_url_factory("user")) as api:
        user = await api.create("fast@example.com", "Ada")
        assert (await api.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id))).user == user

        async def rename(i: int) -> None:
            await api.stub.UpdateUser(
                user_pb2.UpdateUserRequest(
                    request_id=f"rename-{i}",
                    user=user_pb2.User(user_id=user.user_id, display_name=f"Ada {i}"),
                    update_mask=mask("display_name"),
                ),
                timeout=TIMEOUT,
            )
            # Read-your-writes: the caller's next GetUser sees (at least) its own update.
            got = await api.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=TIMEOUT)
            assert got.user.display_name.startswith("Ada ")

        async def read_many() -> None:
            for _ in range(50):
                await api.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=TIMEOUT)

        await asyncio.gather(*(rename(i) for i in range(20)), read_many(), read_many())

        await api.stub.UpdateUser(
            user_pb2.UpdateUserRequest(
                request_id="rename-final",
                user=user_pb2.User(user_id=user.user_id, display_name="Final"),
                update_mask=mask("display_name"),
            ),
            timeout=TIMEOUT,
        )
        got = await api.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=TIMEOUT)
        assert got.user.display_name == "Final"
        await api.stub.DeleteUser(
            user_pb2.DeleteUserRequest(request_id="delete-1", user_id=user.user_id), timeout=TIMEOUT
        )
        got = await api.stub.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=TIMEOUT)
        assert got.user.state == user_pb2.USER_STATE_DELETED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.stub.GetUser(user_pb2.GetUserRequest(user_id=ABSENT_USER))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
