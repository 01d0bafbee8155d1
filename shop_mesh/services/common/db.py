"""The unit-of-work adapter: one persistence path for SQLite and PostgreSQL.

A unit (one transaction) is a plain synchronous function of a SQLAlchemy Core `Connection`:

    order = await db.read(lambda session: SqlOrderRepository(session).get(order_id))
    await db.write(body)   # body(session) runs in one write transaction, committed when it returns

Every backend runs the same repositories on the same synchronous driver API (stdlib sqlite3,
psycopg2): no async twins, no AsyncSession, no statement that pretends to await. What differs is
only WHERE a whole unit runs, decided here by the execution policy (docs/decisions.md, "One
persistence path"):

- PostgreSQL: on a worker thread (`DB_THREADS`, the pool sized to match), one thread hop per unit,
  never one per statement. The loop thread never waits on the network. `read_first` (one SELECT)
  hops nowhere: it is sent on an asynchronous psycopg2 connection and awaited on the loop (pg_reads.py).
- SQLite file: inline on the event-loop thread when the unit can start at once, else on a worker
  thread. SQLite is a library in this process; its statements are function calls of microseconds,
  and a thread hop per unit costs more than the unit (35-45 % of GetUser in session 5). Inline
  cannot stall the loop for long because no statement of an inline unit can wait for anybody:
  - a read begins (BEGIN, then a first SELECT) and so takes its WAL snapshot at once; in WAL mode no
    writer can block a reader afterwards, and checkpoints never make readers wait;
  - a write first takes its turn on the process's asyncio write lock (FIFO: the next writer wakes the
    moment the lock is free, instead of polling SQLite's busy handler, which sleeps 1, 2, 5 … 100 ms),
    then BEGIN IMMEDIATE with a FAST_BUSY_TIMEOUT_MS (10 ms) busy timeout. Once that succeeded the unit
    holds SQLite's only write lock, and none of its statements (nor COMMIT in WAL mode, with the
    automatic checkpoint moved to `_WalCheckpointer`'s thread) waits for anybody.
  If the BEGIN does not succeed within those 10 ms (a writer in another process, another `Database`
  on the same file, WAL recovery), the whole unit runs on a worker thread instead, with a 30 s busy
  timeout. BEGIN IMMEDIATE (not a deferred BEGIN) because a deferred transaction that reads and then
  writes fails at once with SQLITE_BUSY when another writer committed in between.
- In-memory SQLite (tests): inline, on its one connection. Inline units never interleave (a unit has
  no await in it), so one connection serves them all.

A unit must not hold on to rows or the connection after it returns. Results are buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Executable,
    MetaData,
    Select,
    Table,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import PoolProxiedConnection, StaticPool

from shop_mesh.services.common.metrics import observe_transaction
from shop_mesh.services.common.unit_of_work import Session

if TYPE_CHECKING:
    from shop_mesh.services.common.pg_reads import PgPointReads

R = TypeVar("R")

# How long BEGIN on the event-loop thread may wait for a SQLite lock before the unit moves to a
# worker thread (which waits up to the full busy timeout there instead).
FAST_BUSY_TIMEOUT_MS = 10
_BUSY_TIMEOUT_MS = 30_000
# Worker threads per process for units off the loop (PostgreSQL, busy SQLite); the PostgreSQL pool has
# as many connections. 2-4 threads measured alike on 2 cores (docs/performance.md).
DB_THREADS = 4

_PG_CONNECT_TIMEOUT_S = 5
_PG_CONNECT_ARGS = {"connect_timeout": _PG_CONNECT_TIMEOUT_S}

# Set while this task runs a write unit: a nested one would wait for itself forever.
_in_write_transaction: contextvars.ContextVar[bool] = contextvars.ContextVar("in_write", default=False)


def sync_url(url: str | URL) -> URL:
    """The URL on this module's drivers: pysqlite for SQLite, psycopg2 for PostgreSQL. A URL that
    names another driver of the same database (`sqlite+aiosqlite`, `postgresql+asyncpg`: older
    configurations and secrets) means the same database, so it is accepted and mapped."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+pysqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg2")
    raise ValueError(f"unsupported database backend {backend!r} (sqlite or postgresql)")


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


def db_session(session: Session) -> Connection:
    """The unit-of-work port hands repositories an opaque `Session`; this adapter's units get a
    SQLAlchemy `Connection` in a transaction, so a repository narrows it here (a fake's session
    reaching SQL is a wiring bug)."""
    if not isinstance(session, Connection):
        raise TypeError(f"expected a Connection from Database, got {type(session).__name__}")
    return session


