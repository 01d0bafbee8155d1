"""`get-user`: GetUser against 10,000 users, maximum throughput, direct and through edge + sidecar.

Requests cycle through all seeded user ids (pre-serialized). Direct ≥ 0.6 x L; through the mesh
(edge → mTLS → user's sidecar → app) ≥ 0.5 x L.
"""

from __future__ import annotations

from shop.user.v1 import user_pb2

from shop_mesh.bench import h2load
from shop_mesh.bench.context import RunContext
from shop_mesh.bench.payloads import CyclePayloads
from shop_mesh.bench.report import Figure, ScenarioResult
from shop_mesh.bench.scenarios.common import Deployment, deployment, max_throughput, ok_rps, rps_figure

METHOD = "/shop.user.v1.UserService/GetUser"
NAME = "get-user"


def payloads(dep: Deployment) -> CyclePayloads:
    return CyclePayloads(tuple(user_pb2.GetUserRequest(user_id=u).SerializeToString() for u in dep.user_ids))


def run(ctx: RunContext) -> ScenarioResult:
    return measure(ctx, deployment(ctx), NAME)  # Unavailable: the runner reports the scenario as n/a


def run_postgres(ctx: RunContext) -> ScenarioResult:
    """`get-user-pg`: the same with every service on PostgreSQL (same targets relative to L)."""
    return measure(ctx, deployment(ctx, "postgres"), f"{NAME}-pg")


def measure(ctx: RunContext, dep: Deployment, name: str) -> ScenarioResult:
    result = ScenarioResult(name)
    source = payloads(dep)
    db = ", PostgreSQL" if dep.variant == "postgres" else ""
    want = ctx.options.target
    if ctx.options.mode == "open":
        return _open_loop(ctx, dep, source, result)
    if want in ("direct", "both"):
        best, runs = max_throughput(
            ctx,
            f"GetUser direct{db}",
            lambda c: ctx.spec(target=dep.direct["user"], method=METHOD, source=source, concurrency=c),
            dep.pids,
        )
        result.runs.extend(runs)
        result.extra.setdefault("series", []).append(best.label)
        result.figures.append(rps_figure(name, f"direct max RPS{db}", ok_rps(best), 0.6, ctx))
        if ctx.options.h2load and h2load.available() and dep.variant == "sqlite":
            try:
                h = h2load.run_h2load(
                    dep.direct["user"],
                    METHOD,
                    source.items[0],
                    duration=max(1.0, ctx.options.duration),
                    warmup=ctx.options.warmup,
                    clients=4,
                    streams=16,
                )
                result.extra["h2load_direct"] = h.to_json()
                ctx.console.print(
                    f"\n[bold]GetUser direct via h2load[/bold]: {h.rps:,.0f} RPS (one fixed user id)"
                )
                result.figures.append(
                    Figure(
                        name,
                        "direct max RPS, h2load client",
                        h.rps,
                        "RPS",
                        "info",
                        ratio_to_l=_r(h.rps, ctx),
                    )
                )
            except Exception as exc:
                result.extra["h2load_error"] = str(exc)
    if want in ("edge", "both"):
        if dep.edge is None:
            result.figures.append(
                Figure(
                    name,
                    f"mesh max RPS (edge + sidecar){db}",
                    None,
                    "RPS",
                    "≥ 0.5 x L",
                    note=dep.mesh_unavailable,
                )
            )
        else:
            edge = dep.edge
            best, runs = max_throughput(
                ctx,
                f"GetUser via edge{db}",
                lambda c: ctx.spec(
                    target=edge, method=METHOD, source=source, concurrency=c, metadata=dep.auth(edge)
                ),
                dep.pids,
            )
            result.runs.extend(runs)
            result.extra.setdefault("series", []).append(best.label)
            result.figures.append(
                rps_figure(name, f"mesh max RPS (edge + sidecar){db}", ok_rps(best), 0.5, ctx)
            )
    return result


def _open_loop(
    ctx: RunContext, dep: Deployment, source: CyclePayloads, result: ScenarioResult
) -> ScenarioResult:
    """`--mode open`: GetUser at a fixed rate (--rate, default 200) on the chosen targets; latency only."""
    rate = ctx.options.rate or 200.0
    targets = [("direct", dep.direct["user"])] if ctx.options.target in ("direct", "both") else []
    if ctx.options.target in ("edge", "both") and dep.edge is not None:
        targets.append(("mesh", dep.edge))
    for where, target in targets:
        run = ctx.measure(
            f"GetUser {where} @ {rate:g} RPS",
            ctx.spec(
                target=target,
                method=METHOD,
                source=source,
                mode="open",
                rate=rate,
                metadata=dep.auth(target),
            ),
            dep.pids,
        )
        result.runs.append(run)
        result.extra.setdefault("series", []).append(run.label)
        result.figures.append(
            Figure(
                NAME,
                f"{where} p50 @ {rate:g} RPS (p99 {run.latency_ms['p99']:.1f} ms)",
                run.latency_ms["p50"],
                "ms",
                "info",
            )
        )
    return result


def _r(v: float, ctx: RunContext) -> float | None:
    return v / ctx.limit if ctx.limit else None
