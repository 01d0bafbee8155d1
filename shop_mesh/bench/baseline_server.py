"""The `baseline` server: a bare grpc.aio server with nothing but grpc.health.v1 Check.

No interceptors, no logging, no database: the most a Python gRPC server can answer on this machine,
the limit L that every other figure is divided by. Run as its own process:

    python -m shop_mesh.bench.baseline_server [--port 0] [--no-uvloop]

It prints `PORT <n>` on stdout once it listens and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServingHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check answers SERVING, nothing else (also the null services' health: shop_mesh/bench/null_app.py)."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def serve_until_signalled(server: grpc.aio.Server) -> None:
    """Serve a started server until SIGTERM/SIGINT, then stop it with a short grace."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(ServingHealth(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"PORT {bound}", flush=True)
    await serve_until_signalled(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shop_mesh.bench.baseline_server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
