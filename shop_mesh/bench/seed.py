"""Seeding the user database for the scenarios (10,000 users by default).

Two ways, both documented in docs/performance.md:
- `seed_users_db`: straight into the service's database with one bulk INSERT on the user service's
  own table definition (shop_mesh.services.user.repository), checked by reading one back through its
  repository — about a second for 10,000 users;
  used when the benchmark owns the service's data directory (direct runs, its own mesh).
- `seed_users_grpc`: through the public API (CreateUser, 64 concurrent calls), for a target whose
  database the benchmark cannot reach; slower, but needs nothing but the address.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime


async def _seed_db(database_url: str, count: int) -> list[str]:
    from sqlalchemy import insert

    from shop_mesh.services.common.db import Database
    from shop_mesh.services.common.ids import new_id
    from shop_mesh.services.user.domain import UserState
    from shop_mesh.services.user.repository import SqlUserRepository, metadata, users

    db = Database(database_url, metadata)
    try:
        await db.create_schema()
        ids: list[str] = []
        run = uuid.uuid4().hex[:8]
        now = datetime.now(UTC)
        rows = []
        for i in range(count):
            user_id = new_id("usr")
            ids.append(user_id)
            rows.append(
                {
                    "user_id": user_id,
                    "email": f"bench-{run}-{i}@example.com",
                    "display_name": f"Bench User {i}",
                    "state": UserState.ACTIVE.value,
                    "create_time": now,
                    "update_time": now,
                }
            )
        # One executemany on the repository's own table; then read one back through the
        # repository, so a schema drift fails here and not in the middle of a run.
        await db.write(lambda session: session.execute(insert(users), rows))
        got = await db.read(lambda session: SqlUserRepository(session).get(ids[0]))
        if got is None or got.state is not UserState.ACTIVE:
            raise RuntimeError("seeded users cannot be read back through the repository")
        return ids
    finally:
        await db.dispose()


def seed_users_db(database_url: str, count: int) -> list[str]:
    return asyncio.run(_seed_db(database_url, count))


async def _seed_grpc(target: str, count: int, concurrency: int) -> list[str]:
    import grpc
    from shop.user.v1 import user_pb2, user_pb2_grpc

    run = uuid.uuid4().hex[:8]
    ids: list[str] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = user_pb2_grpc.UserServiceStub(ch)
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:
                resp = await stub.CreateUser(
                    user_pb2.CreateUserRequest(
                        request_id=f"bench-seed-{run}-{i}",
                        email=f"bench-{run}-{i}@example.com",
                        display_name=f"Bench User {i}",
                    ),
                    timeout=30,
                )
                ids.append(resp.user.user_id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids


def seed_users_grpc(target: str, count: int, concurrency: int = 64) -> list[str]:
    return asyncio.run(_seed_grpc(target, count, concurrency))
