"""`mesh-overhead`: GetUser at a fixed 200 RPS (open loop), direct vs through the mesh.

The added latency is divided by the number of proxy hops on the way in (edge + the app's sidecar =
2). Both runs hit the same app process, with the same request sequence, one after the other. The
figures are absolute milliseconds on whatever machine runs them, so they are information; the
targets are in `envoy-floor`, which compares the same hop against a minimal Envoy measured in the
same run. The percentile chart of both runs is written next to the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from shop_mesh.bench.context import RunContext
from shop_mesh.bench.report import Figure, RunSummary, ScenarioResult
from shop_mesh.bench.scenarios.common import Deployment, deployment, empty_reason
from shop_mesh.bench.scenarios.get_user import METHOD, payloads

NAME = "mesh-overhead"
RATE = 200.0
SHARED_KEY = "mesh-overhead"  # ctx.shared: the Pair of this run, reused by envoy-floor


@dataclass
class Pair:
    rate: float
    direct: RunSummary
    mesh: RunSummary | None  # None without a mesh
    hops: int

    def added_per_hop(self, what: str) -> float | None:
        if self.mesh is None or empty_reason(self.direct) or empty_reason(self.mesh):
            return None
        return (self.mesh.latency_ms[what] - self.direct.latency_ms[what]) / self.hops


def measure_pair(ctx: RunContext, dep: Deployment) -> Pair:
    """Direct, then through edge + sidecar, at the same rate (cached for the run)."""
    cached = ctx.shared.get(SHARED_KEY)
    if isinstance(cached, Pair):
        return cached
    rate = ctx.options.rate or RATE
    source = payloads(dep)
    direct = ctx.measure(
        f"GetUser direct @ {rate:g} RPS",
        ctx.spec(target=dep.direct["user"], method=METHOD, source=source, mode="open", rate=rate),
        dep.pids,
    )
    mesh = None
    if dep.edge is not None:
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
    pair = Pair(rate, direct, mesh, dep.hops)
    ctx.shared[SHARED_KEY] = pair
    return pair


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult(NAME)
    dep = deployment(ctx)  # Unavailable: the runner reports the scenario as n/a
    pair = measure_pair(ctx, dep)
    direct, rate = pair.direct, pair.rate
    result.runs.append(direct)
    result.extra["series"] = [direct.label]
    p50_d, p99_d = direct.latency_ms["p50"], direct.latency_ms["p99"]
    result.figures.append(
        Figure(NAME, f"direct p50 @ {rate:g} RPS (p99 {p99_d:.1f} ms)", p50_d, "ms", "info")
    )
    if pair.mesh is None:
        for what in ("p50", "p99"):
            result.figures.append(
                Figure(NAME, f"added {what} per hop", None, "ms", "info", note=dep.mesh_unavailable)
            )
        return result
    mesh = pair.mesh
    result.runs.append(mesh)
    result.extra["series"] = [direct.label, mesh.label]
    result.extra["hops"] = pair.hops
    if why := empty_reason(direct) or empty_reason(mesh):
        for what in ("p50", "p99"):
            result.figures.append(Figure(NAME, f"added {what} per hop", None, "ms", "info", note=why))
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
    for what in ("p50", "p99"):
        result.figures.append(
            Figure(
                NAME,
                f"added {what} per hop (÷{pair.hops}); target in envoy-floor",
                pair.added_per_hop(what),
                "ms",
                "info",
            )
        )
    errors = sum(direct.errors.values()) + sum(mesh.errors.values())
    if errors:
        result.extra["errors"] = {"direct": direct.errors, "mesh": mesh.errors}
    return result
