"""Paired A/B of the user app's cost per GetUser: two builds of the service side by side, loaded in
turns (A, B, A, B, ...) by h2load, so that the other load of a shared machine hits both alike.

    .venv/bin/python scripts/ab_user_app.py --a-rev defda27 --rounds 8 --seconds 4

A is `git archive <rev> shop_mesh` unpacked into a temporary directory and put first on PYTHONPATH; B is
this checkout. Both run as the mesh runs them (INFO log line per RPC into a file, Prometheus metrics
on, no OTLP exporter, the mesh's GRPC_EXPERIMENTS: `--a-env GRPC_EXPERIMENTS=` for grpc's default)
on copies of one seeded SQLite file, or with `--database postgres` on a PostgreSQL database each (on
the local server, shop_mesh.bench.postgres; created, seeded and dropped here). Per round: RPS
(h2load, one fixed user id, closed loop) and the app's on-CPU microseconds per call (all threads,
/proc schedstat; with PostgreSQL also its server processes' for that database).
Prints the medians and the ratios B / A.

    .venv/bin/python scripts/ab_user_app.py --a-rev HEAD --rounds 8 --seconds 4 --database postgres
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shop.user.v1 import user_pb2

from shop_mesh.bench.h2load import run_h2load
from shop_mesh.bench.postgres import create_databases, drop_databases
from shop_mesh.bench.procmon import _cpu_exact
from shop_mesh.bench.seed import seed_users_db
from shop_mesh.mesh.local import GRPC_SERVER_EXPERIMENTS, free_port

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/shop.user.v1.UserService/GetUser"


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"app did not listen on {port}")


def _start(
    name: str, pythonpath: str | None, data: Path, log: Path, extra_env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATA_DIR": str(data),
            "METRICS_PORT": str(free_port()),
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "GRPC_EXPERIMENTS": GRPC_SERVER_EXPERIMENTS,
        }
    )
    env.update(extra_env)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = log.open("wb")
    # cwd: `python -m` puts it first on sys.path, ahead of PYTHONPATH; the data dir has no code.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shop_mesh.services.user"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=data,
    )
    _wait_port(port, proc)
    time.sleep(1.0)  # schema check and health start
    where = subprocess.run(
        [sys.executable, "-c", "import shop_mesh; print(shop_mesh.__file__)"],
        env=env,
        cwd=data,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"{name}: pid {proc.pid} port {port}, code from {where}", flush=True)
    return proc, port


def _backend_pids(database: str | None) -> list[int]:
    """The PostgreSQL server processes serving `database` (none for SQLite)."""
    if database is None:
        return []
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))
            return [int(row[0]) for row in cursor.fetchall()]
    finally:
        conn.close()


def _round(
    port: int, pid: int, message: bytes, seconds: float, clients: int, streams: int, database: str | None
) -> tuple[float, float, float]:
    """RPS, the app's CPU us per call, its database server processes' CPU us per call (PostgreSQL)."""
    db0 = {b: _cpu_exact(b) for b in _backend_pids(database)}
    cpu0 = _cpu_exact(pid) or 0.0
    result = run_h2load(
        f"127.0.0.1:{port}", METHOD, message, duration=seconds, warmup=0, clients=clients, streams=streams
    )
    cpu1 = _cpu_exact(pid) or 0.0
    # Server processes alive at both ends (connections opened or closed meanwhile are not counted).
    db_us = 0.0
    for b, before in db0.items():
        after = _cpu_exact(b)
        if before is not None and after is not None:
            db_us += after - before
    if result.succeeded == 0:
        raise RuntimeError(f"no call succeeded: {result.command}")
    n = result.succeeded
    return n / round(seconds), (cpu1 - cpu0) / n * 1e6, db_us / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a-rev", default="HEAD", help="git revision of A (B is the working tree)")
    parser.add_argument("--a-env", default="", help="extra env for A, k=v,k=v")
    parser.add_argument("--b-env", default="", help="extra env for B, k=v,k=v")
    parser.add_argument("--b-pythonpath", default="", help="PYTHONPATH for B (e.g. a sitecustomize.py)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args()

    def env_of(text: str) -> dict[str, str]:
        return dict(kv.split("=", 1) for kv in text.split(",") if kv)

    procs: list[subprocess.Popen[bytes]] = []
    databases: list[str] = []  # PostgreSQL databases to drop
    with tempfile.TemporaryDirectory(prefix="ab-user-") as tmp_name:
        tmp = Path(tmp_name)
        src_a = tmp / "a"
        src_a.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.a_rev, "shop_mesh"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src_a)], input=archive, check=True)
        seed_dir = tmp / "seed"
        seed_dir.mkdir()
        sqlite_ids = seed_users_db(f"sqlite:///{seed_dir / 'user.db'}", 10_000)
        apps: dict[str, tuple[int, int, bytes, str | None]] = {}
        try:
            for name, path, extra in (("A", str(src_a), args.a_env), ("B", args.b_pythonpath, args.b_env)):
                data = tmp / f"data-{name}"
                env = env_of(extra)
                ids = sqlite_ids
                database: str | None = None
                if args.database == "postgres":
                    data.mkdir()
                    urls, names = create_databases()  # one per service; only the user one is used
                    databases.extend(names)
                    ids = seed_users_db(urls["user"], 10_000)
                    database = urls["user"].rsplit("/", 1)[1]
                    env.setdefault("DATABASE_URL", urls["user"])
                else:
                    shutil.copytree(seed_dir, data)
                proc, port = _start(name, path, data, tmp / f"{name}.log", env)
                procs.append(proc)
                message = user_pb2.GetUserRequest(user_id=ids[0]).SerializeToString()
                apps[name] = (port, proc.pid, message, database)
            for port, pid, message, database in apps.values():  # warm-up, not recorded
                _round(port, pid, message, 2, args.clients, args.streams, database)
            results: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
            for i in range(args.rounds):
                order = ("A", "B") if i % 2 == 0 else ("B", "A")
                for name in order:
                    port, pid, message, database = apps[name]
                    rps, us, db_us = _round(
                        port, pid, message, args.seconds, args.clients, args.streams, database
                    )
                    results[name].append((rps, us, db_us))
                    db_text = f"  {db_us:6.0f} us PostgreSQL CPU/call" if database else ""
                    print(f"round {i} {name}: {rps:8.0f} RPS  {us:6.0f} us CPU/call{db_text}", flush=True)
            med = {n: [statistics.median(r[k] for r in v) for k in range(3)] for n, v in results.items()}
            for n, (rps, us, db_us) in med.items():
                spread = [u for _, u, _ in results[n]]
                db_text = f", PostgreSQL {db_us:.0f} us CPU/call" if args.database == "postgres" else ""
                print(
                    f"median {n}: {rps:8.0f} RPS  {us:6.0f} us CPU/call"
                    f" (range {min(spread):.0f}-{max(spread):.0f}){db_text}"
                )
            print(f"B/A: RPS x{med['B'][0] / med['A'][0]:.3f}  CPU/call x{med['B'][1] / med['A'][1]:.3f}")
            lines = (tmp / "B.log").read_text().splitlines()
            print("B's last log line:", lines[-1] if lines else "(none)")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if databases:
                drop_databases(databases)


if __name__ == "__main__":
    main()
