"""One AsyncEngine per process; a session per RPC. SQLite by default, PostgreSQL when configured.

Write transactions on SQLite start with BEGIN IMMEDIATE: a deferred transaction that reads and
then writes fails at once with SQLITE_BUSY when another writer committed in between, whereas an
immediate one waits for the lock (busy_timeout) and then sees the latest data.

Write transactions of one process on SQLite take turns on an asyncio lock before BEGIN IMMEDIATE.
Without it, concurrent writers all reach SQLite's busy handler, which polls the lock by sleeping
(1, 2, 5 … 100 ms): under load most of a saga's time was spent asleep there (docs/performance.md).
Waiting on the asyncio lock is FIFO and wakes the next writer the moment the lock is free; writers in
other processes (replicas on the same file) still meet the busy timeout as before.

On a SQLite file, reads and write transactions skip the async stack (AsyncSession, greenlet,
aiosqlite's thread hop: ~1.5-2 ms of event-loop CPU per statement on this machine) and run
synchronously on the event-loop thread through the stdlib driver: SQLite is a library in this
process, its statements are function calls of microseconds, not waits on a network. Both paths are
safe only because neither can wait for a lock on the loop thread for long:
- a read takes its WAL snapshot when it begins and no writer can block it afterwards (`read_now`);
- a write transaction first takes its turn on the process's asyncio lock, then BEGIN IMMEDIATE
  with a 10 ms busy timeout: once that succeeds the transaction holds SQLite's only write lock and
  none of its statements (nor COMMIT in WAL mode) waits for anybody.
If SQLite is still busy at BEGIN (a writer in another process or another `Database` on the same
file), the transaction runs on the async path instead, waiting up to the 30 s busy timeout on
aiosqlite's thread. PostgreSQL always uses the async path (asyncpg). Repositories see one API for
both, `DbSession` (docs/performance.md, "Synchronous SQLite").

`Database` is the adapter of the unit-of-work port (`unit_of_work.UnitOfWork`): domains see only
`read()` / `transaction()` and an opaque session; the fast reads (`read_now`, `read_first`) are for
the SQL read-model adapters of the services (e.g. user's GetUser, order's duplicate check).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Executable,
    MetaData,
    Result,
    ScalarResult,
    Select,
    Table,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import PoolProxiedConnection

from shop_mesh.services.common.metrics import observe_transaction
from shop_mesh.services.common.unit_of_work import Session

P = ParamSpec("P")
T = TypeVar("T")

# How long a statement on the event-loop thread may wait for a SQLite lock before it gives up and
# retries on the async path (which waits up to the full busy timeout on aiosqlite's thread instead).
FAST_BUSY_TIMEOUT_MS = 10
_BUSY_TIMEOUT_MS = 30_000

# Set while this task holds a write transaction: a nested one would wait for itself forever.
_in_write_transaction: contextvars.ContextVar[bool] = contextvars.ContextVar("in_write", default=False)


def _sqlite_pragmas(
    dbapi_conn: Any, busy_timeout_ms: int, *, query_only: bool = False, checkpoint_on_commit: bool = True
) -> None:
    # Let SQLAlchemy, not the driver, emit BEGIN (the documented pysqlite recipe).
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    if query_only:
        cursor.execute("PRAGMA query_only=ON")
    if not checkpoint_on_commit:
        cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


class _WalCheckpointer:
    """Checkpoints a SQLite file's WAL once a second on a thread of its own. The write connection on
    the event-loop thread has automatic checkpoints off: run inside a COMMIT, each one waited there on
    fdatasync (0.3-81 ms, every 1.5-3 s under CreateOrder load), stalling every call of the process
    (docs/performance.md). PASSIVE never waits for readers or writers."""

    INTERVAL_S = 1.0

    def __init__(self, path: str):
        self._path = path
        self._stop = threading.Event()
        # The last checkpoint's outcome (busy, frames in the WAL, frames checkpointed), for tests.
        self.last: tuple[int, int, int] | None = None
        self._thread = threading.Thread(target=self._run, name=f"wal-checkpoint {path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection = sqlite3.connect(self._path, timeout=30, check_same_thread=False)
        try:
            while not self._stop.wait(self.INTERVAL_S):
                # Busy (a concurrent checkpoint, WAL recovery): the next tick tries again.
                with contextlib.suppress(sqlite3.Error):
                    self.last = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class DbSession(ABC):
    """What repositories run statements on, inside `Database.read()` or `Database.transaction()`.

    The same API whether the statements run synchronously on the event-loop thread (SQLite file) or
    through an AsyncSession (PostgreSQL, in-memory SQLite, or SQLite busy at BEGIN): repositories
    and the domain do not know which. Results are buffered `Result`s either way.
    """

    dialect_name: str

    @abstractmethod
    async def execute(self, statement: Executable, params: Any = None) -> Result[Any]: ...

    async def scalar(self, statement: Executable, params: Any = None) -> Any:
        return (await self.execute(statement, params)).scalar()

    async def scalars(self, statement: Executable, params: Any = None) -> ScalarResult[Any]:
        return (await self.execute(statement, params)).scalars()

    @abstractmethod
    def begin_nested(self) -> AbstractAsyncContextManager[None]:
        """A SAVEPOINT: rolled back alone if the block raises; the transaction stays usable."""


class _SyncDbSession(DbSession):
    def __init__(self, connection: Connection):
        self._connection = connection
        self.dialect_name = connection.dialect.name

    async def execute(self, statement: Executable, params: Any = None) -> Result[Any]:
        return self._connection.execute(statement, params)

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        with self._connection.begin_nested():
            yield


class _AsyncDbSession(DbSession):
    def __init__(self, session: AsyncSession):
        self._session = session
        self.dialect_name = session.get_bind().dialect.name

    async def execute(self, statement: Executable, params: Any = None) -> Result[Any]:
        return await self._session.execute(statement, params)

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        async with self._session.begin_nested():
            yield


def db_session(session: Session) -> DbSession:
    """The unit-of-work port hands repositories an opaque `Session`; this adapter only ever creates
    `DbSession`s, so a repository narrows it here (a fake's session reaching SQL is a wiring bug)."""
    if not isinstance(session, DbSession):
        raise TypeError(f"expected a DbSession from Database, got {type(session).__name__}")
    return session


async def insert_unless_present(
    session: DbSession, table: Table, values: dict[str, Any], key: Sequence[Column[Any]]
) -> bool:
    """INSERT … ON CONFLICT (key) DO NOTHING; True if the row was inserted.

    The unique key decides, as with a SAVEPOINT around a plain INSERT, in one statement instead of
    three. A conflicting row is committed by the time this returns: SQLite holds the write lock,
    PostgreSQL waits for the other transaction.
    """
    result = await session.execute(_insert_unless_present(session.dialect_name, table, tuple(key)), values)
    return bool(result.rowcount)  # type: ignore[attr-defined]


@functools.cache
def _insert_unless_present(dialect_name: str, table: Table, key: tuple[Column[Any], ...]) -> Executable:
    # Built once per table: constructing a statement per call cost more than executing it.
    dialect_insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    return dialect_insert(table).on_conflict_do_nothing(index_elements=list(key))


class Database:
    def __init__(self, url: str, metadata: MetaData, *, echo: bool = False):
        self.url = make_url(url)
        self.metadata = metadata
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine: AsyncEngine = self._create_engine(echo)
        # On a SQLite file, two more engines on the same file, synchronous (stdlib sqlite3), used on
        # the event-loop thread: one read-only (`query_only`), one for write transactions. "One
        # engine per process" is about one pool per database; these exist because the async engine's
        # connections live on aiosqlite's worker threads and can only be reached by a thread hop per
        # statement, which is exactly the cost they remove. Both have a short busy timeout and are
        # disposed with the async engine.
        self._fast: Engine | None = self._create_fast_engine(echo, read_only=True)
        self._reads = _LoopConnections(self._fast, keep=4)
        # Write transactions take turns, so one connection serves them all.
        self._writes = _LoopConnections(self._create_fast_engine(echo, read_only=False), keep=1)
        self._checkpointer = _WalCheckpointer(str(self.url.database)) if self._fast is not None else None
        self._reader = async_sessionmaker(self.engine, expire_on_commit=False)
        writer_bind = self.engine.execution_options(begin_immediate=True) if self.is_sqlite else self.engine
        self._writer = async_sessionmaker(writer_bind, expire_on_commit=False)
        # SQLite has one writer at a time anyway; PostgreSQL writers run concurrently (row locks).
        self._write_turn: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None
        # `read_first` on SQLite: the statement compiled once, run on the driver (see there).
        self._first_reader: PoolProxiedConnection | None = None
        self._compiled_reads: dict[int, _CompiledRead] = {}

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

    def _create_fast_engine(self, echo: bool, *, read_only: bool) -> Engine | None:
        database = self.url.database
        if not self.is_sqlite or not database or database == ":memory:":
            return None  # PostgreSQL (asyncpg is efficient) or a private in-memory database
        fast = create_engine(
            self.url.set(drivername="sqlite+pysqlite"),
            echo=echo,
            connect_args={"timeout": FAST_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            # Checking out must never block the loop thread: a read held across a real await
            # takes another connection instead of waiting for one.
            max_overflow=-1,
        )

        @event.listens_for(fast, "connect")
        def _on_connect(dbapi_conn: Any, _: Any) -> None:
            # Writes on the loop thread leave checkpoints to _WalCheckpointer's thread.
            _sqlite_pragmas(
                dbapi_conn, FAST_BUSY_TIMEOUT_MS, query_only=read_only, checkpoint_on_commit=read_only
            )

        if not read_only:

            @event.listens_for(fast, "begin")
            def _on_fast_write_begin(conn: Any) -> None:
                # Straight on the driver, as for reads: the write lock now, or SQLITE_BUSY now.
                conn.connection.driver_connection.execute("BEGIN IMMEDIATE")

            return fast

        @event.listens_for(fast, "begin")
        def _on_fast_begin(conn: Any) -> None:
            # A deferred BEGIN straight on the driver (without a second trip through SQLAlchemy's
            # execute, ~1/4 of a point read), then the first read: it takes the WAL snapshot now,
            # so SQLITE_BUSY (rare: WAL recovery, the last connection closing) surfaces here, before
            # the caller's statements run, where falling back to the async path is still possible.
            driver = conn.connection.driver_connection
            driver.execute("BEGIN")
            driver.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()

        return fast

    async def create_schema(self) -> None:
        """Create missing tables (additive only; see docs/decisions.md on migrations)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[DbSession]:
        """A read transaction (one snapshot); nothing is committed."""
        connection = self._reads.begin()
        if connection is not None:
            try:
                yield _SyncDbSession(connection)
            finally:
                self._reads.finish(connection, commit=False)  # ends the read transaction
            return
        async with self._reader() as session:
            yield _AsyncDbSession(session)

    async def read_now(
        self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn(connection, *args, **kwargs)`, a short read, and return its result. `fn` gets a
        synchronous SQLAlchemy `Connection` inside a read transaction and must only read (SQLite
        connections here are `query_only`) and not hold on to rows or the connection.

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
          For those the fast connections have a busy timeout of FAST_BUSY_TIMEOUT_MS (10 ms),
          and if the read still gets SQLITE_BUSY (or any other OperationalError) it is retried once on
          the normal async path, whose 30 s busy timeout is spent on aiosqlite's thread, not the loop.

        Read-your-writes: every call begins a fresh read transaction (BEGIN, first SELECT takes the
        snapshot), so it sees every transaction committed before it started, by this process or
        another; `Database.transaction()` returns only after COMMIT, and with synchronous=NORMAL a
        commit is visible to other connections at once (NORMAL only relaxes durability on power loss).

        PostgreSQL (or an in-memory SQLite database, which a second engine could not share): the
        same `fn` runs through the async engine (`AsyncConnection.run_sync`), asyncpg being efficient.
        """
        connection = self._reads.begin()
        if connection is not None:
            try:
                return fn(connection, *args, **kwargs)
            except OperationalError:
                pass  # locked beyond the short timeout, or a real error: the async path decides
            finally:
                self._reads.finish(connection, commit=False)
        async with self.engine.connect() as aconn:
            return await aconn.run_sync(fn, *args, **kwargs)

    async def read_first(self, statement: Select[Any], params: dict[str, Any]) -> Sequence[Any] | None:
        """The first row of a one-statement read (a primary-key lookup), as a tuple in the order of
        the statement's columns, or None. For the hottest reads (GetUser, per order).

        SQLite: the statement is compiled once (keep it in a module constant: it is cached by
        identity) and runs as plain SQL on a dedicated driver connection on the event-loop thread,
        with SQLAlchemy's own result processors (e.g. DateTime parsing) applied to the row. One
        SELECT in autocommit mode is its own read transaction, so the snapshot rules of `read_now`
        hold; SQLITE_BUSY falls back to the async path as there. ~10x cheaper than `read_now`, whose
        cost is mostly SQLAlchemy's execution machinery around the driver's ~15 us.
        """
        if self._fast is not None:
            compiled = self._compiled_reads.get(id(statement))
            if compiled is None or compiled.statement is not statement:
                compiled = self._compiled_reads[id(statement)] = _CompiledRead(statement, self._fast.dialect)
            try:
                if self._first_reader is None:
                    # Checked out for good: a connection of its own, never inside another read's
                    # open transaction (whose older snapshot would break read-your-writes).
                    self._first_reader = self._fast.raw_connection()
                return compiled.first(self._first_reader.driver_connection, params)
            except sqlite3.OperationalError:
                pass  # as in read_now: the async path decides
        async with self.engine.connect() as aconn:
            row = (await aconn.execute(statement, params)).first()
        return None if row is None else tuple(row)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[DbSession]:
        """A write transaction: committed when the block ends, rolled back if it raises.

        Must not be nested (it raises instead of deadlocking) and must not await remote calls.
        Observed: latency, errors, and metric records that count only once it commits.
        """
        with observe_transaction():
            async with self._transaction() as session:
                yield session

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[DbSession]:
        """A write transaction: committed when the block ends, rolled back if it raises.

        Must not be nested (it raises instead of deadlocking) and must not await remote calls.
        """
        if _in_write_transaction.get():
            raise RuntimeError("nested write transaction")
        token = _in_write_transaction.set(True)
        try:
            async with self._write_turn or nullcontext():
                connection = self._writes.begin()
                if connection is not None:
                    try:
                        yield _SyncDbSession(connection)
                    except BaseException:
                        self._writes.finish(connection, commit=False)
                        raise
                    self._writes.finish(connection, commit=True)
                else:
                    async with self._writer() as session, session.begin():
                        yield _AsyncDbSession(session)
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
        if self._first_reader is not None:
            self._first_reader.close()
            self._first_reader = None
        self._reads.close()
        self._writes.close()
        await self.engine.dispose()
        if self._checkpointer is not None:
            self._checkpointer.stop()


def _on_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get("begin_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class _LoopConnections:
    """Open connections of a synchronous SQLite engine, reused on the event-loop thread: checking
    one out of the pool and back in (with its reset) per transaction cost about as much as a
    statement. A read that awaits something else meanwhile simply gets another connection.
    Without an engine (PostgreSQL, in-memory SQLite) it has nothing to give: the async path runs."""

    def __init__(self, engine: Engine | None, *, keep: int):
        self._engine = engine
        self._keep = keep
        self._idle: list[Connection] = []

    def begin(self) -> Connection | None:
        """A connection with its transaction begun, or None if there is no engine or SQLite stayed
        busy for the short timeout (the caller takes the async path instead)."""
        if self._engine is None:
            return None
        connection = self._idle.pop() if self._idle else self._engine.connect()
        try:
            connection.begin()
        except (OperationalError, sqlite3.OperationalError):  # the begin hooks call the driver directly
            connection.close()
            return None
        return connection

    def finish(self, connection: Connection, *, commit: bool) -> None:
        try:
            if commit:
                connection.commit()
            else:
                connection.rollback()
        except BaseException:
            connection.close()  # rolls back whatever is left; not reused
            raise
        if len(self._idle) < self._keep:
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        if self._engine is not None:
            self._engine.dispose()


class _CompiledRead:
    """A SELECT compiled once for the SQLite driver: SQL text, parameter order, result processors."""

    def __init__(self, statement: Select[Any], dialect: Any):
        self.statement = statement  # kept alive, so its id() is not reused while cached
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self.param_names = list(compiled.positiontup or ())
        self.processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.selected_columns
        ]

    def first(self, driver: Any, params: dict[str, Any]) -> tuple[Any, ...] | None:
        row = driver.execute(self.sql, [params[name] for name in self.param_names]).fetchone()
        if row is None:
            return None
        return tuple(value if p is None else p(value) for p, value in zip(self.processors, row, strict=True))
