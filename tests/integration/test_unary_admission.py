"""A service past its unary admission limit (MAX_INFLIGHT_UNARY) sheds cleanly: a bounded burst far
above the limit, straight to the app, gets only OK or RESOURCE_EXHAUSTED (with the limit and the
reason TOO_MANY_REQUESTS), never UNAVAILABLE, INTERNAL or a deadline, and health stays answered."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.services.common.admission import TOO_MANY_REQUESTS
from shop_mesh.services.user.app import SERVICE_NAME
from tests.support import ServiceProcess, error_details, free_port, wait_serving

LIMIT = 4
BURST = 300  # bounded: every call is sent at once, none is repeated
HEALTH_CHECKS = 20
TIMEOUT = 20.0


@pytest.fixture
async def address(tmp_path: Path) -> AsyncIterator[str]:
    # A process of its own: in one event loop with the client, the calls never overlap.
    app = ServiceProcess(
        "user",
        {
            "PORT": str(free_port()),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'user.db'}",
            "MAX_INFLIGHT_UNARY": str(LIMIT),
            "LOG_LEVEL": "WARNING",
        },
        tmp_path / "user.log",
    )
    try:
        await wait_serving(app.address, SERVICE_NAME, timeout=TIMEOUT)
        yield app.address
    finally:
        app.kill()


async def test_a_burst_beyond_the_limit_gets_only_ok_or_resource_exhausted(
    address: str, tmp_path: Path
) -> None:
    # Calls this fast finish before the server takes the next one off the wire, so nothing would
    # overlap: another writer's lock on the database holds the admitted CreateUsers in flight
    # (readers, health's database check included, are not blocked in WAL mode).
    lock = sqlite3.connect(tmp_path / "user.db", isolation_level=None)
    async with grpc.aio.insecure_channel(address) as channel:
        users = user_pb2_grpc.UserServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def one(i: int) -> tuple[str, str, str | None]:
            create = user_pb2.CreateUserRequest(
                request_id=f"burst-{i}", email=f"burst{i}@example.com", display_name="B"
            )
            try:
                await users.CreateUser(create, timeout=TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details() or "", error_details(exc)[0]
            return "OK", "", None

        lock.execute("BEGIN IMMEDIATE")
        try:
            burst = [asyncio.ensure_future(one(i)) for i in range(BURST)]
            # Every call beyond the limit is answered while the admitted ones are still held.
            refused_all = asyncio.Event()
            finished = [0]

            def count(_: object) -> None:
                finished[0] += 1
                if finished[0] == BURST - LIMIT:
                    refused_all.set()

            for fut in burst:
                fut.add_done_callback(count)
            await asyncio.wait_for(refused_all.wait(), TIMEOUT)
            # Health is never shed, however full the process is.
            statuses = [
                (
                    await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
                ).status
                for _ in range(HEALTH_CHECKS)
            ]
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        results = await asyncio.gather(*burst)

    codes = Counter(code for code, _, _ in results)
    print(f"burst of {BURST} CreateUser, limit {LIMIT}: {dict(codes)}")
    # The admitted calls are served once the database is free; every other one was shed.
    assert codes == {"OK": LIMIT, "RESOURCE_EXHAUSTED": BURST - LIMIT}, codes
    refusals = {(details, reason) for code, details, reason in results if code == "RESOURCE_EXHAUSTED"}
    assert refusals == {
        (f"too many calls in progress on this instance (limit {LIMIT}); retry later", TOO_MANY_REQUESTS)
    }
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * HEALTH_CHECKS
