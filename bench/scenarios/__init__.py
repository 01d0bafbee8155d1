"""The benchmark scenarios. Each is a function `run(ctx) -> ScenarioResult`; STANDARD is `make bench`."""

from __future__ import annotations

from collections.abc import Callable

from bench.context import RunContext
from bench.report import ScenarioResult
from bench.scenarios import baseline, create_order, get_user, mesh_overhead, startup, watch_fanout

Scenario = Callable[[RunContext], ScenarioResult]

SCENARIOS: dict[str, Scenario] = {
    "baseline": baseline.run,
    "get-user": get_user.run,
    "mesh-overhead": mesh_overhead.run,
    # Before create-order: the order app's memory is measured per stream, best on a quiet process.
    "watch-fanout": watch_fanout.run,
    "create-order": create_order.run,
    "startup": startup.run,
}

STANDARD: tuple[str, ...] = tuple(SCENARIOS)
