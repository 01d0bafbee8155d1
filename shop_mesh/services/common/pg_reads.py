"""One-statement reads on PostgreSQL without a thread hop: `Database.read_first`'s PostgreSQL path.

A unit on PostgreSQL runs on a worker thread, on a pooled connection: for a point read (GetUser) that
was four round trips (the pool's pre-ping `SELECT 1`, `BEGIN`, the `SELECT`, `ROLLBACK`) and a hop to
the worker and back, ~340 us of CPU per read in process. Here the read is one prepared `EXECUTE`
sent on a psycopg2 connection in asynchronous mode, awaited on the event loop (the loop waits for the
socket, never on it): one round trip, ~60 us (docs/performance.md, "GetUser per-call cost, session 7").

- Asynchronous psycopg2 connections are always in autocommit: one statement is its own transaction,
  with a snapshot of its own, so `read`'s rules (a fresh snapshot, read-your-writes) hold.
- Connections are opened on a worker thread (name resolution and the connect handshake block) and
  kept, at most `size` of them; a read waits for a free one.
- Any driver error drops the connection, and the caller's `fallback` runs the same statement as an
  ordinary read unit, which reconnects (pre-ping) and raises what it always raised.
  A read is safe to run twice. A read cancelled in flight (a client gone) finishes in the background
  and its connection stays: clients that hang up must not cost a reconnect each.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions

R = TypeVar("R")

# After a connection failed to open, how long reads skip this path (and their second connect).
CONNECT_BACKOFF_S = 1.0

_POLL_OK = psycopg2.extensions.POLL_OK
_POLL_READ = psycopg2.extensions.POLL_READ
_POLL_WRITE = psycopg2.extensions.POLL_WRITE


class _Connection(psycopg2.extensions.connection):  # type: ignore[misc]  # untyped driver
    """A connection that knows which statements it has prepared, and who waits for its answer."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prepared: set[str] = set()
        self.fd = -1  # watched by the loop while >= 0
        self.waiter: asyncio.Future[None] | None = None  # the read waiting for its socket


class _Prepared:
    """A SELECT as a server-side prepared statement: psycopg2 never prepares one, so without it the
    server parses and plans the same point read on every call (~80 -> ~47 us of PostgreSQL's CPU
    per GetUser, docs/performance.md). Prepared once per connection, with its first EXECUTE."""

    def __init__(self, sql: str, names: Sequence[str], number: int):
        self.name = f"shop_read_{number}"
        numbered = sql
        for i, name in enumerate(names, 1):
            numbered = numbered.replace(f"%({name})s", f"${i}")
        # Sent with a dict of parameters, always: psycopg2 then formats the whole text (`%%` -> `%`).
        arguments = ", ".join(f"%({name})s" for name in names)
        self.execute = f"EXECUTE {self.name}({arguments})" if names else f"EXECUTE {self.name}"
        self.prepare_and_execute = f"PREPARE {self.name} AS {numbered}; {self.execute}"


def _connect(params: dict[str, Any], timeout_s: float) -> _Connection:
    """An asynchronous connection, its handshake done (on a worker thread: this blocks)."""
    connection: _Connection = psycopg2.connect(**params, async_=True, connection_factory=_Connection)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            state = connection.poll()
            if state == _POLL_OK:
                return connection
            left = deadline - time.monotonic()
            if left <= 0:
                raise psycopg2.OperationalError("timeout while connecting")
            fd = connection.fileno()
            if state == _POLL_READ:
                select.select([fd], [], [], left)
            else:
                select.select([], [fd], [], left)
    except BaseException:
        connection.close()
        raise


class _NoConnection(Exception):
    """None could be opened, or the reads are closed."""


