"""Prometheus metrics shared by every service: RED per RPC, open streams, database transactions,
idempotent replays, health, event-log lag; and the metrics HTTP endpoint (its own port).

Naming follows Prometheus conventions (base units, `_total` counters, `_seconds`) with labels taken
from the OpenTelemetry RPC conventions where they exist (`rpc_service`, `rpc_method`, and the gRPC
status code as its canonical name). Labels are bounded: method names, code names, outcomes; never ids.

The hot path (one call per RPC) does no label lookups and takes no lock: each method gets its
series once, at registration, and a call adds to plain numbers that the scrape reads (_RpcCollector).
Service-specific business metrics live next to their service (shop_mesh/services/<name>/metrics.py), recorded
in the service layer or adapters; domain code never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from bisect import bisect_left
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
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.utils import floatToGoString

# The `_created` timestamp series double the exposition for nothing Prometheus uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds. Covers a sub-millisecond cached read up to a 10 s saga; streams land in +Inf.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DB_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

_RPC_LABELS = ("rpc_service", "rpc_method", "rpc_type")
_RPC_CODE_LABELS = (*_RPC_LABELS, "rpc_grpc_status_code")
_RPC_REQUESTS_HELP = (
    "RPCs handled, by method and final gRPC status code (health checks and reflection excluded)."
)
_RPC_DURATION_HELP = (
    "Time from the handler's start to its status, by method and gRPC status code. For server "
    "streams: the stream's lifetime."
)
_RPC_IN_FLIGHT_HELP = "Unary RPCs being handled now."
_RPC_OPEN_STREAMS_HELP = "Server-streaming RPCs open now (e.g. WatchOrder)."
_RPC_BUCKET_LABELS = [floatToGoString(b) for b in RPC_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]

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
    """One method's RPC series as plain numbers: the in-flight gauge, and per status code the
    duration histogram's bucket counts (not cumulative) and sum; the request counter is their total.

    Updated on the event-loop thread only, with no lock: prometheus_client's Counter, Histogram and
    Gauge take a mutex per update and cost ~10 us per call in a GetUser's ~600 (docs/performance.md,
    "GetUser per-call cost, session 6"); these updates cost about 1 us. The scrape, on the metrics
    server's thread, reads them through _RpcCollector.
    """

    __slots__ = ("by_code", "labels", "live", "streaming")

    def __init__(self, method: str, streaming: bool):
        service = method[1 : method.rfind("/")]
        name = method[method.rfind("/") + 1 :]
        self.labels = (service, name, "server_stream" if streaming else "unary")
        self.streaming = streaming
        self.live = 0
        # code -> [sum, count in bucket 0, ..., count in +Inf]; bounded: 17 codes per method
        self.by_code: dict[str, list[float]] = {}

    def finished(self, code: str, seconds: float) -> None:
        self.live -= 1
        series = self.by_code.get(code)
        if series is None:
            series = self.by_code[code] = [0.0] * (len(RPC_BUCKETS) + 2)
        series[0] += seconds
        series[bisect_left(RPC_BUCKETS, seconds) + 1] += 1  # le is inclusive: x <= bound


# Every method any RpcMetrics registered, process-wide (as the Prometheus metric objects were).
_RPC_METHODS: dict[str, _MethodMetrics] = {}


class _RpcCollector(Collector):
    """Exposes the rpc_server_* families from _MethodMetrics, as prometheus_client's own Counter,
    Histogram and Gauge of the same names, labels and buckets did."""

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily, GaugeMetricFamily
    ]:
        return (
            CounterMetricFamily("rpc_server_requests", _RPC_REQUESTS_HELP, labels=_RPC_CODE_LABELS),
            HistogramMetricFamily("rpc_server_duration_seconds", _RPC_DURATION_HELP, labels=_RPC_CODE_LABELS),
            GaugeMetricFamily("rpc_server_in_flight", _RPC_IN_FLIGHT_HELP, labels=_RPC_LABELS),
            GaugeMetricFamily("rpc_server_open_streams", _RPC_OPEN_STREAMS_HELP, labels=_RPC_LABELS),
        )

    def collect(self) -> Iterator[Metric]:
        requests, duration, in_flight, streams = families = self._families()
        for m in list(_RPC_METHODS.values()):
            (streams if m.streaming else in_flight).add_metric(m.labels, m.live)
            for code, series in list(m.by_code.items()):
                snapshot = series[:]  # one copy, so count, buckets and +Inf agree
                cumulative, buckets = 0.0, []
                for label, count in zip(_RPC_BUCKET_LABELS, snapshot[1:], strict=True):
                    cumulative += count
                    buckets.append((label, cumulative))
                requests.add_metric((*m.labels, code), cumulative)
                duration.add_metric((*m.labels, code), buckets, snapshot[0])
        yield from families

    def describe(self) -> Iterator[Metric]:
        # Names only (no samples), so the registry refuses a second family of the same name.
        yield from self._families()


REGISTRY.register(_RpcCollector())


class RpcMetrics:
    """What ServerCallWrapper records per call: started() in _enter, finished() in _exit."""

    def __init__(self) -> None:
        self._methods: dict[str, _MethodMetrics] = {}

    def register(self, method: str, streaming: bool) -> None:
        if method not in self._methods:
            shared = _RPC_METHODS.get(method)
            if shared is None:
                shared = _RPC_METHODS[method] = _MethodMetrics(method, streaming)
            self._methods[method] = shared

    def started(self, method: str) -> None:
        m = self._methods.get(method)
        if m is not None:
            m.live += 1

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
