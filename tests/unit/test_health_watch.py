"""A health Watch always sends the status it ends on, even when shutdown lands during a write."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from shop_mesh.services.common.health import HealthReporter

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _SlowFirstWrite:
    """A servicer context whose first write completes only when the test lets it."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.first_write_started = asyncio.Event()
        self.release_first_write = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        if not self.sent:
            self.first_write_started.set()
            await self.release_first_write.wait()
        self.sent.append(message.status)


async def test_shutdown_during_a_write_still_sends_the_final_not_serving() -> None:
    reporter = HealthReporter(["shop.user.v1.UserService"])
    await reporter.start()
    await reporter.set_serving(True)
    context = _SlowFirstWrite()
    watch = asyncio.create_task(reporter.servicer.Watch(health_pb2.HealthCheckRequest(service=""), context))
    await context.first_write_started.wait()  # SERVING is on its way out
    shutdown = asyncio.create_task(reporter.enter_shutdown())
    await asyncio.sleep(0)  # shutdown marks everything NOT_SERVING and closing while the write is pending
    context.release_first_write.set()
    await asyncio.wait_for(watch, 5)
    await asyncio.wait_for(shutdown, 5)
    assert context.sent == [SERVING, NOT_SERVING]
