"""Server bootstrap shared by every service: gRPC server, health, reflection, interceptors, and the
SIGTERM sequence (health NOT_SERVING -> optional delay -> streams end -> in-flight RPCs drain -> exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import pkgutil
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from shop_mesh.services.common.admission import StreamAdmission, UnaryAdmission
from shop_mesh.services.common.config import ServiceSettings
from shop_mesh.services.common.db import Database
from shop_mesh.services.common.health import HealthReporter
from shop_mesh.services.common.interceptors import ServerCallWrapper
from shop_mesh.services.common.logging import configure_logging, get_logger
from shop_mesh.services.common.metrics import MetricsServer, RpcMetrics, enable_recording
from shop_mesh.services.common.pagination import configure_page_tokens
from shop_mesh.services.common.telemetry import configure_tracing

log = get_logger("server")

S = TypeVar("S", bound=ServiceSettings)
# How long stop() lets background jobs finish their current step before cancelling them.
JOB_STOP_SECONDS = 5.0

# A background job gets the `stopping` event and must return soon after it is set.
BackgroundJob = Callable[[asyncio.Event], Awaitable[None]]


@dataclass(frozen=True)
class ServiceParts:
    """What a service's composition root hands to the host."""

    grpc_service_name: str  # e.g. shop.user.v1.UserService
    database: Database
    register: Callable[[grpc.aio.Server], None]  # adds the servicer(s)
    on_start: Callable[[], Awaitable[None]] | None = None  # after the schema exists (e.g. seed counters)
    background: Sequence[tuple[str, BackgroundJob]] = ()
    on_stop: Callable[[], Awaitable[None]] | None = None  # e.g. close upstream channels


def _all_shop_service_names() -> list[str]:
    """Every service the installed contracts (the `shop` stubs) declare, found by walking the package:
    a new service's stubs are listed without editing this list (docs/adding-a-service.md)."""
    import shop

    names: list[str] = []
    for module in pkgutil.walk_packages(shop.__path__, "shop."):
        if module.ispkg or not module.name.endswith("_pb2"):
            continue
        # Imported here so the descriptors are in the default pool that reflection serves from.
        descriptor = importlib.import_module(module.name).DESCRIPTOR
        names.extend(svc.full_name for svc in descriptor.services_by_name.values())
    return sorted(names)


def _add_reflection_v1(server: grpc.aio.Server, names: list[str]) -> None:
    """Serve grpc.reflection.v1 too (newer grpcurl and Postman try it first). grpcio-reflection only
    ships v1alpha; the v1 messages are field-for-field the same, so the same servicer answers both."""
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "grpc.reflection.v1.ServerReflection", {"ServerReflectionInfo": handler}
            )
        ]
    )


