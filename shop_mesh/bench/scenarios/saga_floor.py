"""`saga-floor`: the create-order call graph doing nothing, through the same mesh. Its orders/s is F.

The local mesh is started a second time (its own run directory and ports) with the null services of
shop_mesh/bench/null_app.py in place of the real apps: the same edge, sidecars, mTLS, RBAC, retries and
routes, and an order app whose CreateOrder makes the saga's three upstream calls (GetUser,
AuthorizePayment, CapturePayment) through its sidecar and answers a canned response. No database,
no domain code, no interceptors. A closed-loop sweep through the edge gives F, the most orders/s
this machine can push through the saga's eight Envoy traversals and four Python hops; create-order
is measured against it (≥ 0.7 x F). It runs right after the baseline, before any other deployment
is up, and stops its mesh when done.
"""

from __future__ import annotations

import uuid

from shop_mesh.bench.context import RunContext
from shop_mesh.bench.env import Unavailable
from shop_mesh.bench.mesh import SERVICES, start_mesh
from shop_mesh.bench.payloads import CreateOrderPayloads
from shop_mesh.bench.report import Figure, ScenarioResult
from shop_mesh.bench.scenarios.common import max_throughput, ok_rps, ratio

NAME = "saga-floor"
METHOD = "/shop.order.v1.OrderService/CreateOrder"
SHARED_KEY = "saga-floor"  # ctx.shared: F in orders/s (absent if it could not be measured)


def null_mesh_env() -> dict[str, str]:
    """`python -m shop_mesh.mesh run --env` entries that swap every app for its null service."""
    env = {"MESH_APP_MODULE": "shop_mesh.bench.null_app"}
    for service in SERVICES:
        env[f"{service}:NULL_SERVICE"] = service
    return env


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult(NAME)
    mesh = start_mesh(ctx.stack, ctx.workdir / f"mesh-floor-{uuid.uuid4().hex[:6]}", env=null_mesh_env())
    try:
        ctx.console.print(f"null-service mesh up: edge {mesh.edge}, apps {mesh.direct}")
        # The null user service answers any id; the ids only shape the requests like create-order's.
        source = CreateOrderPayloads(
            tuple(f"usr_floor{i:05d}" for i in range(64)), run_id=uuid.uuid4().hex[:8]
        )
        best, runs = max_throughput(
            ctx,
            "CreateOrder, null services (mesh)",
            lambda c: ctx.spec(
                target=mesh.edge,
                method=METHOD,
                source=source,
                concurrency=c,
                metadata=(("authorization", f"Bearer {mesh.token}"),),
            ),
            mesh.pids,
        )
    finally:
        ctx.stack.release(mesh.proc)
    result.runs.extend(runs)
    result.extra["series"] = [best.label]
    floor = ok_rps(best)
    if floor <= 0:
        raise Unavailable(
            f"no CreateOrder succeeded through the null-service mesh ({best.errors or best.problems})"
        )
    ctx.shared[SHARED_KEY] = floor
    result.figures.append(
        Figure(
            NAME,
            "F = sustained orders/s, null services through the mesh",
            floor,
            "orders/s",
            "info",
            ratio_to_l=ratio(floor, ctx),
        )
    )
    return result
