"""`create-order`: the full saga through the mesh (user check, authorize, capture, two databases,
events), every call a new order (fresh request_id).

1. Closed loop, concurrency sweep: sustained orders/s (successful calls only) ≥ 0.1 x L.
2. Open loop at half that target, 0.05 x L orders/s: p99 ≤ 50 ms and zero errors.

Without the mesh, the same two runs go straight to the order app (order wired directly to user and
payment) and are reported as information only; the targets are about the mesh.
"""

from __future__ import annotations

import uuid

from bench.context import RunContext
from bench.payloads import CreateOrderPayloads
from bench.report import Figure, ScenarioResult
from bench.scenarios.common import deployment, empty_reason, max_throughput, ok_rps, ratio

NAME = "create-order"
METHOD = "/shop.order.v1.OrderService/CreateOrder"


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult(NAME)
    dep = deployment(ctx)  # Unavailable: the runner reports the scenario as n/a
    via_mesh = dep.edge is not None
    target = dep.edge if dep.edge is not None else dep.direct["order"]
    where = "mesh" if via_mesh else "direct, no mesh (info)"
    source = CreateOrderPayloads(tuple(dep.user_ids), run_id=uuid.uuid4().hex[:8])
    best, runs = max_throughput(
        ctx,
        f"CreateOrder ({where})",
        lambda c: ctx.spec(
            target=target, method=METHOD, source=source, concurrency=c, metadata=dep.auth(target)
        ),
        dep.pids,
    )
    result.runs.extend(runs)
    sustained = ok_rps(best)
    limit = ctx.limit
    result.figures.append(
        Figure(
            NAME,
            f"sustained orders/s, {where}",
            sustained,
            "orders/s",
            "≥ 0.1 x L",
            target_value=0.1 * limit if (limit and via_mesh) else None,
            compare=">=" if via_mesh else None,
            ratio_to_l=ratio(sustained, ctx),
        )
    )
    # Half the target rate; without L (single scenario run without baseline) half the measured one.
    rate = ctx.options.rate or (0.05 * limit if limit else sustained / 2)
    if rate <= 0:
        result.figures.append(
            Figure(NAME, "open-loop p99", None, "ms", "≤ 50 ms", note="no successful orders")
        )
        return result
    source_open = CreateOrderPayloads(tuple(dep.user_ids), run_id=uuid.uuid4().hex[:8])
    steady = ctx.measure(
        f"CreateOrder ({where}) @ {rate:,.0f}/s",
        ctx.spec(
            target=target,
            method=METHOD,
            source=source_open,
            mode="open",
            rate=rate,
            metadata=dep.auth(target),
        ),
        dep.pids,
    )
    result.runs.append(steady)
    result.extra["series"] = [steady.label]
    if why := empty_reason(steady):
        for what, target in (("p99", "≤ 50 ms"), ("errors", "= 0")):
            result.figures.append(
                Figure(NAME, f"{what} at {rate:,.0f} orders/s open-loop", None, "", target, note=why)
            )
        return result
    errors = sum(steady.errors.values())
    result.figures.append(
        Figure(
            NAME,
            f"p99 @ {rate:,.0f}/s open-loop",
            steady.latency_ms["p99"],
            "ms",
            "≤ 50 ms",
            target_value=50.0 if via_mesh else None,
            compare="<=" if via_mesh else None,
        )
    )
    result.figures.append(
        Figure(
            NAME,
            f"errors @ {rate:,.0f}/s ({_codes(steady.errors)})",
            float(errors),
            "errors",
            "= 0",
            target_value=0.0 if via_mesh else None,
            compare="<=" if via_mesh else None,
        )
    )
    if not via_mesh:
        for f in result.figures:
            f.note = dep.mesh_unavailable
    return result


def _codes(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items()) or "none"
