"""The execution policy of units (`Database.read(fn)`, `write(fn)`, `read_first`): where a unit runs
(SQLite: inline on the event-loop thread when it can start at once, else on a worker thread;
PostgreSQL: always on a worker thread), read-your-writes, a unit's exception rolling back, and never
failing or stalling the event loop because of a concurrent writer, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
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
    Executable,
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


def _value(items: Table, item_id: str = "a") -> Callable[[Connection], int | None]:
    def read(conn: Connection) -> int | None:
        row = conn.execute(select(items.c.value).where(items.c.id == item_id)).first()
        return None if row is None else int(row.value)

    return read


def _run(statement: Executable) -> Callable[[Connection], None]:
    def unit(session: Connection) -> None:
        session.execute(statement)

    return unit


def _on_thread(threads: list[int], fn: Callable[[Connection], Any]) -> Callable[[Connection], Any]:
    """`fn`, recording the thread it runs on."""

    def unit(session: Connection) -> Any:
        threads.append(threading.get_ident())
        return fn(session)

    return unit


async def test_units_run_where_the_policy_says(database_url_factory: Callable[[str], str]) -> None:
    """SQLite: a unit that can start at once runs inline on the event-loop thread (a thread hop would
    cost more than the unit). PostgreSQL: every unit runs on a worker thread, whole, one hop."""
    metadata, items = _schema()
    db = Database(database_url_factory("where"), metadata)
    await db.create_schema()
    loop_thread = threading.get_ident()
    threads: list[int] = []
    try:
        await db.write(_on_thread(threads, lambda s: s.execute(insert(items).values(id="a", value=1))))
        assert await db.read(_on_thread(threads, _value(items))) == 1
        assert await db.read_first(
            select(items.c.value).where(items.c.id == bindparam("id")), {"id": "a"}
        ) == (1,)
        if db.is_sqlite:
            assert threads == [loop_thread, loop_thread]
        else:
            assert len(threads) == 2 and loop_thread not in threads
    finally:
        await db.dispose()


async def test_in_memory_sqlite_runs_every_unit_inline_on_its_one_connection() -> None:
    metadata, items = _schema()
    db = Database("sqlite://", metadata)
    await db.create_schema()
    threads: list[int] = []
    try:
        await db.write(_on_thread(threads, lambda s: s.execute(insert(items).values(id="a", value=3))))
        with pytest.raises(ValueError, match="refused"):
            await db.write(_on_thread(threads, _insert_then_refuse(items)))
        assert await db.read(_on_thread(threads, _value(items))) == 3
        assert await db.read(_on_thread(threads, _value(items, "b"))) is None  # rolled back
        assert await db.read_first(
            select(items.c.value).where(items.c.id == bindparam("id")), {"id": "a"}
        ) == (3,)
        assert set(threads) == {threading.get_ident()}
    finally:
        await db.dispose()


def _insert_then_refuse(items: Table) -> Callable[[Connection], None]:
    def unit(session: Connection) -> None:
        session.execute(insert(items).values(id="b", value=2))
        raise ValueError("domain refused")

    return unit


async def test_a_read_unit_sees_every_committed_write(database_url_factory: Callable[[str], str]) -> None:
    metadata, items = _schema()
    url = database_url_factory("ryw")
    db, other = Database(url, metadata), Database(url, metadata)  # `other`: another replica
    await db.create_schema()
    read = _value(items)
    try:
        assert await db.read(read) is None
        for i in range(20):
            writer = db if i % 2 else other
            if i == 0:
                await writer.write(lambda session: session.execute(insert(items).values(id="a", value=0)))
            else:
                statement = update(items).where(items.c.id == "a").values(value=i)
                await writer.write(_run(statement))
            assert await db.read(read) == i  # at once, with no retry
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
    # Another replica's write transaction stays open (on SQLite BEGIN IMMEDIATE: the write lock). Its
    # statements are run right here: uncontended, they return at once.
    holder = writer.engine.connect().execution_options(begin_immediate=True)
    try:
        holder.begin()
        holder.execute(update(items).where(items.c.id == "a").values(value=2))
        slowest = 0.0
        for _ in range(200):
            started = time.perf_counter()
            assert await db.read(read) == 1  # the committed value, not the pending one
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.5, f"a read waited {slowest:.3f} s for a writer"
        holder.commit()
        assert await db.read(read) == 2
    finally:
        holder.close()
        await db.dispose()
        await writer.dispose()


async def test_a_read_that_finds_sqlite_busy_at_begin_runs_on_a_worker_thread(tmp_path: Any) -> None:
    metadata, items = _schema()
    db = Database(f"sqlite:///{tmp_path / 'fallback.db'}", metadata)
    await db.create_schema()
    await db.write(lambda session: session.execute(insert(items).values(id="a", value=7)))
    inline_attempts = 0

    def locked(*_: Any) -> None:
        nonlocal inline_attempts
        inline_attempts += 1
        raise sqlite3.OperationalError("database is locked")

    inline_reads = db._reads._engine
    assert inline_reads is not None
    event.listen(inline_reads, "begin", locked)  # as SQLITE_BUSY at BEGIN (WAL recovery) would
    threads: list[int] = []
    try:
        assert await db.read(_on_thread(threads, _value(items))) == 7
        assert inline_attempts == 1
        assert threads != [threading.get_ident()]
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
            if i == 0:
                await writer.write(
                    lambda session: session.execute(insert(stamps).values(id="a", value=0, at=at))
                )
            else:
                statement = update(stamps).where(stamps.c.id == "a").values(value=i)
                await writer.write(_run(statement))
            value, got_at = await db.read_first(by_id, {"id": "a"}) or (None, None)
            assert value == i
            # The column's own type conversion applies (SQLite stores text): a datetime comes back.
            assert isinstance(got_at, datetime)
            assert got_at.replace(tzinfo=UTC) == at
    finally:
        await db.dispose()
        await other.dispose()


async def test_read_first_runs_on_a_worker_thread_when_sqlite_is_busy(
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
        assert await db.read_first(
            select(items.c.value).where(items.c.id == bindparam("id")), {"id": "a"}
        ) == (7,)
        assert attempts == 1
    finally:
        await db.dispose()


HOLD_S = 1.0  # how long the other process keeps SQLite's write lock

_HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
connection.execute("INSERT INTO items (id, value) VALUES ('first', 1)")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("COMMIT")
"""


