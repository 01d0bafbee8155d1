"""The PostgreSQL variants' databases: one per service on the local server, created and dropped here.

The server is the machine's PostgreSQL at 127.0.0.1:5432 (trust auth, user postgres), the same one
the integration tests use; BENCH_POSTGRES_HOST / BENCH_POSTGRES_PORT / BENCH_POSTGRES_USER point
elsewhere on loopback. Unreachable -> `Unavailable` with the reason, so the scenarios report n/a.
"""

from __future__ import annotations

import os
import uuid

from shop_mesh.bench.env import Unavailable

SERVICES = ("user", "order", "payment")


def _server() -> tuple[str, int, str]:
    host = os.environ.get("BENCH_POSTGRES_HOST", "127.0.0.1")
    if not host.startswith("127.") and host != "localhost":
        raise Unavailable(f"BENCH_POSTGRES_HOST={host}: the benchmark only talks to loopback")
    return (
        host,
        int(os.environ.get("BENCH_POSTGRES_PORT", "5432")),
        os.environ.get("BENCH_POSTGRES_USER", "postgres"),
    )


def _admin(statements: list[str]) -> None:
    import psycopg2

    host, port, user = _server()
    conn = psycopg2.connect(host=host, port=port, user=user, dbname="postgres", connect_timeout=3)
    try:
        conn.autocommit = True  # CREATE / DROP DATABASE cannot run in a transaction
        with conn.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
    finally:
        conn.close()


def create_databases() -> tuple[dict[str, str], list[str]]:
    """A fresh database per service; returns ({service: SQLAlchemy URL}, [database names])."""
    run = uuid.uuid4().hex[:8]
    names = {service: f"shop_bench_{run}_{service}" for service in SERVICES}
    try:
        _admin([f'CREATE DATABASE "{name}"' for name in names.values()])
    except Exception as exc:
        host, port, _ = _server()
        raise Unavailable(
            f"PostgreSQL unreachable at {host}:{port} ({type(exc).__name__}: {exc})"[:300]
        ) from None
    host, port, user = _server()
    urls = {s: f"postgresql+psycopg2://{user}@{host}:{port}/{name}" for s, name in names.items()}
    return urls, list(names.values())


def drop_databases(names: list[str]) -> None:
    # FORCE: a service that did not exit cleanly may still hold connections.
    _admin([f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names])
