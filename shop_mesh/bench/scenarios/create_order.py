"""`create-order`: the full saga through the mesh (user check, authorize, capture, two databases,
events), every call a new order (fresh request_id). Targets are relative to the same call graph
doing nothing (F, from `saga-floor` in the same run) and to the saga's own capacity:

1. Closed loop, concurrency sweep: sustained orders/s C (successful calls only) ≥ 0.7 x F.
   C / L is kept as information (the old target, 0.1 x L, measured two cores against an eight-
   traversal saga; see docs/performance.md).
2. Open loop at 0.5 x C: p99 ≤ 50 ms and zero errors.
3. Open loop at 2 x C (overload), each call with a 2 s deadline: goodput (orders answered OK within
   it) ≥ 0.8 x C, and the excess answered RESOURCE_EXHAUSTED (no other error code).

Without the mesh, the same runs go straight to the order app (order wired directly to user and
payment) and are reported as information only; the targets are about the mesh. `create-order-pg`
is the same with every service on PostgreSQL.
"""

from __future__ import annotations

import uuid

from shop_mesh.bench.context import RunContext
from shop_mesh.bench.loadgen import LoadSpec
from shop_mesh.bench.payloads import CreateOrderPayloads
from shop_mesh.bench.report import Figure, RunSummary, ScenarioResult
from shop_mesh.bench.scenarios.common import (
    Deployment,
    deployment,
    empty_reason,
    max_throughput,
    ok_rps,
    ratio,
)
from shop_mesh.bench.scenarios.saga_floor import SHARED_KEY as FLOOR_KEY

NAME = "create-order"
METHOD = "/shop.order.v1.OrderService/CreateOrder"
FLOOR_FACTOR = 0.7
GOODPUT_FACTOR = 0.8
SHED_CODE = "RESOURCE_EXHAUSTED"
# The overload run's client deadline: an order answered later than this is not goodput. Without
# shedding, the queue grows past it within seconds and the server spends its capacity on calls
# whose callers have given up; with shedding the admitted ones stay fast.
OVERLOAD_DEADLINE_S = 2.0


def run(ctx: RunContext) -> ScenarioResult:
    return measure(ctx, deployment(ctx), NAME)


def run_postgres(ctx: RunContext) -> ScenarioResult:
    return measure(ctx, deployment(ctx, "postgres"), f"{NAME}-pg")


def measure(ctx: RunContext, dep: Deployment, name: str) -> ScenarioResult:
    result = ScenarioResult(name)
    via_mesh = dep.edge is not None
    target = dep.edge if dep.edge is not None else dep.direct["order"]
    where = ("mesh" if via_mesh else "direct, no mesh (info)") + (
        ", PostgreSQL" if dep.variant == "postgres" else ""
    )
    note = "" if via_mesh else dep.mesh_unavailable

    def spec(**kw: object) -> LoadSpec:
        # Every run of the scenario goes through here, so none can go to the edge without the
        # end-user token (the overload run once did: 100 % UNAUTHENTICATED, measuring nothing).
        source = CreateOrderPayloads(tuple(dep.user_ids), run_id=uuid.uuid4().hex[:8])
        return ctx.spec(target=target, method=METHOD, source=source, metadata=dep.auth(target), **kw)

    best, runs = max_throughput(ctx, f"CreateOrder ({where})", lambda c: spec(concurrency=c), dep.pids)
    result.runs.extend(runs)
    capacity = ok_rps(best)
    floor = ctx.shared.get(FLOOR_KEY)
    floor_f = float(floor) if isinstance(floor, float) else None
    versus = f" = {capacity / floor_f:.2f} x F" if floor_f else ""
    result.figures.append(
        Figure(
            name,
            f"C = sustained orders/s, {where}{versus}",
            capacity,
            "orders/s",
            f"≥ {FLOOR_FACTOR:g} x F" + (f" ({FLOOR_FACTOR * floor_f:,.0f})" if floor_f else ""),
            target_value=FLOOR_FACTOR * floor_f if (floor_f and via_mesh) else None,
            compare=">=" if via_mesh else None,
            ratio_to_l=ratio(capacity, ctx),
            note=note or ("" if floor_f else "F not measured (saga-floor did not run or failed)"),
        )
    )
    if capacity <= 0:
        for what, text in (("p99 @ 0.5 x C", "≤ 50 ms"), ("goodput @ 2 x C", "≥ 0.8 x C")):
            result.figures.append(Figure(name, what, None, "", text, note="no successful orders"))
        return result
    rate = ctx.options.rate or capacity / 2
    steady = ctx.measure(
        f"CreateOrder ({where}) @ {rate:,.0f}/s",
        spec(mode="open", rate=rate),
        dep.pids,
    )
    result.runs.append(steady)
    result.extra["series"] = [steady.label]
    _steady_rows(result, name, steady, rate, via_mesh)
    over_rate = 2 * capacity
    over = ctx.measure(
        f"CreateOrder ({where}) overload @ {over_rate:,.0f}/s",
        spec(mode="open", rate=over_rate, timeout=OVERLOAD_DEADLINE_S),
        dep.pids,
    )
    result.runs.append(over)
    # C again, right after the overload run, at the sweep's best concurrency: if the machine's other
    # load moved between the sweep and the overload run, the goodput ratio moves with it (0.33-0.81 x C
    # for the same limit, docs/performance.md); this row says whether the capacity itself moved.
    again = ctx.measure(
        f"CreateOrder ({where}) C again after overload c={best.concurrency}",
        spec(concurrency=best.concurrency, duration=max(ctx.options.duration / 4, 0.5)),
        dep.pids,
        quiet=False,
    )
    result.runs.append(again)
    _overload_rows(result, name, over, capacity, via_mesh)
    _capacity_again_row(result, name, best, over, again)
    for f in result.figures:
        f.note = f.note or note
    return result


