"""Event logs with commit-ordered sequences, and tailing them for streaming RPCs.

Sequences come from a counter row that is incremented inside the writing transaction. The row lock
is held until commit, so sequence N+1 cannot commit before N: a reader that has seen N never later
finds a smaller sequence appear (the classic gap of auto-increment ids on PostgreSQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

E = TypeVar("E")


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

    async def ensure(self, session: AsyncSession) -> None:
        exists = await session.scalar(select(self.table.c.value).where(self.table.c.name == self.name))
        if exists is None:
            await session.execute(insert(self.table).values(name=self.name, value=0))

    async def next(self, session: AsyncSession) -> int:
        """Allocate the next sequence; call it in the transaction that writes the event, last."""
        value = await session.scalar(
            update(self.table)
            .where(self.table.c.name == self.name)
            .values(value=self.table.c.value + 1)
            .returning(self.table.c.value)
        )
        if value is None:
            raise RuntimeError(f"sequence {self.name!r} missing: call ensure() at start")
        return int(value)


class EventSignal:
    """Wakes this process's stream tailers when it writes events; other replicas are found by polling."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait(self, timeout: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)


async def tail(
    fetch_after: Callable[[int], Awaitable[Sequence[E]]],
    sequence_of: Callable[[E], int],
    after_sequence: int,
    signal: EventSignal,
    stopping: asyncio.Event,
    poll_interval: float,
) -> AsyncIterator[E]:
    """Every event after `after_sequence`, stored ones first, then new ones as they commit.

    Ends (without error) only when `stopping` is set; the caller decides what that means.
    """
    cursor = after_sequence
    while not stopping.is_set():
        batch = await fetch_after(cursor)
        for item in batch:
            cursor = sequence_of(item)
            yield item
        if batch:
            continue
        waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(signal.wait(poll_interval))]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in waits:
                pending.cancel()
