"""EventHub: one in-memory reader of an event log per process, fanning events out to streaming RPCs.

Pure asyncio: the log is read through the callables it is given (the SQL lives in outbox.py and the
repositories). Correct because sequences commit in order (outbox.SequenceAllocator).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from shop_mesh.services.common.logging import get_logger

E = TypeVar("E")
log = get_logger("event_hub")


# How long a stream inside the hub's window waits without a tick before it looks again anyway.
STREAM_SAFETY_WAKE_SECONDS = 1.0


class EventSignal:
    """Wakes every waiter at once (one-shot per notify): the hub's reader on writes, the streams on reads.

    Each waiter awaits a future of its own, and notify() resolves them all: per waiter, one future and
    one task wake-up. Awaiting one shared future through asyncio.wait cost a completion callback, a
    waiter future, a timer and two result sets per wait, and each timeout took an O(waiters) removal
    from the shared future's callbacks (1,000 streams: ~1 M comparisons a second while idle).
    """

    def __init__(self) -> None:
        # A dict for O(1) removal of a waiter that timed out or was cancelled.
        self._waiters: dict[asyncio.Future[None], None] = {}

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, timeout: float | None = None) -> None:
        """Until the next notify(), or `timeout` seconds if one is given."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters[fut] = None
        timer = loop.call_later(timeout, _release, fut) if timeout is not None else None
        try:
            await fut  # cancelling this waiter cancels only its own future
        finally:
            if timer is not None:
                timer.cancel()
            self._waiters.pop(fut, None)


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class EventHub(Generic[E]):
    """One reader per process for an event log; every stream is served from its in-memory window.

    Per-stream polling costs a query per stream per interval (1,000 idle streams kept a core busy);
    here one task reads new events once and wakes the streams, which only keep a cursor. A stream
    that starts behind the window catches up with its own filtered query, then joins the window.
    Correct because sequences commit in order: once the hub has read N, nothing below N can appear.

    While no stream is subscribed the reader reads nothing (a read per write cost ~4 % of the order
    app under CreateOrder, where nobody watches): it drops its window and, when a stream subscribes,
    starts again at the log's end, as at start-up; the stream catches up with its own query.
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
        # Set by notify(): a write committed since the reader last started a read. A notify while
        # the reader is inside a read has no waiter to wake; without this it waited a poll interval.
        self._notified = False
        self._subscribers = 0
        self._demand = EventSignal()  # subscribe() -> an idle reader
        self._started = False

    @property
    def cursor(self) -> int | None:
        """The last sequence the reader has read (None before it starts and while it idles)."""
        return self._cursor

    def position(self, log_end: int) -> int | None:
        """The reader's position for a lag gauge, given the log's last sequence: None before it
        starts; `log_end` while it idles (no stream waits on it, so nothing is behind)."""
        if not self._started:
            return None
        return log_end if self._cursor is None else self._cursor

    def notify(self) -> None:
        """Call after committing events: the reader picks them up now rather than at the next poll."""
        self._notified = True
        self._wake.notify()

    def publish(self, event: E) -> None:
        """Call after committing `event`: when it is the next sequence after the reader's cursor it
        joins the window at once, without a read (everything before it is already there, and it is
        committed); otherwise (another writer's events in between, an idle reader) as `notify`."""
        cursor = self._cursor
        if cursor is not None and self._sequence_of(event) == cursor + 1:
            self._append([event])
            self._tick.notify()
        else:
            self.notify()

    async def run(self, stopping: asyncio.Event) -> None:
        """The reader; a background job of the service. When it ends, waiting streams are woken so
        they see `stopping` at once."""
        # One task for the whole run turns `stopping` into a wake of the reader (a task per wait
        # delayed every wake-up by extra loop turns).
        stopper = asyncio.ensure_future(_notify_when_set(stopping, self._wake, self._demand))
        self._started = True
        try:
            await self._read(stopping)
        finally:
            stopper.cancel()
            self._tick.notify()

    async def _read(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last_tick = loop.time()
        while not stopping.is_set():
            if not self._subscribers:
                self._idle()
                await self._demand.wait()
                continue
            self._notified = False
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
                last_tick = loop.time()
                if len(batch) == self._batch:
                    continue
            elif loop.time() - last_tick >= STREAM_SAFETY_WAKE_SECONDS:
                # Streams wait without a timer of their own; this one wake is their safety net.
                self._tick.notify()
                last_tick = loop.time()
            if not stopping.is_set() and not self._notified:
                await self._wake.wait(self._poll_interval)

    def _idle(self) -> None:
        # Forget the window: a stream that subscribes later catches up with its own query.
        self._floor = self._cursor = None
        self._seqs, self._events = [], []

    def _append(self, batch: Sequence[E]) -> None:
        cursor = self._cursor
        for event in batch:
            sequence = self._sequence_of(event)
            if cursor is not None and sequence <= cursor:
                continue  # published while the read that returned it was under way
            self._seqs.append(sequence)
            self._events.append(event)
            cursor = sequence
        self._cursor = cursor
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
        self._subscribers += 1
        if self._subscribers == 1:
            self._demand.notify()  # an idle reader starts reading again
        try:
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
                    # No await since `seen` was read, so no tick can be missed: the reader wakes every
                    # stream on each new batch, when it stops, and every STREAM_SAFETY_WAKE_SECONDS.
                    await self._tick.wait()
        finally:
            self._subscribers -= 1


async def _notify_when_set(stopping: asyncio.Event, *signals: EventSignal) -> None:
    await stopping.wait()
    for signal in signals:
        signal.notify()