def _steady_rows(result: ScenarioResult, name: str, steady: RunSummary, rate: float, via_mesh: bool) -> None:
    if why := empty_reason(steady):
        for what, target in (("p99", "≤ 50 ms"), ("errors", "= 0")):
            result.figures.append(
                Figure(name, f"{what} @ {rate:,.0f}/s (0.5 x C)", None, "", target, note=why)
            )
        return
    result.figures.append(
        Figure(
            name,
            f"p99 @ {rate:,.0f}/s open loop (0.5 x C)",
            steady.latency_ms["p99"],
            "ms",
            "≤ 50 ms",
            target_value=50.0 if via_mesh else None,
            compare="<=" if via_mesh else None,
        )
    )
    result.figures.append(
        Figure(
            name,
            f"errors @ {rate:,.0f}/s ({_codes(steady.errors)})",
            float(sum(steady.errors.values())),
            "errors",
            "= 0",
            target_value=0.0 if via_mesh else None,
            compare="<=" if via_mesh else None,
        )
    )


def _overload_rows(
    result: ScenarioResult, name: str, over: RunSummary, capacity: float, via_mesh: bool
) -> None:
    rate = 2 * capacity
    if why := empty_reason(over):
        for what, target in (
            ("goodput", f"≥ {GOODPUT_FACTOR:g} x C"),
            ("errors not RESOURCE_EXHAUSTED", "= 0"),
        ):
            result.figures.append(Figure(name, f"{what} @ {rate:,.0f}/s (2 x C)", None, "", target, note=why))
        return
    goodput = ok_rps(over)
    result.figures.append(
        Figure(
            name,
            f"goodput @ {rate:,.0f}/s open loop (2 x C) = {goodput / capacity:.2f} x C",
            goodput,
            "orders/s",
            f"≥ {GOODPUT_FACTOR:g} x C ({GOODPUT_FACTOR * capacity:,.0f})",
            target_value=GOODPUT_FACTOR * capacity if via_mesh else None,
            compare=">=" if via_mesh else None,
        )
    )
    # Overload must be told to the caller as RESOURCE_EXHAUSTED (not retried, cheap to refuse), not
    # as deadlines, UNAVAILABLE or a client-side backlog.
    other = {k: v for k, v in over.errors.items() if k != SHED_CODE}
    result.figures.append(
        Figure(
            name,
            f"errors other than {SHED_CODE} @ 2 x C ({_codes(over.errors)})",
            float(sum(other.values())),
            "errors",
            "= 0",
            target_value=0.0 if via_mesh else None,
            compare="<=" if via_mesh else None,
        )
    )


def _load(run: RunSummary) -> str:
    p = run.processes or {}
    window = float(p.get("window_s") or 0)
    return f"{float(p['other_cpu_s']) / window:.2f}" if window and "other_cpu_s" in p else "?"


def _capacity_again_row(
    result: ScenarioResult, name: str, best: RunSummary, over: RunSummary, again: RunSummary
) -> None:
    capacity, now = ok_rps(best), ok_rps(again)
    if why := empty_reason(again):
        result.figures.append(
            Figure(name, "C again right after the 2 x C run", None, "orders/s", "info", note=why)
        )
        return
    goodput = ok_rps(over) if not empty_reason(over) else 0.0
    result.figures.append(
        Figure(
            name,
            f"C again right after the 2 x C run = {now / capacity:.2f} x C;"
            f" goodput = {goodput / now:.2f} x it"
            f" (other load, cores: C run {_load(best)}, 2 x C run {_load(over)}, C again {_load(again)})",
            now,
            "orders/s",
            "info",
        )
    )


def _codes(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items()) or "none"
