"""grpc.health.v1 (Check, Watch, List) for "" and the service's own name, driven by database
reachability and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from grpc_health.v1 import health, health_pb2

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.metrics import HEALTH_SERVING

log = get_logger("health")
SERVING = health_pb2.HealthCheckResponse.SERVING
# Liveness probes ask for this name: SERVING while the process runs its event loop, whatever the
# database does, so an outage takes pods out of rotation (readiness) without restarting them.
LIVENESS = "liveness"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """The library's servicer answers Check; List and Watch are ours, from the statuses the reporter
    sets. The library's Watch never ends by itself, so one open watch held every drain for its whole
    grace period; ours sends the final NOT_SERVING and then ends the stream."""

    def __init__(self, statuses: dict[str, int]):
        super().__init__()
        self._statuses = statuses
        self._changed = asyncio.Event()
        self.closing = False  # shutdown reported: watches end after sending it
        self._open_watches = 0
        self._watches_ended = asyncio.Event()  # set once closing and no watch is open

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in self._statuses.items()}
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        last: int | None = None
        self._open_watches += 1
        try:
            while True:
                changed = self._changed  # taken before reading, so a change in between is not missed
                status = self._statuses.get(request.service, SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    # The write yields: shutdown may have set NOT_SERVING and `closing` meanwhile,
                    # and the final status must go out before the watch ends.
                    continue
                if self.closing:
                    return
                await changed.wait()
        finally:
            self._open_watches -= 1
            if self.closing and self._open_watches == 0:
                self._watches_ended.set()

    async def watches_ended(self, timeout: float) -> None:
        """Wait (bounded) until every open watch has sent the final status and ended: the server's
        own shutdown then starts with nothing of ours left to send on a health stream."""
        if self._open_watches == 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._watches_ended.wait(), timeout)


class HealthReporter:
    def __init__(self, service_names: list[str]):
        # Every status set goes through _set, which keeps this copy of it for List.
        self._statuses: dict[str, int] = {}
        self.servicer = _HealthServicer(self._statuses)
        self.names = ["", *service_names]
        self.shutting_down = False
        self._serving: bool | None = None

    async def _set(self, name: str, status: int) -> None:
        self._statuses[name] = status
        await self.servicer.set(name, status)
        self.servicer.notify()

    async def start(self) -> None:
        await self._set(LIVENESS, SERVING)
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        if self.shutting_down:
            serving = False
        if serving == self._serving:
            return
        self._serving = serving
        HEALTH_SERVING.labels(self.names[-1]).set(1 if serving else 0)
        for name in self.names:
            await self._set(name, SERVING if serving else NOT_SERVING)
        log.info("health", status="SERVING" if serving else "NOT_SERVING")

    async def enter_shutdown(self) -> None:
        """NOT_SERVING for good: the first thing that happens on SIGTERM."""
        self.shutting_down = True
        await self.set_serving(False)
        await self.servicer.enter_graceful_shutdown()  # every name NOT_SERVING, liveness too
        for name in self._statuses:
            self._statuses[name] = NOT_SERVING
        self.servicer.closing = True
        self.servicer.notify()
        await self.servicer.watches_ended(timeout=2.0)

    async def watch_database(self, database: Database, interval: float, stopping: asyncio.Event) -> None:
        """NOT_SERVING while the database is unreachable, SERVING again once it answers."""
        while not stopping.is_set():
            await self.set_serving(await database.ping(timeout=min(interval, 2.0)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
