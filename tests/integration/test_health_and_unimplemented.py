"""grpc.health.v1 Health/List answers through real gRPC; an unimplemented method is UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc
from sqlalchemy import MetaData

from shop_mesh.services.common.config import ServiceSettings
from shop_mesh.services.common.db import Database
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.server import ServiceHost, ServiceParts
from tests.support import error_details, wait_serving

SERVICE = "shop.user.v1.UserService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _host(tmp_path: Path) -> ServiceHost:
    settings = ServiceSettings(service_name="probe", port=0, data_dir=tmp_path)

    def register(server: grpc.aio.Server) -> None:
        # The generated base class: every method is "not implemented".
        user_pb2_grpc.add_UserServiceServicer_to_server(user_pb2_grpc.UserServiceServicer(), server)  # type: ignore[abstract]

    parts = ServiceParts(
        grpc_service_name=SERVICE, database=Database(settings.database_url, MetaData()), register=register
    )
    return ServiceHost(settings, parts, stopping=asyncio.Event())


def _statuses(reply: health_pb2.HealthListResponse) -> dict[str, int]:
    return {name: response.status for name, response in reply.statuses.items()}


async def test_health_list_reports_every_registered_name(tmp_path: Path) -> None:
    host = _host(tmp_path)
    port = await host.start()
    try:
        address = f"127.0.0.1:{port}"
        await wait_serving(address, SERVICE)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.List(health_pb2.HealthListRequest(), timeout=5)
            assert _statuses(reply) == {"": SERVING, SERVICE: SERVING, "liveness": SERVING}
            # List agrees with Check for each name it reports.
            for name, status in _statuses(reply).items():
                check = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert check.status == status
            await host.health.enter_shutdown()  # the first step of SIGTERM
            after = await stub.List(health_pb2.HealthListRequest(), timeout=5)
        assert _statuses(after) == {"": NOT_SERVING, SERVICE: NOT_SERVING, "liveness": NOT_SERVING}
    finally:
        await host.stop(grace=0)


async def test_unimplemented_method_is_unimplemented_not_internal(tmp_path: Path) -> None:
    host = _host(tmp_path)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await user_pb2_grpc.UserServiceStub(channel).GetUser(
                    user_pb2.GetUserRequest(user_id=new_id("usr")), timeout=5
                )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert error_details(err.value)[0] == "UNIMPLEMENTED"
    finally:
        await host.stop(grace=0)
