"""EventHub with an in-memory event log: what many streams on one hub see when one of them goes away,
when a new event arrives and when the service stops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shop_mesh.services.common.event_hub import EventHub


class _Log:
    def __init__(self) -> None:
        self.sequences: list[int] = []

    async def all_after(self, cursor: int, limit: int) -> list[int]:
        return [s for s in self.sequences if s > cursor][:limit]

    async def matching_after(self, cursor: int) -> list[int]:
        return await self.all_after(cursor, 100)

    async def last(self) -> int:
        return self.sequences[-1] if self.sequences else 0


async def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


def _run_with_one_stream(
    hub: EventHub[int], log: _Log
) -> tuple[asyncio.Event, asyncio.Task[None], asyncio.Task[None], list[int]]:
    """The hub's reader and one stream from sequence 0 (which collects into the returned list)."""
    stopping = asyncio.Event()
    got: list[int] = []

    async def watch() -> None:
        async for sequence in hub.subscribe(0, lambda s: True, log.matching_after, 100, stopping):
            got.append(sequence)

    return stopping, asyncio.create_task(hub.run(stopping)), asyncio.create_task(watch()), got


async def test_a_cancelled_stream_leaves_the_others_live_and_all_end_when_the_service_stops() -> None:
    log = _Log()
    # A poll interval far longer than the test: only notify() and `stopping` may wake anyone.
    hub: EventHub[int] = EventHub(log.all_after, log.last, lambda s: s, 30.0)
    stopping = asyncio.Event()
    reader = asyncio.create_task(hub.run(stopping))
    got: list[list[int]] = [[] for _ in range(50)]

    async def watch(out: list[int]) -> None:
        async for sequence in hub.subscribe(0, lambda s: True, log.matching_after, 100, stopping):
            out.append(sequence)

    streams = [asyncio.create_task(watch(out)) for out in got]
    try:
        log.sequences.append(1)
        hub.notify()
        await _wait_until(lambda: all(out == [1] for out in got))
        await asyncio.sleep(0.01)  # every stream is back waiting for the next tick

        streams[0].cancel()  # a client goes away while its stream waits
        log.sequences.append(2)
        hub.notify()
        # Well inside the streams' one-second safety wake: the notify itself reached them.
        await _wait_until(lambda: all(out == [1, 2] for out in got[1:]), timeout=0.5)
        assert streams[0].cancelled() and got[0] == [1]

        stopping.set()
        async with asyncio.timeout(0.5):  # at once, not at the next poll or safety wake
            await asyncio.gather(reader, *streams[1:])
        assert all(out == [1, 2] for out in got[1:])  # each event once, in order
    finally:
        stopping.set()
        for task in (reader, *streams):
            task.cancel()
        await asyncio.gather(reader, *streams, return_exceptions=True)


async def test_an_event_committed_while_the_reader_reads_reaches_the_stream_without_a_poll() -> None:
    log = _Log()
    log.sequences.append(1)
    reading = asyncio.Event()
    release = asyncio.Event()

    async def slow_all_after(cursor: int, limit: int) -> list[int]:
        found = await log.all_after(cursor, limit)  # the query sees what had committed by now
        if cursor == 0:  # the first read: held open while event 2 commits
            reading.set()
            await release.wait()
        return found

    hub: EventHub[int] = EventHub(slow_all_after, _zero, lambda s: s, 30.0)
    stopping, reader, stream, got = _run_with_one_stream(hub, log)
    try:
        await asyncio.wait_for(reading.wait(), 5)
        log.sequences.append(2)
        hub.notify()  # the reader is inside its read: no one waits on the signal right now
        release.set()
        await _wait_until(lambda: got == [1, 2], timeout=0.5)  # not after the 30 s poll
    finally:
        stopping.set()
        await asyncio.wait_for(asyncio.gather(reader, stream), 5)


async def _zero() -> int:
    return 0


async def test_the_reader_reads_nothing_while_nobody_watches_and_a_late_stream_misses_nothing() -> None:
    log = _Log()
    reads: list[int] = []

    async def counted_all_after(cursor: int, limit: int) -> list[int]:
        reads.append(cursor)
        return await log.all_after(cursor, limit)

    hub: EventHub[int] = EventHub(counted_all_after, log.last, lambda s: s, 30.0)
    stopping = asyncio.Event()
    reader = asyncio.create_task(hub.run(stopping))
    got: list[int] = []

    async def watch(after: int) -> None:
        async for sequence in hub.subscribe(after, lambda s: True, log.matching_after, 100, stopping):
            got.append(sequence)

    try:
        for sequence in (1, 2, 3):  # written while nobody watches
            log.sequences.append(sequence)
            hub.notify()
            await asyncio.sleep(0.01)
        assert reads == []
        assert hub.position(3) == 3  # idle: behind nothing

        stream = asyncio.create_task(watch(1))  # resumes after event 1
        await _wait_until(lambda: got == [2, 3])
        log.sequences.append(4)
        hub.notify()
        await _wait_until(lambda: got == [2, 3, 4], timeout=0.5)  # live again, without a poll

        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)
        await asyncio.sleep(0.01)
        read_count = len(reads)
        log.sequences.append(5)
        hub.notify()
        await asyncio.sleep(0.05)
        assert len(reads) == read_count  # the last stream left: idle again
    finally:
        stopping.set()
        await asyncio.wait_for(reader, 5)


async def test_a_published_event_next_in_the_log_reaches_streams_without_a_read_and_never_twice() -> None:
    log = _Log()
    reads: list[int] = []
    reading = asyncio.Event()
    release = asyncio.Event()
    release.set()

    async def counted_all_after(cursor: int, limit: int) -> list[int]:
        reads.append(cursor)
        found = await log.all_after(cursor, limit)
        reading.set()
        await release.wait()
        return found

    hub: EventHub[int] = EventHub(counted_all_after, log.last, lambda s: s, 30.0)
    stopping, reader, stream, got = _run_with_one_stream(hub, log)
    try:
        await _wait_until(lambda: hub.cursor == 0 and bool(reads))
        await asyncio.sleep(0.01)
        read_count = len(reads)
        log.sequences.append(1)
        hub.publish(1)  # next after the cursor: no read
        await _wait_until(lambda: got == [1], timeout=0.5)
        assert len(reads) == read_count

        log.sequences.append(2)  # another writer's event, never published here
        log.sequences.append(3)
        hub.publish(3)  # not next: the reader reads 2 and 3
        await _wait_until(lambda: got == [1, 2, 3], timeout=0.5)

        # Published while a read that will return it is under way: still once.
        reading.clear()
        release.clear()
        log.sequences.append(4)
        hub.notify()
        await asyncio.wait_for(reading.wait(), 5)
        hub.publish(4)
        release.set()
        log.sequences.append(5)
        hub.publish(5)
        await _wait_until(lambda: got[-1] == 5, timeout=0.5)
        await asyncio.sleep(0.01)
        assert got == [1, 2, 3, 4, 5]
    finally:
        stopping.set()
        await asyncio.wait_for(asyncio.gather(reader, stream), 5)