class ServiceHost:
    """Runs one service: start() binds and serves, stop() is the graceful SIGTERM path."""

    def __init__(self, settings: ServiceSettings, parts: ServiceParts, *, stopping: asyncio.Event):
        self.settings = settings
        self.parts = parts
        configure_page_tokens(settings.page_token_secret.get_secret_value())
        # Shared with the servicers: streams end when it is set.
        self.stopping = stopping
        self.health = HealthReporter([parts.grpc_service_name])
        self.server: grpc.aio.Server | None = None
        self.port: int = 0
        self._ready = False
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics: MetricsServer | None = None
        if settings.metrics_port:
            self.metrics = MetricsServer(settings.metrics_host, settings.metrics_port)
            enable_recording()

    async def start(self) -> int:
        settings = self.settings
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", 4 * settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Sidecars keep HTTP/2 connections alive with pings; accept them.
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        # Every handler, ours and health's and reflection's, is wrapped once as it is registered.
        streams = StreamAdmission(settings.max_open_streams)
        unary = UnaryAdmission(settings.max_inflight_unary, settings.unary_min_deadline_ms / 1e3)
        rpc_metrics = RpcMetrics() if self.metrics is not None else None
        registrar = ServerCallWrapper(
            settings.chaos_unavailable_percent, streams, metrics=rpc_metrics, unary=unary
        ).registrar(server)
        self.parts.register(registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, registrar)
        names = [self.parts.grpc_service_name]
        if settings.reflect_all_services:
            names = _all_shop_service_names()
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], registrar)
        _add_reflection_v1(registrar, [*names, health.SERVICE_NAME, reflection.SERVICE_NAME])
        self.port = server.add_insecure_port(settings.address)
        self.server = server
        await self.health.start()
        if self.metrics is not None:
            self.metrics.start()
        await server.start()
        log.info(
            "listening",
            address=f"{settings.host}:{self.port}",
            database=self.parts.database.url.render_as_string(),
        )
        self._spawn("initialize", self._initialize())
        return self.port

    def _spawn(self, name: str, job: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await job
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background_job_failed", job=name)

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    async def _initialize(self) -> None:
        """Create the schema, retrying while the database is unreachable (health stays NOT_SERVING)."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                await self.parts.database.create_schema()
                if self.parts.on_start is not None:
                    await self.parts.on_start()
                break
            except Exception as exc:
                log.warning("database_not_ready", error=type(exc).__name__, retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                delay = min(delay * 2, 5.0)
        if self.stopping.is_set():
            return
        self._ready = True
        await self.health.set_serving(True)
        self._spawn(
            "health",
            self.health.watch_database(
                self.parts.database, self.settings.database_check_interval_seconds, self.stopping
            ),
        )
        for name, job in self.parts.background:
            self._spawn(name, job(self.stopping))

    @property
    def ready(self) -> bool:
        return self._ready

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace_period_seconds if grace is None else grace
        log.info("shutting_down", grace_s=grace)
        await self.health.enter_shutdown()
        if self.settings.shutdown_delay_seconds:
            await asyncio.sleep(self.settings.shutdown_delay_seconds)
        self.stopping.set()
        if self.server is not None:
            # Rejects new RPCs at once; in-flight ones have `grace` seconds, then are cancelled.
            await self.server.stop(grace)
        # Jobs see `stopping` and return after their current step. Cancelling one inside a database
        # transaction can strand its connection, and with it SQLite's write lock, so cancel only
        # the ones still running after a bounded wait (e.g. stuck in an upstream call).
        if self._tasks:
            _, still_running = await asyncio.wait(self._tasks, timeout=min(grace, JOB_STOP_SECONDS) or 0.1)
            for task in still_running:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.parts.on_stop is not None:
            await self.parts.on_stop()
        await self.parts.database.dispose()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped")


def run_service(settings: S, build: Callable[[S, asyncio.Event], ServiceParts]) -> None:
    """Entry point of every `python -m shop_mesh.services.X`: serve until SIGTERM/SIGINT, drain, exit 0."""
    configure_logging(settings.service_name, settings.log_level)
    configure_tracing(settings.service_name, settings.otel_exporter_otlp_endpoint)

    async def serve() -> None:
        stopping = asyncio.Event()
        host = ServiceHost(settings, build(settings, stopping), stopping=stopping)
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        freeze_startup_heap()
        await host.start()
        await stop_requested.wait()
        await host.stop()

    # uvloop: a cheaper event loop under every RPC (measured in docs/performance.md); asyncio's own
    # loop where uvloop is not installed.
    with asyncio.Runner(loop_factory=uvloop_factory()) as runner:
        runner.run(serve())


def freeze_startup_heap() -> None:
    """Move what start-up built (modules, protobuf descriptors, SQLAlchemy tables and compiled
    statements: ~all of the heap, and alive until exit) out of the cyclic collector's view. A full
    collection then scans only what serving allocated since: under CreateOrder load the order and
    payment apps' full passes took 70-270 ms each, stalling every call in flight (the saga's p99 at
    half capacity, docs/performance.md). Collected first, so no garbage is frozen."""
    gc.collect()
    gc.freeze()


def uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory for an `asyncio.Runner`, or None (asyncio's loop) without uvloop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
