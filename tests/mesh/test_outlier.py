"""Outlier detection: a replica that fails every call is ejected by the edge; clients see no failure."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from shop.user.v1 import user_pb2, user_pb2_grpc

from tests.mesh.conftest import MeshProcess, edge_channel, host_flags, running_mesh, stat

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh-outlier")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    root: Path = tmp_path_factory.mktemp("outlier-mesh")
    # user-1 fails every non-health call; its health checks pass, so only outlier detection can eject it.
    with running_mesh(
        root / "run", replicas={"user": 2}, env=["user-1:CHAOS_UNAVAILABLE_PERCENT=100"]
    ) as running:
        running.wait_all_in_rotation()
        yield running


def test_outlier_detection_ejects_a_replica_that_keeps_failing(mesh: MeshProcess) -> None:
    admin = mesh.edge_admin
    bad = f"127.0.0.1:{mesh.instance('user-1')['inbound_port']}"
    with edge_channel(mesh) as channel:
        users = user_pb2_grpc.UserServiceStub(channel)
        user = users.CreateUser(
            user_pb2.CreateUserRequest(
                request_id=f"u-{uuid.uuid4()}", email=f"{uuid.uuid4().hex[:10]}@example.com", display_name="O"
            ),
            timeout=10,
        ).user
        ejected = False
        for _ in range(200):  # bounded
            # Every call succeeds: the edge retries user-1's UNAVAILABLE on user-0.
            users.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=10)
            if stat(admin, "cluster.user.outlier_detection.ejections_enforced_total") > 0:
                ejected = True
                break
    assert ejected, stat(admin, "cluster.user.upstream_rq_retry")
    assert "failed_outlier_check" in host_flags(admin, "user", bad)
    assert stat(admin, "cluster.user.upstream_rq_retry_success") > 0
