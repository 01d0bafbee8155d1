"""The load generator: grpc.aio workers in separate processes, closed-loop or open-loop.

Closed loop (maximum throughput): `concurrency` callers in total, each sends its next request as soon
as the previous answer arrives.

Open loop (fixed rate, like wrk2 / ghz --rps): request i is *intended* to start at
`start + i / rate`. A worker launches every request whose intended time has come, whether or not
earlier ones have answered, and a request's latency is measured from its intended start, not from
the moment the client got round to sending it. A stalled server therefore shows up in the latency of
every request that should have been sent during the stall (no coordinated omission). If more than
`max_inflight` requests are outstanding, new ones are not sent and are counted as errors with the
code `CLIENT_BACKLOG` (the server is not keeping up with the rate).

Only requests whose (intended) start lies in the measurement window [warm-up end, end) are
recorded; the warm-up lets connections, caches and the interpreter settle first.

Workers are separate processes (spawned, not forked: gRPC must not cross a fork), each with its own
event loop (uvloop when available) and `channels` HTTP/2 connections. Requests are sent as
pre-serialized bytes and answers are not parsed, so the client's CPU goes to gRPC itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shop_mesh.bench.histogram import Histogram
from shop_mesh.bench.payloads import RequestSource

Mode = Literal["closed", "open"]


@dataclass(frozen=True)
class LoadSpec:
    target: str  # host:port, always 127.0.0.1
    method: str  # full gRPC path, e.g. /grpc.health.v1.Health/Check
    source: RequestSource
    mode: Mode = "closed"
    concurrency: int = 64  # closed: callers in total; open: ignored (see max_inflight)
    rate: float = 0.0  # open: requests per second in total
    duration: float = 10.0
    warmup: float = 2.0
    processes: int = 1
    channels: int = 2  # HTTP/2 connections per worker process
    timeout: float = 10.0  # deadline of each call
    max_inflight: int = 20_000  # open loop: per worker
    metadata: tuple[tuple[str, str], ...] = ()
    use_uvloop: bool = True

    def __post_init__(self) -> None:
        if not self.target.startswith("127.0.0.1:"):
            raise ValueError("the benchmark only sends traffic to 127.0.0.1")
        if self.mode == "open" and self.rate <= 0:
            raise ValueError("open loop needs --rate > 0")
        if self.processes < 1 or self.channels < 1 or self.concurrency < 1:
            raise ValueError("processes, channels and concurrency must be >= 1")
        if self.duration <= 0 or self.warmup < 0:
            raise ValueError("duration must be > 0 and warm-up >= 0")


@dataclass
class WorkerResult:
    worker: int
    histogram: Histogram
    ok: int
    errors: dict[str, int]
    window_s: float
    cpu_s: float  # this worker's CPU time during the measurement window
    problem: str = ""


@dataclass
class LoadResult:
    spec: LoadSpec
    histogram: Histogram
    ok: int
    errors: dict[str, int]
    duration_s: float
    client_cpu_s: float
    client_pids: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.count / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ok_rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0


def _split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


# --------------------------------------------------------------------------- worker process side


async def _worker_async(
    spec: LoadSpec,
    index: int,
    conn: multiprocessing.connection.Connection,
    progress: Any,
) -> WorkerResult:
    import grpc

    channels = [
        grpc.aio.insecure_channel(
            spec.target,
            options=[
                ("grpc.use_local_subchannel_pool", 1),  # one real connection per channel
                ("grpc.enable_retries", 0),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ],
        )
        for _ in range(spec.channels)
    ]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), timeout=15)
        calls: list[Any] = [
            ch.unary_unary(spec.method, request_serializer=None, response_deserializer=None)
            for ch in channels
        ]
        metadata = spec.metadata or None
        hist = Histogram.empty()
        errors: Counter[str] = Counter()
        ok = 0
        ok_slot, err_slot = 0, 1
        source = spec.source
        timeout = spec.timeout

        conn.send(("ready", os.getpid()))
        # The parent answers with the common start instant (CLOCK_MONOTONIC is system-wide).
        if not conn.poll(60):
            raise TimeoutError("no start signal from the parent")
        start_ns: int = conn.recv()
        measure_ns = start_ns + int(spec.warmup * 1e9)
        end_ns = measure_ns + int(spec.duration * 1e9)
        delay = (start_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)

        cpu_at_measure = 0.0

        async def one(call: Any, data: bytes, started_ns: int) -> None:
            nonlocal ok
            code = "OK"
            try:
                await call(data, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a client-side failure is a result too
                code = f"CLIENT_{type(exc).__name__}"
            if started_ns >= measure_ns:
                hist.record(time.monotonic_ns() - started_ns)
                if code == "OK":
                    ok += 1
                    progress[ok_slot] = ok
                else:
                    errors[code] += 1
                    progress[err_slot] = progress[err_slot] + 1

        async def cpu_marker() -> None:
            nonlocal cpu_at_measure
            await asyncio.sleep(max(0.0, (measure_ns - time.monotonic_ns()) / 1e9))
            cpu_at_measure = time.process_time()

        marker = asyncio.ensure_future(cpu_marker())
        if spec.mode == "closed":
            n = _split(spec.concurrency, spec.processes, index)

            async def caller(k: int) -> None:
                call = calls[k % len(calls)]
                seq = k
                while True:
                    now = time.monotonic_ns()
                    if now >= end_ns:
                        return
                    await one(call, source.payload(index, seq), now)
                    seq += n

            await asyncio.gather(*(caller(k) for k in range(n)))
        else:
            rate = spec.rate / spec.processes
            interval_ns = 1e9 / rate
            phase_ns = index * 1e9 / spec.rate  # workers interleave their schedules
            inflight: set[asyncio.Future[None]] = set()
            i = 0
            while True:
                now = time.monotonic_ns()
                due = start_ns + int(phase_ns + i * interval_ns)
                while due <= now and due < end_ns:
                    if len(inflight) < spec.max_inflight:
                        fut = asyncio.ensure_future(one(calls[i % len(calls)], source.payload(index, i), due))
                        inflight.add(fut)
                        fut.add_done_callback(inflight.discard)
                    elif due >= measure_ns:
                        errors["CLIENT_BACKLOG"] += 1
                        progress[err_slot] = progress[err_slot] + 1
                    i += 1
                    due = start_ns + int(phase_ns + i * interval_ns)
                if due >= end_ns:
                    break
                await asyncio.sleep(max(0.0, (due - time.monotonic_ns()) / 1e9))
            if inflight:
                await asyncio.wait(inflight, timeout=timeout + 5)
        cpu_end = time.process_time()
        await marker
        window = max(1e-9, min(time.monotonic_ns(), end_ns) - measure_ns) / 1e9
        return WorkerResult(index, hist, ok, dict(errors), window, cpu_end - cpu_at_measure)
    finally:
        for ch in channels:
            await ch.close()


def _worker_main(spec: LoadSpec, index: int, conn: multiprocessing.connection.Connection) -> None:
    if spec.use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
    progress = _ProgressSender(conn)
    try:
        result = asyncio.run(_worker_async(spec, index, conn, progress))
        conn.send(("result", result))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"worker {index}: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _ProgressSender:
    """Counters the worker bumps on every call; sent to the parent at most every 0.2 s."""

    def __init__(self, conn: multiprocessing.connection.Connection):
        self.conn = conn
        self.values = [0, 0]
        self._last = 0

    def __getitem__(self, k: int) -> int:
        return self.values[k]

    def __setitem__(self, k: int, v: int) -> None:
        self.values[k] = v
        now = time.monotonic_ns()
        if now - self._last > 200_000_000:
            self._last = now
            self.conn.send(("progress", self.values[0], self.values[1]))


def worker_entry() -> None:
    """`python -m shop_mesh.bench.worker <fd>`: one load worker talking to its parent over a socket."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    conn = multiprocessing.connection.Connection(sock.detach())
    spec, index = conn.recv()
    _worker_main(spec, index, conn)