async def test_a_write_unit_that_finds_the_file_locked_by_another_process_waits_off_the_loop(
    tmp_path: Any,
) -> None:
    """While another process holds SQLite's write lock, a write unit gives up on the loop thread after
    the short busy timeout, runs on a worker thread instead (30 s busy timeout) and commits once the
    lock is free; the loop keeps serving meanwhile (a timer keeps ticking). (SQLite only: PostgreSQL
    units always run on a worker, and writers of different rows do not wait for each other.)"""
    metadata, items = _schema()
    path = tmp_path / "write-busy.db"
    db = Database(f"sqlite:///{path}", metadata)
    await db.create_schema()
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLD_LOCK, str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert other.stdin is not None and other.stdout is not None
    threads: list[int] = []
    longest_gap = 0.0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal longest_gap
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            longest_gap, last = max(longest_gap, now - last), now

    try:
        assert await asyncio.wait_for(other.stdout.readline(), TIMEOUT) == b"locked\n"
        ticker = asyncio.create_task(tick())
        writer = asyncio.create_task(
            db.write(_on_thread(threads, lambda s: s.execute(insert(items).values(id="second", value=2))))
        )
        await asyncio.sleep(HOLD_S)
        assert not writer.done()  # waiting for the lock, not failed
        other.stdin.write(b"\n")
        await other.stdin.drain()
        await asyncio.wait_for(writer, TIMEOUT)
        done.set()
        await ticker
        assert threads and threads[0] != threading.get_ident()  # the unit ran on a worker thread
        # Waiting for the lock on the loop thread would stall it for the whole hold; a loaded machine's
        # scheduling gaps stay well below that.
        assert longest_gap < 0.8 * HOLD_S, f"the event loop stalled for {longest_gap:.3f} s"
        query = select(items.c.id, items.c.value).order_by(items.c.id)
        rows = await db.read(lambda session: [tuple(r) for r in session.execute(query)])
        assert rows == [("first", 1), ("second", 2)]
    finally:
        done.set()
        if other.returncode is None:
            other.kill()
        await asyncio.wait_for(other.wait(), TIMEOUT)
        await db.dispose()


async def test_failed_write_transaction_leaves_nothing_and_frees_the_lock(
    database_url_factory: Callable[[str], str],
) -> None:
    metadata, items = _schema()
    db = Database(database_url_factory("rollback"), metadata)
    await db.create_schema()
    try:
        with pytest.raises(ValueError, match="domain refused"):
            await db.write(_insert_then_refuse(items))
        # Not stuck behind the failed one.
        await db.write(lambda session: session.execute(insert(items).values(id="c", value=3)))
        assert await db.read(lambda session: list(session.scalars(select(items.c.id)))) == ["c"]
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

        def write(session: Connection) -> Any:
            session.execute(insert(items).values(id="a", value=1))
            return session.execute(text("PRAGMA wal_autocheckpoint")).scalar()

        assert await db.write(write) == 0
        checkpointer = db._checkpointer
        assert checkpointer is not None and checkpointer._thread.is_alive()
        for n in range(200):  # WAL frames for the checkpointer to move into the database file
            await db.write(_run(insert(items).values(id=f"row-{n}", value=n)))
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
