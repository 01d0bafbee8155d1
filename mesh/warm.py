"""`python -m mesh.warm services.order`: a warm standby of a service's app, for the runner's supervision.

It imports what a cold start spends its time on (the composition root and the shared runtime: gRPC,
protobuf stubs, SQLAlchemy, OpenTelemetry, structlog), then waits on stdin. A line means "the app
crashed, take over": it runs `python -m services.order` in this very process, with the environment it
was started with (the instance's: same port, same settings). EOF means "not needed": it exits 0.
Nothing binds a port or opens a database before that line arrives.
"""

from __future__ import annotations

import contextlib
import importlib
import runpy
import sys

USAGE = "usage: python -m mesh.warm services.<service>"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("services."):
        print(USAGE, file=sys.stderr)
        return 2
    module = argv[0]
    for name in (f"{module}.config", f"{module}.app", "services.common.server"):
        importlib.import_module(name)
    # Imported only once the app runs (event loop, default SQLite driver, client tracing): optional here.
    for name in ("uvloop", "aiosqlite", "opentelemetry.instrumentation.grpc"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    if not sys.stdin.readline():
        return 0
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
