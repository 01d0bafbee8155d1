"""grpc.health.v1 for "" and the service's own name, driven by database reachability and shutdown."""

from __future__ import annotations

import asyncio
import contextlib

from grpc_health.v1 import health, health_pb2

from services.common.db import Database
from services.common.logging import get_logger
from services.common.metrics import HEALTH_SERVING

log = get_logger("health")
SERVING = health_pb2.HealthCheckResponse.SERVING
# Liveness probes ask for this name: SERVING while the process runs its event loop, whatever the
# database does, so an outage takes pods out of rotation (readiness) without restarting them.
LIVENESS = "liveness"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    def __init__(self, service_names: list[str]):
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *service_names]
        self.shutting_down = False
        self._serving: bool | None = None

    async def start(self) -> None:
        await self.servicer.set(LIVENESS, SERVING)
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        if self.shutting_down:
            serving = False
        if serving == self._serving:
            return
        self._serving = serving
        HEALTH_SERVING.labels(self.names[-1]).set(1 if serving else 0)
        for name in self.names:
            await self.servicer.set(name, SERVING if serving else NOT_SERVING)
        log.info("health", status="SERVING" if serving else "NOT_SERVING")

    async def enter_shutdown(self) -> None:
        """NOT_SERVING for good: the first thing that happens on SIGTERM."""
        self.shutting_down = True
        await self.set_serving(False)
        await self.servicer.enter_graceful_shutdown()

    async def watch_database(self, database: Database, interval: float, stopping: asyncio.Event) -> None:
        """NOT_SERVING while the database is unreachable, SERVING again once it answers."""
        while not stopping.is_set():
            await self.set_serving(await database.ping(timeout=min(interval, 2.0)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
