"""Event logs with commit-ordered sequences, and tailing them for streaming RPCs.

Sequences come from a counter row that is incremented inside the writing transaction. The row lock
is held until commit, so sequence N+1 cannot commit before N: a reader that has seen N never later
finds a smaller sequence appear (the classic gap of auto-increment ids on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy import BigInteger, Column, MetaData, String, Table, bindparam, insert, select, update

from services.common.db import DbSession
from services.common.logging import get_logger

E = TypeVar("E")
log = get_logger("outbox")


def sequence_table(metadata: MetaData) -> Table:
    return Table(
        "sequences",
        metadata,
        Column("name", String(64), primary_key=True),
        Column("value", BigInteger, nullable=False),
    )


class SequenceAllocator:
    def __init__(self, table: Table, name: str):
        self.table = table
        self.name = name
        # Built once: constructing the statement per event cost more than running it.
        self._next = (
            update(table)
            .where(table.c.name == bindparam("_name"))
            .values(value=table.c.value + 1)
            .returning(table.c.value)
        )

    async def ensure(self, session: DbSession) -> None:
        exists = await session.scalar(select(self.table.c.value).where(self.table.c.name == self.name))
        if exists is None:
            await session.execute(insert(self.table).values(name=self.name, value=0))

    async def next(self, session: DbSession) -> int:
        """Allocate the next sequence; call it in the transaction that writes the event, last."""
        value = await session.scalar(self._next, {"_name": self.name})
        if value is None:
            raise RuntimeError(f"sequence {self.name!r} missing: call ensure() at start")
        return int(value)


# How long a stream inside the hub's window waits without a tick before it looks again anyway.
STREAM_SAFETY_WAKE_SECONDS = 1.0


class EventSignal:
    """Wakes every waiter at once (one-shot per notify): the hub's reader on writes, the streams on reads.

    All waiters share one future, so a waiting stream costs no task of its own: with 1,000 streams,
    a task per wait (and per timeout) was a measurable share of the order app's CPU.
    """

    def __init__(self) -> None:
        self._fired: asyncio.Future[None] | None = None

    def notify(self) -> None:
        fired, self._fired = self._fired, None
        if fired is not None and not fired.done():
            fired.set_result(None)

    def future(self) -> asyncio.Future[None]:
        """Done at the next notify()."""
        if self._fired is None:
            self._fired = asyncio.get_running_loop().create_future()
        return self._fired

    async def wait(self, timeout: float) -> None:
        """Until the next notify() or `timeout` seconds."""
        await asyncio.wait((self.future(),), timeout=timeout)


class EventHub(Generic[E]):
    """One reader per process for an event log; every stream is served from its in-memory window.

    Per-stream polling costs a query per stream per interval (1,000 idle streams kept a core busy);
    here one task reads new events once and wakes the streams, which only keep a cursor. A stream
    that starts behind the window catches up with its own filtered query, then joins the window.
    Correct because sequences commit in order: once the hub has read N, nothing below N can appear.
    """

    def __init__(
        self,
        fetch_all_after: Callable[[int, int], Awaitable[Sequence[E]]],
        last_sequence: Callable[[], Awaitable[int]],
        sequence_of: Callable[[E], int],
        poll_interval: float,
        *,
        window: int = 10_000,
        batch: int = 1_000,
    ):
        self._fetch_all_after = fetch_all_after
        self._last_sequence = last_sequence
        self._sequence_of = sequence_of
        self._poll_interval = poll_interval
        self._window = window
        self._batch = batch
        self._seqs: list[int] = []
        self._events: list[E] = []
        # Every event with floor < sequence <= cursor is in memory; None until the hub has started.
        self._floor: int | None = None
        self._cursor: int | None = None
        self._wake = EventSignal()  # writers -> reader
        self._tick = EventSignal()  # reader -> streams

    def notify(self) -> None:
        """Call after committing events: the reader picks them up now rather than at the next poll."""
        self._wake.notify()

    async def run(self, stopping: asyncio.Event) -> None:
        """The reader; a background job of the service. When it ends, waiting streams are woken so
        they see `stopping` at once."""
        try:
            await self._read(stopping)
        finally:
            self._tick.notify()

    async def _read(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                if self._cursor is None:
                    start = await self._last_sequence()
                    self._floor = self._cursor = start
                    self._tick.notify()
                batch = await self._fetch_all_after(self._cursor, self._batch)
            except Exception:
                log.warning("event_hub_read_failed", exc_info=True)
                batch = []
            if batch:
                self._append(batch)
                self._tick.notify()
                if len(batch) == self._batch:
                    continue
            await _first(stopping, self._wake, self._poll_interval)

    def _append(self, batch: Sequence[E]) -> None:
        for event in batch:
            self._seqs.append(self._sequence_of(event))
            self._events.append(event)
        self._cursor = self._seqs[-1]
        if len(self._seqs) > 2 * self._window:
            cut = len(self._seqs) - self._window
            self._floor = self._seqs[cut - 1]
            del self._seqs[:cut], self._events[:cut]

    async def subscribe(
        self,
        after_sequence: int,
        matches: Callable[[E], bool],
        fetch_matching_after: Callable[[int], Awaitable[Sequence[E]]],
        fetch_limit: int,
        stopping: asyncio.Event,
    ) -> AsyncIterator[E]:
        """Every matching event after `after_sequence`, in order, once; ends only when `stopping` is set.

        `fetch_matching_after(cursor)` returns at most `fetch_limit` matching events after cursor.
        """
        cursor = after_sequence
        while not stopping.is_set():
            floor, seen = self._floor, self._cursor
            if floor is None or seen is None or cursor < floor:
                # Behind the window, or the hub has not started: this stream's own query.
                batch = await fetch_matching_after(cursor)
                for event in batch:
                    cursor = self._sequence_of(event)
                    yield event
                if len(batch) == fetch_limit:
                    continue
                if seen is not None:
                    # Every match up to `seen` had committed before that query, so the query had it.
                    cursor = max(cursor, seen)
                else:
                    await self._tick.wait(self._poll_interval)
                continue
            # No await between reading `seen` and slicing: the window ends exactly at `seen`.
            fresh = [e for e in self._events[bisect.bisect_right(self._seqs, cursor) :] if matches(e)]
            cursor = max(cursor, seen)
            for event in fresh:
                yield event
            if not fresh:
                # The reader wakes every stream on each new batch and when it stops; the timeout
                # is only a safety net, so it can be long (1,000 idle streams, 1 wake-up each).
                await self._tick.wait(STREAM_SAFETY_WAKE_SECONDS)


async def _first(stopping: asyncio.Event, signal: EventSignal, timeout: float) -> None:
    """Wait until `stopping` is set, `signal` fires, or `timeout` passes."""
    waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(signal.wait(timeout))]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in waits:
            pending.cancel()