class PgPointReads:
    """Up to `size` asynchronous connections for one-statement reads, shared by the event loop's tasks."""

    def __init__(self, params: dict[str, Any], executor: Executor, *, size: int, connect_timeout_s: float):
        self._params = params
        self._executor = executor
        self._size = size
        self._timeout = connect_timeout_s
        self._idle: list[Any] = []
        self._open = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._closed = False
        self._statements: dict[str, _Prepared] = {}
        self._finishing: set[asyncio.Task[None]] = set()  # reads whose callers were cancelled
        self._connect_again_at = 0.0  # after a failed connect: no new one before this (monotonic)

    async def first(
        self,
        sql: str,
        names: Sequence[str],
        params: dict[str, Any],
        process: Callable[[tuple[Any, ...]], tuple[Any, ...]],
        fallback: Callable[[], Awaitable[R]],
    ) -> tuple[Any, ...] | R | None:
        """`process(row)` of the first row of `sql` (parameters `%(name)s` for each of `names`), or
        None without one. When the driver failed or no connection could be had, what `fallback()`
        returns (the same read as a read unit)."""
        statement = self._statements.get(sql)
        if statement is None:
            statement = self._statements[sql] = _Prepared(sql, names, len(self._statements))
        try:
            connection = await self._acquire()
        except _NoConnection:
            return await fallback()
        try:
            cursor = connection.cursor()
            if statement.name in connection.prepared:
                cursor.execute(statement.execute, params)
            else:  # PREPARE and the first EXECUTE in one round trip
                cursor.execute(statement.prepare_and_execute, params)
                connection.prepared.add(statement.name)
            await self._wait(connection)
            row = cursor.fetchone()
        except psycopg2.Error:
            self._discard(connection)
            return await fallback()
        except asyncio.CancelledError:
            # The caller went away (a client's deadline or cancel) with the statement in flight: its
            # result is read off in the background and the connection kept, not closed and reopened.
            finishing = asyncio.get_running_loop().create_task(self._finish(connection, cursor))
            self._finishing.add(finishing)
            finishing.add_done_callback(self._finishing.discard)
            raise
        except BaseException:
            self._discard(connection)
            raise
        self._release(connection)
        return None if row is None else process(row)

    async def _finish(self, connection: Any, cursor: Any) -> None:
        # `cursor` is held until the result is in: psycopg2 fails the poll if it was collected.
        try:
            await self._wait(connection)
            cursor.close()
        except BaseException:  # the read failed, or the loop is closing: nobody waits for it
            self._discard(connection)
            return
        self._release(connection)

    async def _wait(self, connection: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            state = connection.poll()
            if state == _POLL_OK:
                return
            if state == _POLL_READ:
                if connection.fd < 0:  # dropped by `_readable` in between: nothing would wake us
                    raise psycopg2.OperationalError("connection lost")
                # The loop watches the socket for as long as the connection lives (`_watch`): adding
                # and removing a reader per read cost ~25 us of its ~90 (docs/performance.md).
                connection.waiter = loop.create_future()
                try:
                    await connection.waiter
                finally:
                    connection.waiter = None
            elif state == _POLL_WRITE:  # the query did not fit the socket's buffer at once: rare
                ready: asyncio.Future[None] = loop.create_future()
                fd = connection.fileno()
                loop.add_writer(fd, _set_ready, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)
            else:
                raise psycopg2.OperationalError(f"unexpected poll state {state}")

    def _watch(self, connection: Any) -> Any:
        connection.fd = connection.fileno()
        asyncio.get_running_loop().add_reader(connection.fd, self._readable, connection)
        return connection

    def _readable(self, connection: Any) -> None:
        waiter = connection.waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
            return
        # Readable with no read in flight: the server closed the connection (or sent a notice).
        # Consumed here, or the loop would call this again on every turn.
        try:
            connection.poll()
        except psycopg2.Error:
            self._unwatch(connection)
            if connection in self._idle:  # else its next user finds it closed and falls back
                self._idle.remove(connection)
                self._discard(connection)

    def _unwatch(self, connection: Any) -> None:
        if connection.fd >= 0:
            asyncio.get_running_loop().remove_reader(connection.fd)
            connection.fd = -1

    async def _acquire(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            if self._idle:
                return self._idle.pop()
            if self._closed or time.monotonic() < self._connect_again_at:
                raise _NoConnection
            if self._open < self._size:
                self._open += 1
                opening = loop.run_in_executor(self._executor, _connect, self._params, self._timeout)
                try:
                    return self._watch(await asyncio.shield(opening))
                except asyncio.CancelledError:
                    opening.add_done_callback(self._opened_for_nobody)
                    raise
                except Exception:
                    self._open -= 1
                    # Server down: reads go straight to the read unit for a while, instead of each
                    # waiting for two failed connects (this one's and the pool's).
                    self._connect_again_at = time.monotonic() + CONNECT_BACKOFF_S
                    self._wake_one()  # a waiter may open one in this one's place
                    raise _NoConnection from None
            waiter: asyncio.Future[Any] = loop.create_future()
            self._waiters.append(waiter)
            try:
                connection = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # Handed a connection (or a free slot) just as it was cancelled: pass it on.
                    if waiter.result() is None:
                        self._wake_one()
                    else:
                        self._release(waiter.result())
                raise
            if connection is not None:
                return connection
            # None: a slot came free (a connection was dropped): open one in the next turn.

    def _release(self, connection: Any) -> None:
        if self._closed:
            self._unwatch(connection)
            connection.close()
            self._open -= 1
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._idle.append(connection)

    def _opened_for_nobody(self, opening: asyncio.Future[Any]) -> None:
        # The task that opened it was cancelled meanwhile: the connection joins the pool instead.
        if opening.cancelled() or opening.exception() is not None:
            self._open -= 1
            self._wake_one()
        else:
            self._release(self._watch(opening.result()))

    def _discard(self, connection: Any) -> None:
        self._unwatch(connection)
        connection.close()
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        # A slot came free: the first waiter opens a connection of its own (None: fall back).
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections now and each busy one when its read ends."""
        self._closed = True
        for finishing in list(self._finishing):  # nobody waits for their results: close them too
            finishing.cancel()
        while self._idle:
            connection = self._idle.pop()
            self._unwatch(connection)
            connection.close()
            self._open -= 1
        while self._waiters:
            self._wake_one()


def _set_ready(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