def insert_unless_present(
    session: Connection, table: Table, values: dict[str, Any], key: Sequence[Column[Any]]
) -> bool:
    """INSERT … ON CONFLICT (key) DO NOTHING; True if the row was inserted.

    The unique key decides, as with a SAVEPOINT around a plain INSERT, in one statement instead of
    three. A conflicting row is committed by the time this returns: SQLite holds the write lock,
    PostgreSQL waits for the other transaction.
    """
    result = session.execute(_insert_unless_present(session.dialect.name, table, tuple(key)), values)
    return bool(result.rowcount)


@functools.cache
def _insert_unless_present(dialect_name: str, table: Table, key: tuple[Column[Any], ...]) -> Executable:
    # Built once per table: constructing a statement per call cost more than executing it.
    dialect_insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    return dialect_insert(table).on_conflict_do_nothing(index_elements=list(key))


class Database:
    """The `unit_of_work.UnitOfWork[Session]` adapter: `read(fn)` / `write(fn)` run `fn(session)` in
    one transaction where the execution policy (module docstring) says."""

    def __init__(self, url: str, metadata: MetaData, *, echo: bool = False):
        self.url = sync_url(url)
        self.metadata = metadata
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        database = self.url.database
        in_memory = self.is_sqlite and (not database or database == ":memory:")
        self.engine: Engine = self._create_engine(echo, in_memory=in_memory)
        self._executor = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="db-unit")
        # Units that run inline on the event-loop thread take connections from these; without an
        # inline engine (PostgreSQL) they have nothing to give and every unit runs on a worker.
        inline_reads: Engine | None = None
        inline_writes: Engine | None = None
        self._checkpointer: _WalCheckpointer | None = None
        if in_memory:
            inline_reads = self.engine
            inline_writes = self.engine.execution_options(begin_immediate=True)
        elif self.is_sqlite:
            # Two more engines on the same file, with the short busy timeout: one read-only
            # (`query_only`), one for write units. They exist because their BEGIN must give up after
            # 10 ms on the loop thread, where the main engine's waits up to 30 s on a worker.
            inline_reads = self._create_inline_engine(echo, read_only=True)
            inline_writes = self._create_inline_engine(echo, read_only=False)
            self._checkpointer = _WalCheckpointer(str(database))
        self._reads = _LoopConnections(inline_reads, keep=4)
        # Write units take turns, so one connection serves them all.
        self._writes = _LoopConnections(inline_writes, keep=1)
        self._writer = self.engine.execution_options(begin_immediate=True) if self.is_sqlite else self.engine
        # SQLite has one writer at a time anyway; PostgreSQL writers run concurrently (row locks).
        self._write_turn: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None
        # `read_first` inline on SQLite: the statement compiled once, run on the driver (see there).
        self._first_engine = inline_reads if inline_reads is not None and not in_memory else None
        self._first_reader: PoolProxiedConnection | None = None
        self._compiled_reads: dict[int, _CompiledRead] = {}
        # `read_first` on PostgreSQL: one autocommit SELECT awaited on the loop (pg_reads.py).
        self._pg_reads: PgPointReads | None = None
        if not self.is_sqlite:
            self._pg_reads = _pg_point_reads(self.engine, self._executor)

    def _create_engine(self, echo: bool, *, in_memory: bool) -> Engine:
        if not self.is_sqlite:
            return create_engine(
                self.url,
                echo=echo,
                # One connection per worker thread: no unit ever waits for the pool.
                pool_size=DB_THREADS,
                max_overflow=0,
                pool_pre_ping=True,
                pool_timeout=5,
                connect_args=_PG_CONNECT_ARGS,
            )
        if in_memory:
            engine = create_engine(
                self.url,
                echo=echo,
                poolclass=StaticPool,  # one private database lives as long as its one connection
                connect_args={"check_same_thread": False},
            )
        else:
            Path(str(self.url.database)).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                self.url,
                echo=echo,
                connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
                pool_size=DB_THREADS,
            )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _: Any) -> None:
            _sqlite_pragmas(dbapi_conn, _BUSY_TIMEOUT_MS)

        event.listen(engine, "begin", _on_begin)
        return engine

    def _create_inline_engine(self, echo: bool, *, read_only: bool) -> Engine:
        inline = create_engine(
            self.url,
            echo=echo,
            connect_args={"timeout": FAST_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            # Checking out must never block the loop thread.
            max_overflow=-1,
        )

        @event.listens_for(inline, "connect")
        def _on_connect(dbapi_conn: Any, _: Any) -> None:
            # Writes on the loop thread leave checkpoints to _WalCheckpointer's thread.
            _sqlite_pragmas(
                dbapi_conn, FAST_BUSY_TIMEOUT_MS, query_only=read_only, checkpoint_on_commit=read_only
            )

        if not read_only:

            @event.listens_for(inline, "begin")
            def _on_inline_write_begin(conn: Any) -> None:
                # Straight on the driver, as for reads: the write lock now, or SQLITE_BUSY now.
                conn.connection.driver_connection.execute("BEGIN IMMEDIATE")

            return inline

        @event.listens_for(inline, "begin")
        def _on_inline_read_begin(conn: Any) -> None:
            # A deferred BEGIN straight on the driver (without a second trip through SQLAlchemy's
            # execute, ~1/4 of a point read), then the first read: it takes the WAL snapshot now,
            # so SQLITE_BUSY (rare: WAL recovery, the last connection closing) surfaces here, before
            # the unit runs, where moving it to a worker thread is still possible.
            driver = conn.connection.driver_connection
            driver.execute("BEGIN")
            driver.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()

        return inline

    async def _off_loop(self, unit: Callable[[], R]) -> R:
        # The unit sees this task's context variables (after-commit records, the nesting guard). A
        # caller cancelled meanwhile does not stop it: the unit commits or rolls back on the worker.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, unit)

    async def create_schema(self) -> None:
        """Create missing tables (additive only; see docs/decisions.md on migrations)."""
        await self._off_loop(functools.partial(self.metadata.create_all, self.engine))

    async def read(self, fn: Callable[[Connection], R]) -> R:
        """`fn(session)` in one read transaction (on SQLite one snapshot; on PostgreSQL autocommit, each
        statement its own READ COMMITTED snapshot, as inside a transaction); nothing is committed.

        Read-your-writes: every unit begins a fresh read transaction, so it sees every transaction
        committed before it started, by this process or another (`write` returns after COMMIT)."""
        connection = self._reads.begin()
        if connection is None:
            return await self._off_loop(functools.partial(self._read_unit, fn))
        try:
            return fn(connection)
        finally:
            self._reads.finish(connection, commit=False)  # ends the read transaction

    def _read_unit(self, fn: Callable[[Connection], R]) -> R:
        with self.engine.connect() as connection:
            if self.is_sqlite:
                return fn(connection)  # closing rolls the read transaction back: nothing to keep
            # PostgreSQL: in autocommit. At READ COMMITTED (the default) each statement takes a
            # snapshot of its own inside a transaction too, so BEGIN and ROLLBACK were two round
            # trips per read unit that bought nothing (docs/performance.md, session 7). Set on the
            # driver: SQLAlchemy's AUTOCOMMIT isolation level costs two SET statements per unit.
            driver: Any = connection.connection.driver_connection
            driver.autocommit = True
            try:
                return fn(connection)
            finally:
                if not driver.closed:  # closed: a lost connection, whose error must not be masked
                    driver.autocommit = False

    async def write(self, fn: Callable[[Connection], R]) -> R:
        """`fn(session)` in one write transaction: committed when it returns, rolled back if it raises.

        Observed: latency, errors, and metric records (`metrics.on_commit`) that count only once it
        commits. A unit has no await in it, so it can neither nest another write unit nor make a
        remote call while it holds the database's locks."""
        if _in_write_transaction.get():
            raise RuntimeError("nested write transaction")
        token = _in_write_transaction.set(True)
        try:
            with observe_transaction():
                if self._write_turn is None:
                    return await self._off_loop(functools.partial(self._write_unit, fn))
                async with self._write_turn:
                    connection = self._writes.begin()
                    if connection is None:  # busy for 10 ms: wait for the lock on a worker thread
                        return await self._off_loop(functools.partial(self._write_unit, fn))
                    try:
                        result = fn(connection)
                    except BaseException:
                        self._writes.finish(connection, commit=False)
                        raise
                    self._writes.finish(connection, commit=True)
                    return result
        finally:
            _in_write_transaction.reset(token)

    def _write_unit(self, fn: Callable[[Connection], R]) -> R:
        with self._writer.begin() as connection:
            return fn(connection)

    async def read_first(self, statement: Select[Any], params: dict[str, Any]) -> Sequence[Any] | None:
        """The first row of a one-statement read (a primary-key lookup), as a tuple in the order of
        the statement's columns, or None: a read unit of one statement, for the hottest reads
        (GetUser). Keep the statement in a module constant: the inline path caches it by identity.

        SQLite file, inline: the statement is compiled once and runs as plain SQL on a dedicated
        driver connection, with SQLAlchemy's own result processors (e.g. DateTime parsing) applied to
        the row. One SELECT in autocommit mode is its own read transaction, so `read`'s snapshot rules
        hold; SQLITE_BUSY moves it to a worker thread. ~4x cheaper than `read`, whose cost is mostly
        SQLAlchemy's execution machinery around the driver's ~15 us. PostgreSQL: the same compiled
        statement in autocommit on an asynchronous connection, awaited on the loop (pg_reads.py): one
        round trip instead of four, no thread hop. In-memory SQLite: `read` of the same statement."""
        if self._pg_reads is not None:
            compiled = self._compiled_read(statement)
            # If it fails (e.g. the server restarted), a read unit runs it: reconnects, or raises as ever.
            return await self._pg_reads.first(
                compiled.sql,
                compiled.names,
                compiled.bind(params),
                compiled.process,
                lambda: self.read(_first_row(statement, params)),
            )
        if self._first_engine is not None:
            compiled = self._compiled_read(statement)
            try:
                if self._first_reader is None:
                    # Checked out for good: a connection of its own, never inside another read's
                    # open transaction (whose older snapshot would break read-your-writes).
                    self._first_reader = self._first_engine.raw_connection()
                return compiled.first(self._first_reader.driver_connection, params)
            except sqlite3.OperationalError:
                return await self._off_loop(functools.partial(self._read_unit, _first_row(statement, params)))
        return await self.read(_first_row(statement, params))

    def _compiled_read(self, statement: Select[Any]) -> _CompiledRead:
        compiled = self._compiled_reads.get(id(statement))
        if compiled is None or compiled.statement is not statement:
            compiled = self._compiled_reads[id(statement)] = _CompiledRead(statement, self.engine.dialect)
        return compiled

    async def ping(self, timeout: float = 2.0) -> bool:
        def select_one() -> None:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        try:
            async with asyncio.timeout(timeout):
                await self._off_loop(select_one)
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        if self._first_reader is not None:
            self._first_reader.close()
            self._first_reader = None
        if self._pg_reads is not None:
            self._pg_reads.close()
        self._reads.close()
        self._writes.close()
        # Units still running on a worker (a cancelled caller's) finish first: their connections
        # must be back before the pool closes.
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        self.engine.dispose()
        if self._checkpointer is not None:
            self._checkpointer.stop()


def _first_row(
    statement: Select[Any], params: dict[str, Any]
) -> Callable[[Connection], tuple[Any, ...] | None]:
    def first(connection: Connection) -> tuple[Any, ...] | None:
        row = connection.execute(statement, params).first()
        return None if row is None else tuple(row)

    return first


def _on_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get("begin_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class _LoopConnections:
    """Open connections of a synchronous SQLite engine, reused on the event-loop thread: checking
    one out of the pool and back in (with its reset) per unit cost about as much as a statement.
    Without an engine (PostgreSQL) it has nothing to give: units run on a worker thread."""

    def __init__(self, engine: Engine | None, *, keep: int):
        self._engine = engine
        self._keep = keep
        self._idle: list[Connection] = []

    def begin(self) -> Connection | None:
        """A connection with its transaction begun, or None if there is no engine or SQLite stayed
        busy for the short timeout (the caller runs the unit on a worker thread instead)."""
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
    """A SELECT compiled once for the driver (sqlite3: positional, psycopg2: named parameters): SQL
    text, parameter names, result processors."""

    def __init__(self, statement: Select[Any], dialect: Any):
        self.statement = statement  # kept alive, so its id() is not reused while cached
        compiled = statement.compile(dialect=dialect)
        if compiled.escaped_bind_names:
            raise ValueError("read_first: parameter names the driver would see renamed")
        self.sql = compiled.string
        self.positional = compiled.positiontup is not None
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        # (name in the SQL, key in the caller's params, or None and the statement's own value)
        self.params = [
            (name, binds[name].key if binds[name].required else None, binds[name].effective_value)
            for name in (compiled.positiontup or binds)
        ]
        self.names = [name for name, _, _ in self.params]
        self.processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.selected_columns
        ]

    def bind(self, params: dict[str, Any]) -> Any:
        values = [value if key is None else params[key] for _, key, value in self.params]
        return values if self.positional else dict(zip(self.names, values, strict=True))

    def process(self, row: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(value if p is None else p(value) for p, value in zip(self.processors, row, strict=True))

    def first(self, driver: Any, params: dict[str, Any]) -> tuple[Any, ...] | None:
        row = driver.execute(self.sql, self.bind(params)).fetchone()
        return None if row is None else self.process(row)


def _pg_point_reads(engine: Engine, executor: ThreadPoolExecutor) -> PgPointReads:
    """`read_first`'s connections, with the engine's connect arguments (URL, query options, timeout)."""
    from shop_mesh.services.common.pg_reads import PgPointReads  # psycopg2: only when PostgreSQL is used

    _, params = engine.dialect.create_connect_args(engine.url)
    return PgPointReads(
        {**params, **_PG_CONNECT_ARGS}, executor, size=DB_THREADS, connect_timeout_s=_PG_CONNECT_TIMEOUT_S
    )
