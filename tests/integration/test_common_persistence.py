"""The shared persistence guarantees, on SQLite and PostgreSQL: request_id idempotency under
concurrency, commit-ordered event sequences, and stream tailing across processes' databases."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    insert,
    select,
)

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.errors import AlreadyExists
from shop_mesh.services.common.event_hub import EventHub
from shop_mesh.services.common.idempotency import fingerprint
from shop_mesh.services.common.idempotency_sql import IdempotencyStore, idempotency_table
from shop_mesh.services.common.outbox import SequenceAllocator, sequence_table
from shop_mesh.services.common.sqltypes import UtcDateTime


def _schema() -> tuple[MetaData, Table, Table, Table]:
    metadata = MetaData()
    effects = Table(
        "effects",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("sequence", BigInteger, nullable=True),
    )
    return metadata, effects, idempotency_table(metadata), sequence_table(metadata)


async def test_timestamps_are_stored_and_read_as_utc(database_url_factory: Callable[[str], str]) -> None:
    """One column type for every service's times: a time written in another zone reads back as the same
    instant, aware, in UTC, from a session and from the fast read alike, and compares as an instant."""
    metadata = MetaData()
    stamps = Table(
        "stamps",
        metadata,
        Column("id", String(8), primary_key=True),
        Column("at", UtcDateTime(), nullable=False),
    )
    db = Database(database_url_factory("stamps"), metadata)
    await db.create_schema()
    plus_two = timezone(timedelta(hours=2))
    written = datetime(2026, 3, 1, 12, 30, tzinfo=plus_two)  # 10:30 UTC
    try:

        def write(session: Connection) -> None:
            session.execute(insert(stamps).values(id="a", at=written))
            session.execute(insert(stamps).values(id="b", at=datetime(2026, 3, 1, 11, 0, tzinfo=UTC)))

        def read(session: Connection) -> tuple[datetime, list[str], datetime]:
            at = session.scalar(select(stamps.c.at).where(stamps.c.id == "a"))
            # 11:00 at +02:00 is 09:00 UTC: only "a" (10:30 UTC) and "b" (11:00 UTC) are later
            later = session.scalars(
                select(stamps.c.id).where(stamps.c.at > datetime(2026, 3, 1, 11, 0, tzinfo=plus_two))
            ).all()
            earliest = session.scalar(select(func.min(stamps.c.at)))
            assert at is not None and earliest is not None
            return at, list(later), earliest

        await db.write(write)
        at, later, earliest = await db.read(read)
        assert sorted(later) == ["a", "b"]
        row = await db.read_first(select(stamps.c.at).where(stamps.c.id == bindparam("id")), {"id": "a"})
        assert row is not None
        for value in (at, row[0], earliest):
            assert value == written and value.tzinfo is not None and value.utcoffset() == timedelta(0)
    finally:
        await db.dispose()


async def _perform(
    db: Database, store: IdempotencyStore, effects: Table, request_id: str, payload: str
) -> str:
    def perform(session: Connection) -> str:
        stored = store.claim(session, "Charge", request_id, fingerprint({"p": payload}))
        if stored is not None:
            return str(json.loads(stored)["id"])
        effect_id = f"effect-{request_id}-{payload}"
        session.execute(insert(effects).values(id=effect_id))
        # Widen the race window (PostgreSQL: the others' units wait on the key's row meanwhile).
        time.sleep(0.01)
        store.complete(session, "Charge", request_id, json.dumps({"id": effect_id}))
        return effect_id

    return await db.write(perform)


async def test_concurrent_duplicates_have_one_effect(database_url_factory: Callable[[str], str]) -> None:
    metadata, effects, keys, _ = _schema()
    db = Database(database_url_factory("idem"), metadata)
    await db.create_schema()
    store = IdempotencyStore(keys)
    try:
        results = await asyncio.gather(*(_perform(db, store, effects, "req-1", "a") for _ in range(10)))
        assert set(results) == {"effect-req-1-a"}
        assert await db.read(lambda session: session.scalar(select(func.count()).select_from(effects))) == 1
        with pytest.raises(AlreadyExists) as err:
            await _perform(db, store, effects, "req-1", "different payload")
        assert err.value.reason == "REQUEST_ID_REUSED"
    finally:
        await db.dispose()


async def test_sequences_commit_in_order_and_a_reader_sees_every_event(
    database_url_factory: Callable[[str], str],
) -> None:
    metadata, effects, _, sequences = _schema()
    url = database_url_factory("seq")
    writer, reader = Database(url, metadata), Database(url, metadata)  # two "replicas"
    await writer.create_schema()
    allocator = SequenceAllocator(sequences, "effects")
    await writer.write(lambda session: allocator.ensure(session))

    async def write(i: int) -> None:
        def unit(session: Connection) -> None:
            session.execute(insert(effects).values(id=f"e{i}", sequence=allocator.next(session)))
            time.sleep(0.005 * (i % 3))  # hold the transaction open for varying times

        await writer.write(unit)

    async def fetch_after(cursor: int) -> list[int]:
        query = select(effects.c.sequence).where(effects.c.sequence > cursor).order_by(effects.c.sequence)
        return await reader.read(lambda session: [int(r) for r in session.scalars(query)])

    async def fetch_all_after(cursor: int, limit: int) -> list[int]:
        return (await fetch_after(cursor))[:limit]

    async def from_the_start() -> int:
        return 0

    stopping = asyncio.Event()
    seen: list[int] = []
    hub: EventHub[int] = EventHub(fetch_all_after, from_the_start, lambda s: s, 0.02)

    async def consume() -> None:
        async for sequence in hub.subscribe(0, lambda s: True, fetch_after, 1_000, stopping):
            seen.append(sequence)
            if len(seen) == 40:
                stopping.set()

    reader_task = asyncio.create_task(hub.run(stopping))
    consumer = asyncio.create_task(consume())
    try:
        await asyncio.gather(*(write(i) for i in range(40)))
        await asyncio.wait_for(consumer, 20)
        assert seen == list(range(1, 41))  # every event once, in order, no gap
    finally:
        stopping.set()
        await reader_task
        await writer.dispose()
        await reader.dispose()


async def test_event_hub_serves_every_subscriber_each_matching_event_once(
    database_url_factory: Callable[[str], str],
) -> None:
    metadata, effects, _, sequences = _schema()
    url = database_url_factory("hub")
    writer, reader = Database(url, metadata), Database(url, metadata)
    await writer.create_schema()
    allocator = SequenceAllocator(sequences, "effects")
    await writer.write(lambda session: allocator.ensure(session))

    async def fetch_all_after(cursor: int, limit: int) -> list[int]:
        query = (
            select(effects.c.sequence)
            .where(effects.c.sequence > cursor)
            .order_by(effects.c.sequence)
            .limit(limit)
        )
        return await reader.read(lambda session: [int(r) for r in session.scalars(query)])

    async def last() -> int:
        query = select(func.max(effects.c.sequence))
        value: int | None = await reader.read(lambda session: session.scalar(query))
        return int(value or 0)

    # A window of 4 and batches of 3 force streams through the catch-up path and back.
    hub: EventHub[int] = EventHub(fetch_all_after, last, lambda s: s, 0.02, window=4, batch=3)
    stopping = asyncio.Event()
    reader_task = asyncio.create_task(hub.run(stopping))

    async def write(i: int) -> None:
        def unit(session: Connection) -> None:
            session.execute(insert(effects).values(id=f"e{i}", sequence=allocator.next(session)))
            time.sleep(0.003 * (i % 4))

        await writer.write(unit)
        hub.notify()

    async def watch(after: int, parity: int, want: int) -> list[int]:
        async def matching_after(cursor: int) -> list[int]:
            return [s for s in await fetch_all_after(cursor, 5) if s % 2 == parity][:2]

        got: list[int] = []
        async for sequence in hub.subscribe(after, lambda s: s % 2 == parity, matching_after, 2, stopping):
            got.append(sequence)
            if len(got) == want:
                break
        return got

    try:
        await asyncio.gather(*(write(i) for i in range(10)))  # some history before anyone watches
        watchers = [
            asyncio.create_task(watch(0, 0, 25)),  # from the beginning: catch-up, then live
            asyncio.create_task(watch(0, 1, 25)),
            asyncio.create_task(watch(7, 1, 21)),  # resuming mid-way
        ]
        await asyncio.gather(*(write(i) for i in range(10, 50)))
        evens, odds, resumed = await asyncio.wait_for(asyncio.gather(*watchers), 30)
        assert evens == list(range(2, 51, 2))
        assert odds == list(range(1, 50, 2))
        assert resumed == list(range(9, 50, 2))
    finally:
        stopping.set()
        await reader_task
        await writer.dispose()
        await reader.dispose()


async def test_many_concurrent_writers_all_commit_and_nesting_is_refused(
    database_url_factory: Callable[[str], str],
) -> None:
    """50 concurrent write units of one process all commit (on SQLite they take turns on the process's
    write lock instead of polling SQLite's); a nested one is an error, not a deadlock, also where the
    unit runs on a worker thread (PostgreSQL): it sees its task's context."""
    metadata, effects, _, _ = _schema()
    db = Database(database_url_factory("writers"), metadata)
    await db.create_schema()

    async def write(i: int) -> None:
        await asyncio.sleep(0)  # let the others pile up
        await db.write(lambda session: session.execute(insert(effects).values(id=f"w-{i}")))

    def nested(session: Connection) -> None:
        # A unit cannot await; driving the nested unit's coroutine by hand is what nesting would be.
        inner = db.write(lambda _: None)
        try:
            inner.send(None)
        finally:
            inner.close()

    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(write(i) for i in range(50)))
        assert await db.read(lambda session: session.scalar(select(func.count()).select_from(effects))) == 50
        with pytest.raises(RuntimeError, match="nested write transaction"):
            await db.write(nested)
        # The refused nesting left nothing held.
        await db.write(lambda session: session.execute(insert(effects).values(id="after")))
    finally:
        await db.dispose()
