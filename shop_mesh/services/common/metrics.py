"""Prometheus metrics shared by every service: RED per RPC, open streams, database transactions,
idempotent replays, health, event-log lag; and the metrics HTTP endpoint (its own port).

Naming follows Prometheus conventions (base units, `_total` counters, `_seconds`) with labels taken
from the OpenTelemetry RPC conventions where they exist (`rpc_service`, `rpc_method`, and the gRPC
status code as its canonical name). Labels are bounded: method names, code names, outcomes; never ids.

The hot path (one call per RPC) does no label lookups: each method gets its children once, at
registration, and a call costs one gauge inc/dec and one counter + one histogram update.
Service-specific business metrics live next to their service (shop_mesh/services/<name>/metrics.py), recorded
in the service layer or adapters; domain code never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.registry import REGISTRY

# The `_created` timestamp series double the exposition for nothing Prometheus uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds. Covers a sub-millisecond cached read up to a 10 s saga; streams land in +Inf.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DB_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

_RPC_LABELS = ("rpc_service", "rpc_method", "rpc_type")

RPC_REQUESTS = Counter(
    "rpc_server_requests",
    "RPCs handled, by method and final gRPC status code (health checks and reflection excluded).",
    [*_RPC_LABELS, "rpc_grpc_status_code"],
)
RPC_DURATION = Histogram(
    "rpc_server_duration_seconds",
    "Time from the handler's start to its status, by method and gRPC status code. For server "
    "streams: the stream's lifetime.",
    [*_RPC_LABELS, "rpc_grpc_status_code"],
    buckets=RPC_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("rpc_server_in_flight", "Unary RPCs being handled now.", list(_RPC_LABELS))
RPC_OPEN_STREAMS = Gauge(
    "rpc_server_open_streams", "Server-streaming RPCs open now (e.g. WatchOrder).", list(_RPC_LABELS)
)

DB_TRANSACTION_DURATION = Histogram(
    "db_transaction_duration_seconds",
    "Write transactions: from asking for the connection to commit or rollback.",
    ["outcome"],
    buckets=DB_BUCKETS,
)
DB_TRANSACTION_ERRORS = Counter(
    "db_transaction_errors", "Write transactions rolled back by an exception, by its type.", ["error"]
)
IDEMPOTENT_REPLAYS = Counter(
    "idempotent_replays",
    "Mutations repeated with a request_id already used: answered with the first result, no effect.",
    ["operation"],
)
HEALTH_SERVING = Gauge(
    "health_serving", "1 while the service reports SERVING on grpc.health.v1, else 0.", ["rpc_service"]
)
EVENT_LOG_LAG = Gauge(
    "event_log_reader_lag_events",
    "Events committed to the service's event log that its stream reader has not read yet.",
    ["log"],
)
# Gauges read from the database (backlogs, reader lag) are sampled this often, not on every change.
GAUGE_INTERVAL_SECONDS = 2.0


def record_event_log_lag(log: str, last_sequence: int, reader_cursor: int | None) -> None:
    if reader_cursor is not None:  # None: the reader has not started
        EVENT_LOG_LAG.labels(log).set(max(last_sequence - reader_cursor, 0))


def sampling_job(
    sample: Callable[[], Awaitable[None]], interval: float = GAUGE_INTERVAL_SECONDS
) -> Callable[[asyncio.Event], Awaitable[None]]:
    """A background job that runs `sample` (sets gauges) every `interval` seconds until stopping."""

    async def run(stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            # The database may be down: health reports that, the metrics go on.
            with contextlib.suppress(Exception):
                await sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)

    return run


class _MethodMetrics:
    """The label children of one method, resolved once (label lookups cost more than the updates)."""

    __slots__ = ("_by_code", "_method", "_service", "_type", "live")

    def __init__(self, method: str, streaming: bool):
        self._service = method[1 : method.rfind("/")]
        self._method = method[method.rfind("/") + 1 :]
        self._type = "server_stream" if streaming else "unary"
        gauge = RPC_OPEN_STREAMS if streaming else RPC_IN_FLIGHT
        self.live = gauge.labels(self._service, self._method, self._type)
        self._by_code: dict[str, tuple[Any, Any]] = {}

    def finished(self, code: str, seconds: float) -> None:
        children = self._by_code.get(code)
        if children is None:
            labels = (self._service, self._method, self._type, code)
            children = (RPC_REQUESTS.labels(*labels), RPC_DURATION.labels(*labels))
            self._by_code[code] = children  # bounded: 17 codes per method
        self.live.dec()
        children[0].inc()
        children[1].observe(seconds)


class RpcMetrics:
    """What ServerCallWrapper records per call: started() in _enter, finished() in _exit."""

    def __init__(self) -> None:
        self._methods: dict[str, _MethodMetrics] = {}

    def register(self, method: str, streaming: bool) -> None:
        if method not in self._methods:
            self._methods[method] = _MethodMetrics(method, streaming)

    def started(self, method: str) -> None:
        m = self._methods.get(method)
        if m is not None:
            m.live.inc()

    def finished(self, method: str, code: str, seconds: float) -> None:
        m = self._methods.get(method)
        if m is not None:
            m.finished(code, seconds)


# ---- database transactions and after-commit recording -------------------------------------------

# Records that must count only if the surrounding write transaction commits (e.g. "an order was
# paid"): queued here by on_commit() and run by observe_transaction() after the commit.
_after_commit: ContextVar[list[Callable[[], None]] | None] = ContextVar("after_commit", default=None)
# Off until a process serves metrics (ServiceHost with METRICS_PORT): transactions are not timed then.
_recording = False


def enable_recording() -> None:
    global _recording
    _recording = True


def on_commit(record: Callable[[], None]) -> None:
    """Run `record` when the current write transaction commits (at once outside of one)."""
    pending = _after_commit.get()
    if pending is None:
        record()
    else:
        pending.append(record)


@contextmanager
def observe_transaction() -> Iterator[None]:
    """Wraps Database.write(): latency, errors, then the after-commit records."""
    if not _recording:
        yield
        return
    pending: list[Callable[[], None]] = []
    token = _after_commit.set(pending)
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        DB_TRANSACTION_DURATION.labels("rollback").observe(time.perf_counter() - started)
        DB_TRANSACTION_ERRORS.labels(type(exc).__name__).inc()
        raise
    finally:
        _after_commit.reset(token)
    DB_TRANSACTION_DURATION.labels("commit").observe(time.perf_counter() - started)
    for record in pending:
        record()


# ---- bounded label values --------------------------------------------------------------------------

_REASON_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,47}$")


def reason_label(reason: str) -> str:
    """A machine reason code (PAYMENT_DECLINED) as it is; free text (a customer's words) never."""
    return reason if _REASON_CODE.match(reason) else "OTHER"


# ---- the endpoint ----------------------------------------------------------------------------------


class MetricsServer:
    """Prometheus text exposition on its own port (a thread of prometheus_client's WSGI server)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY):
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.host = host
        self.requested_port = port
        self.registry = registry
        self.port = 0

    def start(self) -> int:
        self._server, self._thread = start_http_server(self.requested_port, self.host, self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
