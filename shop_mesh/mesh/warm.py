"""`python -m shop_mesh.mesh.warm shop_mesh.services.order`: a warm standby of a service's app, for the
runner's supervision.

It imports what a cold start spends its time on (the composition root and the shared runtime: gRPC,
protobuf stubs, SQLAlchemy, OpenTelemetry, structlog), then waits on stdin. A line means "the app
crashed, take over": it runs `python -m shop_mesh.services.order` in this very process, with the environment
it
was started with (the instance's: same port, same settings). EOF means "not needed": it exits 0.
Nothing binds a port or opens a database before that line arrives. If MESH_WARM_READY_FD names an
inherited pipe, one byte on it says the imports are done.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import runpy
import sys

USAGE = "usage: python -m shop_mesh.mesh.warm shop_mesh.services.<service>"
READY_FD_ENV = "MESH_WARM_READY_FD"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("shop_mesh.services."):
        print(USAGE, file=sys.stderr)
        return 2
    module = argv[0]
    for name in (f"{module}.config", f"{module}.app", "shop_mesh.services.common.server"):
        importlib.import_module(name)
    # Imported only once the app runs (event loop, the database drivers, client tracing): optional here.
    for name in (
        "uvloop",
        "sqlalchemy.dialects.sqlite.pysqlite",
        "psycopg2",
        "opentelemetry.instrumentation.grpc",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # Tell the runner it is warm now (`mesh status` shows it): one byte on the fd it passed.
    ready_fd = os.environ.pop(READY_FD_ENV, "")
    if ready_fd:
        with contextlib.suppress(OSError):
            os.write(int(ready_fd), b"1")
            os.close(int(ready_fd))
    if not sys.stdin.readline():
        return 0
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
