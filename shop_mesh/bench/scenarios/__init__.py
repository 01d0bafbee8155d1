"""The benchmark scenarios. Each is a function `run(ctx) -> ScenarioResult`; STANDARD is `make bench`."""

from __future__ import annotations

from collections.abc import Callable

from shop_mesh.bench.context import RunContext
from shop_mesh.bench.report import ScenarioResult
from shop_mesh.bench.scenarios import (
    baseline,
    create_order,
    envoy_floor,
    get_user,
    mesh_overhead,
    saga_floor,
    startup,
    watch_fanout,
)

Scenario = Callable[[RunContext], ScenarioResult]

SCENARIOS: dict[str, Scenario] = {
    "baseline": baseline.run,
    # Right after the baseline, before the real deployment is up: F for create-order's targets.
    "saga-floor": saga_floor.run,
    "get-user": get_user.run,
    "mesh-overhead": mesh_overhead.run,
    "envoy-floor": envoy_floor.run,  # reuses mesh-overhead's two runs of the same invocation
    # Before create-order: the order app's memory is measured per stream, best on a quiet process.
    "watch-fanout": watch_fanout.run,
    "create-order": create_order.run,
    # Every service on the local PostgreSQL (its own deployment; the SQLite one is stopped first).
    "get-user-pg": get_user.run_postgres,
    "create-order-pg": create_order.run_postgres,
    "startup": startup.run,
}

STANDARD: tuple[str, ...] = tuple(SCENARIOS)

# Scenarios whose targets need another one's figure of the same invocation: that one runs first.
NEEDS: dict[str, str] = {"create-order": "saga-floor", "create-order-pg": "saga-floor"}

# The final table shows a PostgreSQL variant right below its SQLite scenario (they run apart: one
# deployment at a time).
SHOWN_AFTER: dict[str, str] = {"get-user-pg": "get-user", "create-order-pg": "create-order"}


def display_order(names: list[str]) -> list[str]:
    shown = [n for n in names if n not in SHOWN_AFTER or SHOWN_AFTER[n] not in names]
    for name, anchor in SHOWN_AFTER.items():
        if name in names and anchor in names:
            shown.insert(shown.index(anchor) + 1, name)
    return shown