# --------------------------------------------------------------------------- parent side


ProgressFn = Callable[[float, int, int], None]  # (fraction of the run done, ok so far, errors so far)


def run_load(
    spec: LoadSpec,
    *,
    on_progress: ProgressFn | None = None,
    on_window: Callable[[str], None] | None = None,
    on_workers: Callable[[list[int]], None] | None = None,
) -> LoadResult:
    """Run one load test to completion and return its merged result.

    `on_workers(pids)` is called once the worker processes are up; `on_window("start"|"end")` when
    the measurement window opens and closes (the process monitor snapshots CPU times there).
    """
    conns: list[multiprocessing.connection.Connection] = []
    procs: list[subprocess.Popen[bytes]] = []
    problems: list[str] = []
    results: list[WorkerResult] = []
    counters = [[0, 0] for _ in range(spec.processes)]
    pids: list[int] = []
    try:
        for i in range(spec.processes):
            mine, theirs = socket.socketpair()
            p = subprocess.Popen(
                [sys.executable, "-m", "shop_mesh.bench.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            theirs.close()
            conn = multiprocessing.connection.Connection(mine.detach())
            conn.send((spec, i))
            conns.append(conn)
            procs.append(p)
        for i, conn in enumerate(conns):
            if not conn.poll(60):
                raise RuntimeError(f"load worker {i} did not become ready within 60 s")
            kind, payload = conn.recv()
            if kind != "ready":
                raise RuntimeError(str(payload))
            pids.append(int(payload))
        if on_workers:
            on_workers(pids)
        start_ns = time.monotonic_ns() + 100_000_000
        for conn in conns:
            conn.send(start_ns)
        measure_ns = start_ns + int(spec.warmup * 1e9)
        end_ns = measure_ns + int(spec.duration * 1e9)
        total_s = (end_ns - start_ns) / 1e9
        deadline_ns = end_ns + int((spec.timeout + 30) * 1e9)
        pending = dict(enumerate(conns))
        window_state = "before"
        while pending and time.monotonic_ns() < deadline_ns:
            now = time.monotonic_ns()
            if window_state == "before" and now >= measure_ns:
                window_state = "open"
                if on_window:
                    on_window("start")
            if window_state == "open" and now >= end_ns:
                window_state = "closed"
                if on_window:
                    on_window("end")
            if on_progress:
                ok = sum(c[0] for c in counters)
                err = sum(c[1] for c in counters)
                on_progress(min(1.0, max(0.0, (now - start_ns) / 1e9 / total_s)), ok, err)
            ready = multiprocessing.connection.wait(list(pending.values()), timeout=0.1)
            for item in ready:
                idx = next(k for k, v in pending.items() if v is item)
                conn = pending[idx]
                try:
                    kind, *payload = conn.recv()
                except EOFError:
                    problems.append(f"worker {idx} exited without a result")
                    del pending[idx]
                    continue
                if kind == "progress":
                    counters[idx] = [int(payload[0]), int(payload[1])]
                    continue
                if kind == "result":
                    results.append(payload[0])
                else:
                    problems.append(str(payload[0]))
                del pending[idx]
        if window_state == "before" and on_window:
            on_window("start")
            window_state = "open"
        if window_state == "open" and on_window:
            on_window("end")
        for idx in pending:
            problems.append(f"worker {idx} timed out")
    finally:
        for conn in conns:
            conn.close()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
    merged = Histogram.empty()
    errors: Counter[str] = Counter()
    ok = 0
    for r in results:
        merged.merge(r.histogram)
        errors.update(r.errors)
        ok += r.ok
    window = max((r.window_s for r in results), default=spec.duration)
    return LoadResult(
        spec=spec,
        histogram=merged,
        ok=ok,
        errors=dict(errors),
        duration_s=window,
        client_cpu_s=sum(r.cpu_s for r in results),
        client_pids=pids,
        problems=problems,
    )


def merge_errors(results: Sequence[LoadResult]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for r in results:
        c.update(r.errors)
    return dict(c)
