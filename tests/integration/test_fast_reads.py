"""Statements on the event-loop thread (SQLite): hot point reads (`Database.read_now`,
`Database.read_first`) and synchronous write transactions. Read-your-writes; never failing or
stalling the event loop because of a concurrent writer; falling back to the async path when SQLite
is busy; and the same behaviour on PostgreSQL (where everything is the async path)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from shop.user.v1 import user_pb2
from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    event,
    insert,
    select,
    text,
    update,
)

from shop_mesh.services.common.db import Database
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
    await writer.write(lambda session: session.execute(insert(items).values(id="a", value=1)))
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
    db = Database(f"sqlite:///{tmp_path / 'fallback.db'}", metadata)
    await db.create_schema()
    await db.write(lambda session: session.execute(insert(items).values(id="a", value=7)))
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


async def test_read_first_returns_typed_columns_and_sees_every_write(
    database_url_factory: Callable[[str], str],
) -> None:
    metadata = MetaData()
    stamps = Table(
        "stamps",
        metadata,
        Column("id", String(32), primary_key=True),
        Column("value", Integer, nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
    )
    by_id = select(stamps.c.value, stamps.c.at).where(stamps.c.id == bindparam("id"))
    url = database_url_factory("first")
    db, other = Database(url, metadata), Database(url, metadata)
    await db.create_schema()
    at = datetime(2026, 11, 23, 12, 30, 15, 123456, tzinfo=UTC)
    try:
        assert await db.read_first(by_id, {"id": "a"}) is None
        for i in range(5):
            writer = db if i % 2 else other
            async with writer.transaction() as session:
                if i == 0:
                    await session.execute(insert(stamps).values(id="a", value=0, at=at))
                else:
                    await session.execute(update(stamps).where(stamps.c.id == "a").values(value=i))
            value, got_at = await db.read_first(by_id, {"id": "a"}) or (None, None)
            assert value == i
            # The column's own type conversion applies (SQLite stores text): a datetime comes back.
            assert isinstance(got_at, datetime)
            assert got_at.replace(tzinfo=UTC) == at
    finally:
        await db.dispose()
        await other.dispose()


async def test_read_first_falls_back_to_the_async_path_when_sqlite_is_busy(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    metadata, items = _schema()
    db = Database(f"sqlite:///{tmp_path / 'first-busy.db'}", metadata)
    await db.create_schema()
    await db.write(lambda session: session.execute(insert(items).values(id="a", value=7)))
    attempts = 0

    def locked(*_: Any) -> None:
        nonlocal attempts
        attempts += 1
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr("shop_mesh.services.common.db._CompiledRead.first", locked)
    try:
        assert await db.read_first(select(items.c.value).where(items.c.id == "a"), {}) == (7,)
        assert attempts == 1
    finally:
        await db.dispose()


HOLD_S = 1.0  # how long the other "replica" keeps SQLite's write lock


async def test_write_transaction_busy_in_another_database_waits_off_the_loop(tmp_path: Any) -> None:
    """Two `Database`s on one file (as two replicas would be): while one holds SQLite's write lock,
    the other's transaction gives up on the loop thread after the short busy timeout, waits on the
    async path instead, and commits once the lock is free; the loop keeps running meanwhile. (SQLite
    only: PostgreSQL writers of different rows do not wait for each other.)"""
    metadata, items = _schema()
    url = f"sqlite:///{tmp_path / 'write-busy.db'}"
    first, second = Database(url, metadata), Database(url, metadata)
    await first.create_schema()
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold_write_lock() -> None:
        async with first.transaction() as session:
            await session.execute(insert(items).values(id="first", value=1))
            holding.set()
            await release.wait()

    async def write_second() -> None:
        await second.write(lambda session: session.execute(insert(items).values(id="second", value=2)))

    longest_gap = 0.0

    async def tick() -> None:
        nonlocal longest_gap
        last = time.perf_counter()
        while not release.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            longest_gap, last = max(longest_gap, now - last), now

    holder = asyncio.create_task(hold_write_lock())
    try:
        await asyncio.wait_for(holding.wait(), TIMEOUT)
        ticker = asyncio.create_task(tick())
        writer = asyncio.create_task(write_second())
        await asyncio.sleep(HOLD_S)
        assert not writer.done()  # waiting for the lock, not failed
        release.set()
        await asyncio.wait_for(asyncio.gather(holder, writer, ticker), TIMEOUT)
        # Waiting for the lock on the loop thread would stall it for the whole hold; a loaded machine's
        # scheduling gaps stay well below that.
        assert longest_gap < 0.8 * HOLD_S, f"the event loop stalled for {longest_gap:.3f} s"
        rows = (await first.read(lambda session: session.execute(select(items.c.id, items.c.value).order_by(items.c.id)))).all()
        assert [tuple(r) for r in rows] == [("first", 1), ("second", 2)]
    finally:
        release.set()
        await asyncio.gather(holder, return_exceptions=True)
        await first.dispose()
        await second.dispose()


async def test_failed_write_transaction_leaves_nothing_and_frees_the_lock(
    database_url_factory: Callable[[str], str],
) -> None:
    metadata, items = _schema()
    db = Database(database_url_factory("rollback"), metadata)
    await db.create_schema()
    try:
        with pytest.raises(ValueError, match="domain refused"):
            async with db.transaction() as session:
                await session.execute(insert(items).values(id="a", value=1))
                raise ValueError("domain refused")
        async with db.transaction() as session:  # not stuck behind the failed one
            await session.execute(insert(items).values(id="b", value=2))
        assert list(await db.read(lambda session: session.scalars(select(items.c.id)))) == ["b"]
    finally:
        await db.dispose()


async def test_commits_on_the_loop_thread_leave_wal_checkpoints_to_their_own_thread(tmp_path: Any) -> None:
    """A checkpoint inside a COMMIT waits on fdatasync on the event-loop thread (tens of ms under load):
    the loop's write connection has automatic checkpoints off, a thread of the Database checkpoints
    instead, so the WAL does not grow without bound, and it ends with the Database."""
    metadata, items = _schema()
    path = tmp_path / "wal.db"
    db = Database(f"sqlite:///{path}", metadata)
    await db.create_schema()
    try:
        async with db.transaction() as session:
            await session.execute(insert(items).values(id="a", value=1))
            pragma = await session.execute(text("PRAGMA wal_autocheckpoint"))
            assert pragma.scalar() == 0
        checkpointer = db._checkpointer
        assert checkpointer is not None and checkpointer._thread.is_alive()
        for n in range(200):  # WAL frames for the checkpointer to move into the database file
            await db.write(lambda session: session.execute(insert(items).values(id=f"row-{n}", value=n)))
        # The thread's next tick moves every frame into the database file (polled, not slept on).
        deadline = time.monotonic() + TIMEOUT
        while not (
            checkpointer.last and checkpointer.last[1] > 0 and checkpointer.last[1] == checkpointer.last[2]
        ):
            assert time.monotonic() < deadline, f"no complete checkpoint: {checkpointer.last}"
            await asyncio.sleep(0.05)
        with sqlite3.connect(path) as outside:
            assert outside.execute("SELECT count(*) FROM items").fetchone() == (201,)
    finally:
        await db.dispose()
    assert not checkpointer._thread.is_alive()
