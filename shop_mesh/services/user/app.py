"""Composition root of the user service: the only place that constructs its dependencies."""

from __future__ import annotations

import asyncio
from functools import partial

from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.idempotency_sql import IdempotencyStore
from shop_mesh.services.common.server import ServiceParts
from shop_mesh.services.user.config import UserSettings
from shop_mesh.services.user.domain import UserService
from shop_mesh.services.user.repository import SqlUserLookup, SqlUserRepository, idempotency_keys, metadata
from shop_mesh.services.user.servicer import UserServicer

SERVICE_NAME = user_pb2.DESCRIPTOR.services_by_name["UserService"].full_name


def build(settings: UserSettings, stopping: asyncio.Event) -> ServiceParts:
    # No streams or background jobs: `stopping` is part of the common signature only.
    database = Database(settings.database_url, metadata)
    service = UserService(
        database,
        SqlUserRepository,
        IdempotencyStore(idempotency_keys),
        lookup=SqlUserLookup(database),
    )
    register = partial(user_pb2_grpc.add_UserServiceServicer_to_server, UserServicer(service))
    return ServiceParts(SERVICE_NAME, database, register)
