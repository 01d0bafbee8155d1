"""`Database.read_first` on PostgreSQL (shop_mesh/services/common/pg_reads.py): one autocommit SELECT
awaited on the event loop, no worker thread; a broken connection or an unreachable server behaves as
the read unit always did (reconnect, or the same error); a cancelled read leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
from sqlalchemy import (
    Connection,
    Table,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.exc import OperationalError

from shop_mesh.mesh.local import free_port
from shop_mesh.services.common import pg_reads
from shop_mesh.services.common.db import DB_THREADS, Database
from shop_mesh.services.common.interceptors import _is_transient_db_error
from tests.integration.test_fast_reads import _schema

pytestmark = pytest.mark.postgres


async def _database(url: str) -> tuple[Database, Table]:
    metadata, items = _schema()
    db = Database(url, metadata)
    await db.create_schema()
    await db.write(lambda session: session.execute(insert(items).values(id="a", value=7)))
    return db, items


def _count_units(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every read unit `db` runs (the fallback of read_first)."""
    units: list[str] = []
    read = db.read

    async def counted(fn: Any) -> Any:
        units.append("read")
        return await read(fn)

    monkeypatch.setattr(db, "read", counted)
    return units


async def test_read_first_is_one_statement_awaited_on_the_loop(
    postgres_url_factory: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, items = await _database(postgres_url_factory("pgfirst"))
    by_id = select(items.c.value).where(items.c.id == bindparam("id"))
    units = _count_units(db, monkeypatch)
    try:
        assert await db.read_first(by_id, {"id": "a"}) == (7,)  # opens the first connection
        hops: list[Any] = []
        monkeypatch.setattr(db, "_off_loop", lambda unit: hops.append(unit))
        for _ in range(5):
            assert await db.read_first(by_id, {"id": "a"}) == (7,)
        assert await db.read_first(by_id, {"id": "absent"}) is None
        assert hops == [] and units == []  # no worker thread, no read unit
    finally:
        await db.dispose()


async def test_a_connection_the_server_closed_is_dropped_or_falls_back(
    postgres_url_factory: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres_url_factory("pgkill")
    db, items = await _database(url)
    by_id = select(items.c.value).where(items.c.id == bindparam("id"))
    units = _count_units(db, monkeypatch)
    try:
        assert await db.read_first(by_id, {"id": "a"}) == (7,)
        # Every connection of the database ends (a server restart, an idle timeout, a failover).
        name = db.url.database
        admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
        try:
            admin.autocommit = True
            with admin.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
                )
        finally:
            admin.close()
        reads = db._pg_reads
        assert reads is not None
        # The loop sees the idle connection close and drops it (polled: another process's effect).
        for _ in range(250):
            if not reads._idle:
                break
            await asyncio.sleep(0.02)
        assert reads._open == 0
        assert await db.read_first(by_id, {"id": "a"}) == (7,)  # on a fresh connection
        assert units == [] and len(reads._idle) == 1
        # Closed while nobody watched it as idle (e.g. handed over): the read unit answers.
        (connection,) = reads._idle
        reads._unwatch(connection)
        connection.close()
        assert await db.read_first(by_id, {"id": "a"}) == (7,)
        assert units == ["read"]
    finally:
        await db.dispose()


async def test_an_unreachable_server_raises_what_a_read_unit_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    metadata, items = _schema()
    db = Database(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere", metadata)
    opened: list[Any] = []
    connect = pg_reads._connect

    def counted(*args: Any) -> Any:
        opened.append(args)
        return connect(*args)

    monkeypatch.setattr(pg_reads, "_connect", counted)
    by_id = select(items.c.value).where(items.c.id == bindparam("id"))
    try:
        for _ in range(3):
            with pytest.raises(OperationalError) as caught:
                await db.read_first(by_id, {"id": "a"})
            assert _is_transient_db_error(caught.value)  # UNAVAILABLE to the client, as before
        assert len(opened) == 1  # then straight to the read unit for CONNECT_BACKOFF_S
    finally:
        await db.dispose()


async def test_concurrent_reads_share_a_bounded_set_of_connections(
    postgres_url_factory: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, items = await _database(postgres_url_factory("pgmany"))
    by_id = select(items.c.value).where(items.c.id == bindparam("id"))
    units = _count_units(db, monkeypatch)
    try:
        results = await asyncio.gather(*(db.read_first(by_id, {"id": "a"}) for _ in range(40)))
        assert results == [(7,)] * 40
        reads = db._pg_reads
        assert reads is not None and 1 <= reads._open <= DB_THREADS and len(reads._idle) == reads._open
        assert units == []
    finally:
        await db.dispose()


async def test_a_cancelled_read_finishes_in_the_background_and_keeps_its_connection(
    postgres_url_factory: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that hangs up mid-read must not cost a reconnect (h2load's end of a run, deadlines)."""
    db, items = await _database(postgres_url_factory("pgcancel"))
    slow = select(items.c.value, func.pg_sleep(0.3)).where(items.c.id == bindparam("id"))
    by_id = select(items.c.value).where(items.c.id == bindparam("id"))
    units = _count_units(db, monkeypatch)
    try:
        assert await db.read_first(by_id, {"id": "a"}) == (7,)
        reads = db._pg_reads
        assert reads is not None
        (connection,) = reads._idle
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await db.read_first(slow, {"id": "a"})
        assert reads._idle == [] and reads._open == 1  # still busy with the abandoned statement
        assert await db.read_first(by_id, {"id": "a"}) == (7,)  # on a second connection
        await asyncio.wait_for(asyncio.gather(*reads._finishing), 5)  # the abandoned read ends
        assert connection in reads._idle and not connection.closed and reads._open == 2
        assert units == []
    finally:
        await db.dispose()


async def test_a_statement_is_prepared_once_per_connection(
    postgres_url_factory: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, items = await _database(postgres_url_factory("pgprep"))
    # A value of the statement's own (not the caller's) and a `%` psycopg2 would have to escape.
    by_id = select(items.c.value, items.c.value + 1, literal_column("'100%'")).where(
        items.c.id == bindparam("id"), items.c.value > 2
    )
    units = _count_units(db, monkeypatch)
    try:
        for _ in range(3):
            assert await db.read_first(by_id, {"id": "a"}) == (7, 8, "100%")
        reads = db._pg_reads
        assert reads is not None and [c.prepared for c in reads._idle] == [{"shop_read_0"}]
        # A connection that lost its statements (e.g. DISCARD ALL by a pooler) fails once, then the
        # read unit answers and the next connection prepares it again.
        reads._idle[0].prepared.clear()
        assert await db.read_first(by_id, {"id": "a"}) == (7, 8, "100%")
        assert units == ["read"]
        assert await db.read_first(by_id, {"id": "a"}) == (7, 8, "100%")
        assert units == ["read"]
    finally:
        await db.dispose()


async def test_read_units_run_in_autocommit_and_a_lost_connection_stays_transient(
    postgres_url_factory: Callable[[str], str],
) -> None:
    """A read unit on PostgreSQL sends no BEGIN / ROLLBACK (READ COMMITTED: every statement has its own
    snapshot either way); a connection lost inside one still raises the error that means UNAVAILABLE."""
    db, items = await _database(postgres_url_factory("pgunits"))

    def modes(session: Connection) -> tuple[bool, int, int]:
        first = session.execute(text("SELECT txid_current()")).scalar_one()
        second = session.execute(text("SELECT txid_current()")).scalar_one()
        return _autocommit(session), first, second

    def killed(session: Connection) -> Any:
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return session.execute(select(items.c.value)).scalar_one()

    try:
        autocommit, first, second = await db.read(modes)
        assert autocommit and second > first  # one transaction per statement
        # The pooled connection is handed back as it was taken: write units still get a transaction.
        assert await db.write(lambda session: _autocommit(session)) is False
        with pytest.raises(OperationalError) as caught:
            await db.read(killed)
        assert _is_transient_db_error(caught.value)
        assert await db.read(lambda session: session.execute(select(items.c.value)).scalar_one()) == 7
    finally:
        await db.dispose()


def _autocommit(session: Connection) -> bool:
    driver: Any = session.connection.driver_connection
    return bool(driver.autocommit)
