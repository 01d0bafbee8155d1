"""`mesh-overhead`: GetUser at a fixed 200 RPS (open loop), direct vs through the mesh.

The added latency is divided by the number of proxy hops on the way in (edge + the app's sidecar =
2): added p50 ≤ 0.3 ms per hop, added p99 ≤ 1 ms per hop. Both runs hit the same app process, with
the same request sequence, one after the other. The percentile chart of both runs is written next
to the JSON.
"""

from __future__ import annotations

from bench.context import RunContext
from bench.report import Figure, ScenarioResult
from bench.scenarios.common import deployment, empty_reason
from bench.scenarios.get_user import METHOD, payloads

NAME = "mesh-overhead"
RATE = 200.0


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult(NAME)
    dep = deployment(ctx)  # Unavailable: the runner reports the scenario as n/a
    rate = ctx.options.rate or RATE
    source = payloads(dep)
    direct = ctx.measure(
        f"GetUser direct @ {rate:g} RPS",
        ctx.spec(target=dep.direct["user"], method=METHOD, source=source, mode="open", rate=rate),
        dep.pids,
    )
    result.runs.append(direct)
    result.extra["series"] = [direct.label]
    p50_d, p99_d = direct.latency_ms["p50"], direct.latency_ms["p99"]
    result.figures.append(
        Figure(NAME, f"direct p50 @ {rate:g} RPS (p99 {p99_d:.1f} ms)", p50_d, "ms", "info")
    )
    if dep.edge is None:
        for what, limit in (("p50", 0.3), ("p99", 1.0)):
            result.figures.append(
                Figure(
                    NAME, f"added {what} per hop", None, "ms", f"≤ {limit:g} ms", note=dep.mesh_unavailable
                )
            )
        return result
    mesh = ctx.measure(
        f"GetUser via edge @ {rate:g} RPS",
        ctx.spec(
            target=dep.edge,
            method=METHOD,
            source=source,
            mode="open",
            rate=rate,
            metadata=dep.auth(dep.edge),
        ),
        dep.pids,
    )
    result.runs.append(mesh)
    result.extra["series"] = [direct.label, mesh.label]
    result.extra["hops"] = dep.hops
    if why := empty_reason(direct) or empty_reason(mesh):
        for what, limit in (("p50", 0.3), ("p99", 1.0)):
            result.figures.append(
                Figure(NAME, f"added {what} per hop", None, "ms", f"≤ {limit:g} ms", note=why)
            )
        return result
    result.figures.append(
        Figure(
            NAME,
            f"mesh p50 @ {rate:g} RPS (p99 {mesh.latency_ms['p99']:.1f} ms)",
            mesh.latency_ms["p50"],
            "ms",
            "info",
        )
    )
    for what, limit in (("p50", 0.3), ("p99", 1.0)):
        added = (mesh.latency_ms[what] - direct.latency_ms[what]) / dep.hops
        result.figures.append(
            Figure(
                NAME,
                f"added {what} per hop (÷{dep.hops})",
                added,
                "ms",
                f"≤ {limit:g} ms",
                target_value=limit,
                compare="<=",
            )
        )
    errors = sum(direct.errors.values()) + sum(mesh.errors.values())
    if errors:
        result.extra["errors"] = {"direct": direct.errors, "mesh": mesh.errors}
    return result
