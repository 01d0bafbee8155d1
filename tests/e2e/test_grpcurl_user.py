"""A developer's view of the user service: `python -m shop_mesh.services.user` as a real process, driven with
the real grpcurl binary through server reflection; SIGTERM exits 0 and the data survives a restart."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest

from shop_mesh.services.user.app import SERVICE_NAME
from tests.support import GRPCURL, ServiceProcess, free_port, run_grpcurl, wait_serving

pytestmark = pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl binary not installed")


def grpcurl(
    address: str, *args: str, data: dict[str, object] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_grpcurl(address, *args, data=data, max_time=10)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def start(tmp_path: Path, data_dir: Path) -> ServiceProcess:
    env = {"PORT": str(free_port()), "DATA_DIR": str(data_dir), "DATABASE_URL": "", "USER_DATABASE_URL": ""}
    service = ServiceProcess("user", env, tmp_path / f"user-{env['PORT']}.log")
    try:
        asyncio.run(wait_serving(service.address, SERVICE_NAME, timeout=30))
    except BaseException:
        service.kill()
        raise
    return service


def stop(service: ServiceProcess) -> int:
    service.signal(signal.SIGTERM)
    try:
        return service.wait(timeout=30)
    finally:
        service.kill()


def test_grpcurl_lists_describes_and_calls_user_service(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    service = start(tmp_path, data_dir)
    try:
        address = service.address
        assert SERVICE_NAME in ok(grpcurl(address, "list")).split()

        described = ok(grpcurl(address, "describe", SERVICE_NAME))
        for rpc, level in (
            ("CreateUser", "IDEMPOTENT"),
            ("GetUser", "NO_SIDE_EFFECTS"),
            ("ListUsers", "NO_SIDE_EFFECTS"),
            ("UpdateUser", "IDEMPOTENT"),
            ("DeleteUser", "IDEMPOTENT"),
        ):
            # The retry class is part of the contract: reflection shows it to every client.
            assert (
                f"rpc {rpc} ( .shop.user.v1.{rpc}Request ) returns ( .shop.user.v1.{rpc}Response ) {{\n"
                f"    option idempotency_level = {level};\n  }}"
            ) in described

        created = json.loads(
            ok(
                grpcurl(
                    address,
                    f"{SERVICE_NAME}/CreateUser",
                    data={"request_id": "e2e-1", "email": "Curl@Example.com", "display_name": " Curl "},
                )
            )
        )["user"]
        assert created["user_id"].startswith("usr_")
        assert (created["email"], created["display_name"], created["state"]) == (
            "curl@example.com",
            "Curl",
            "USER_STATE_ACTIVE",
        )
        assert created["create_time"].endswith("Z")

        got = json.loads(
            ok(grpcurl(address, f"{SERVICE_NAME}/GetUser", data={"user_id": created["user_id"]}))
        )
        assert got["user"] == created

        missing = grpcurl(
            address, f"{SERVICE_NAME}/GetUser", data={"user_id": "usr_01J0000000000000000000ABSN"}
        )
        assert missing.returncode != 0
        assert "NotFound" in missing.stderr and "USER_NOT_FOUND" in missing.stderr

        invalid = grpcurl(
            address,
            f"{SERVICE_NAME}/CreateUser",
            data={"request_id": "e2e-2", "email": "nope", "display_name": "X"},
        )
        assert "InvalidArgument" in invalid.stderr and '"field":"email"' in invalid.stderr.replace(" ", "")
    finally:
        exit_code = stop(service)
    assert exit_code == 0, service.logs()[-2000:]

    with closing(sqlite3.connect(data_dir / "user.db")) as conn:
        rows = conn.execute("SELECT user_id, email, state FROM users").fetchall()
    assert rows == [(created["user_id"], "curl@example.com", "ACTIVE")]

    restarted = start(tmp_path, data_dir)
    try:
        again = json.loads(
            ok(grpcurl(restarted.address, f"{SERVICE_NAME}/GetUser", data={"user_id": created["user_id"]}))
        )
        assert again["user"] == created
    finally:
        restart_exit = stop(restarted)
    assert restart_exit == 0, restarted.logs()[-2000:]
