"""One AsyncEngine per process; a session per RPC. SQLite by default, PostgreSQL when configured.

Write transactions on SQLite start with BEGIN IMMEDIATE: a deferred transaction that reads and
then writes fails at once with SQLITE_BUSY when another writer committed in between, whereas an
immediate one waits for the lock (busy_timeout) and then sees the latest data.

Write transactions of one process on SQLite take turns on an asyncio lock before BEGIN IMMEDIATE.
Without it, concurrent writers all reach SQLite's busy handler, which polls the lock by sleeping
(1, 2, 5 … 100 ms): under load most of a saga's time was spent asleep there (docs/performance.md).
Waiting on the asyncio lock is FIFO and wakes the next writer the moment the lock is free; writers in
other processes (replicas on the same file) still meet the busy timeout as before.

Hot point reads (`Database.read_now`) on SQLite skip the async stack and run synchronously on the
event-loop thread; see its docstring for why that cannot stall the loop (docs/performance.md,
"Hot reads", has the measurements).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Column, Connection, Engine, MetaData, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

P = ParamSpec("P")
T = TypeVar("T")

# How long a read on the event-loop thread may wait for a SQLite lock before it gives up and retries
# on the async path (which waits up to the full busy timeout on aiosqlite's thread instead).
FAST_READ_BUSY_TIMEOUT_MS = 10
_BUSY_TIMEOUT_MS = 30_000

# Set while this task holds a write transaction: a nested one would wait for itself forever.
_in_write_transaction: contextvars.ContextVar[bool] = contextvars.ContextVar("in_write", default=False)


def _sqlite_pragmas(dbapi_conn: Any, busy_timeout_ms: int, *, query_only: bool = False) -> None:
    # Let SQLAlchemy, not the driver, emit BEGIN (the documented pysqlite recipe).
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    if query_only:
        cursor.execute("PRAGMA query_only=ON")
    cursor.close()


async def insert_unless_present(
    session: AsyncSession, table: Table, values: dict[str, Any], key: Sequence[Column[Any]]
) -> bool:
    """INSERT … ON CONFLICT (key) DO NOTHING; True if the row was inserted.

    The unique key decides, as with a SAVEPOINT around a plain INSERT, in one statement instead of
    three. A conflicting row is committed by the time this returns: SQLite holds the write lock,
    PostgreSQL waits for the other transaction.
    """
    dialect_insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    result = await session.execute(
        dialect_insert(table).values(**values).on_conflict_do_nothing(index_elements=list(key))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


class Database:
    def __init__(self, url: str, metadata: MetaData, *, echo: bool = False):
        self.url = make_url(url)
        self.metadata = metadata
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine: AsyncEngine = self._create_engine(echo)
        # A second, synchronous engine on the same SQLite file, for `read_now` only. "One engine per
        # process" is about one pool per database; this one exists because the async engine's
        # connections live on aiosqlite's worker threads and can only be reached by a thread hop per
        # statement, which is exactly the cost the fast path removes. It is read-only
        # (query_only), has a short busy timeout and is disposed with the async engine.
        self._fast: Engine | None = self._create_fast_engine(echo)
        self._reader = async_sessionmaker(self.engine, expire_on_commit=False)
        writer_bind = self.engine.execution_options(begin_immediate=True) if self.is_sqlite else self.engine
        self._writer = async_sessionmaker(writer_bind, expire_on_commit=False)
        # SQLite has one writer at a time anyway; PostgreSQL writers run concurrently (row locks).
        self._write_turn: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None

    def _create_engine(self, echo: bool) -> AsyncEngine:
        if not self.is_sqlite:
            return create_async_engine(
                self.url, echo=echo, pool_size=10, max_overflow=10, pool_pre_ping=True, pool_timeout=5
            )
        database = self.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self.url, echo=echo, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _: Any) -> None:
            _sqlite_pragmas(dbapi_conn, _BUSY_TIMEOUT_MS)

        event.listen(engine.sync_engine, "begin", _on_begin)
        return engine

    def _create_fast_engine(self, echo: bool) -> Engine | None:
        database = self.url.database
        if not self.is_sqlite or not database or database == ":memory:":
            return None  # PostgreSQL (asyncpg is efficient) or a private in-memory database
        # The stdlib driver on the same file. The pool hands a connection to one read at a time;
        # reads never await, so on one event loop a single connection is ever checked out.
        fast = create_engine(
            self.url.set(drivername="sqlite+pysqlite"),
            echo=echo,
            connect_args={"timeout": FAST_READ_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )

        @event.listens_for(fast, "connect")
        def _on_connect(dbapi_conn: Any, _: Any) -> None:
            _sqlite_pragmas(dbapi_conn, FAST_READ_BUSY_TIMEOUT_MS, query_only=True)

        @event.listens_for(fast, "begin")
        def _on_fast_begin(conn: Any) -> None:
            # A deferred BEGIN straight on the driver: a consistent snapshot for all of `fn`'s
            # statements, without a second trip through SQLAlchemy's execute (~1/4 of the read).
            conn.connection.driver_connection.execute("BEGIN")

        return fast

    async def create_schema(self) -> None:
        """Create missing tables (additive only; see docs/decisions.md on migrations)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads; nothing is committed."""
        async with self._reader() as session:
            yield session

    async def read_now(
        self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn(connection, *args, **kwargs)`, a short read (e.g. a primary-key lookup), and return
        its result. `fn` gets a synchronous SQLAlchemy `Connection` inside a read transaction and must
        only read (SQLite connections here are `query_only`) and not hold on to rows or the connection.

        SQLite: `fn` runs right here, on the event-loop thread, on a connection of the sync engine
        (stdlib sqlite3). That is 3-4x cheaper in CPU than the AsyncSession + aiosqlite path (one
        thread hop per statement, greenlet bridging) and it cannot stall the loop for long because:

        - in WAL mode readers take no lock that a writer holds: a reader reads the database file plus
          the WAL up to the last commit it saw when its read transaction began, so an open write
          transaction (BEGIN IMMEDIATE on another connection, thread or process) never blocks it;
        - checkpoints do not block readers either: the automatic checkpoint (wal_autocheckpoint) is
          PASSIVE (it copies only what no reader still needs and never waits), and even a FULL/
          RESTART/TRUNCATE checkpoint waits *for* readers, it does not make them wait;
        - what is left are rare, short exclusive moments (WAL recovery after a crash, the last
          connection of a process closing and deleting the -wal/-shm files, a journal-mode change).
          For those the fast connections have a busy timeout of FAST_READ_BUSY_TIMEOUT_MS (10 ms),
          and if the read still gets SQLITE_BUSY (or any other OperationalError) it is retried once on
          the normal async path, whose 30 s busy timeout is spent on aiosqlite's thread, not the loop.

        Read-your-writes: every call begins a fresh read transaction (BEGIN, first SELECT takes the
        snapshot), so it sees every transaction committed before it started, by this process or
        another; `Database.transaction()` returns only after COMMIT, and with synchronous=NORMAL a
        commit is visible to other connections at once (NORMAL only relaxes durability on power loss).

        PostgreSQL (or an in-memory SQLite database, which a second engine could not share): the
        same `fn` runs through the async engine (`AsyncConnection.run_sync`), asyncpg being efficient.
        """
        fast = self._fast
        if fast is not None:
            try:
                with fast.connect() as conn:
                    return fn(conn, *args, **kwargs)
            except OperationalError:
                pass  # locked beyond the short timeout, or a real error: the async path decides
        async with self.engine.connect() as aconn:
            return await aconn.run_sync(fn, *args, **kwargs)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: committed when the block ends, rolled back if it raises.

        Must not be nested (it raises instead of deadlocking) and must not await remote calls.
        """
        if _in_write_transaction.get():
            raise RuntimeError("nested write transaction")
        token = _in_write_transaction.set(True)
        try:
            async with self._write_turn or nullcontext(), self._writer() as session, session.begin():
                yield session
        finally:
            _in_write_transaction.reset(token)

    async def ping(self, timeout: float = 2.0) -> bool:
        try:
            async with asyncio.timeout(timeout), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        if self._fast is not None:
            self._fast.dispose()
        await self.engine.dispose()


def _on_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get("begin_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
