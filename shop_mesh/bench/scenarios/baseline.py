"""`baseline`: a bare grpc.aio server answering grpc.health.v1 Check, direct. Its maximum RPS is L.

L is measured with the same Python load generator (same processes, channels and concurrency sweep)
that drives every other scenario, so each ratio compares like with like: on this 2-core machine the
client's CPU comes out of the same two cores as the server's. h2load (a C client) is run against the
same server as a cross-check of how much of the machine the Python client takes.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from shop_mesh.bench import h2load
from shop_mesh.bench.context import RunContext
from shop_mesh.bench.env import start_baseline
from shop_mesh.bench.payloads import FixedPayload
from shop_mesh.bench.report import Figure, RunSummary, ScenarioResult

METHOD = "/grpc.health.v1.Health/Check"


def max_throughput(
    ctx: RunContext, label: str, make_spec: object, watch: dict[str, int]
) -> tuple[RunSummary, list[RunSummary]]:
    """Closed-loop sweep over the configured concurrency levels; the best OK-RPS is the maximum."""
    runs: list[RunSummary] = []
    for c in ctx.options.concurrency:
        spec = make_spec(c)  # type: ignore[operator]
        runs.append(ctx.measure(f"{label} c={c}", spec, watch))
    best = max(runs, key=lambda r: r.ok / r.duration_s if r.duration_s else 0.0)
    return best, runs


def ok_rps(run: RunSummary) -> float:
    return run.ok / run.duration_s if run.duration_s else 0.0


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult("baseline")
    proc, port = start_baseline(ctx.stack)
    target = f"127.0.0.1:{port}"
    request = health_pb2.HealthCheckRequest().SerializeToString()
    try:
        best, runs = max_throughput(
            ctx,
            "baseline Health/Check",
            lambda c: ctx.spec(target=target, method=METHOD, source=FixedPayload(request), concurrency=c),
            {"baseline-server": proc.pid},
        )
        result.runs.extend(runs)
        limit = ok_rps(best) if best.ok else None
        ctx.limit = limit
        result.figures.append(
            Figure(
                "baseline",
                "L: max RPS, Python client",
                limit,
                "RPS",
                "(the limit)",
                ratio_to_l=1.0 if limit else None,
                note="" if limit else "no successful calls",
            )
        )
        if ctx.options.h2load and h2load.available():
            try:
                h = h2load.run_h2load(
                    target,
                    METHOD,
                    request,
                    duration=max(1.0, ctx.options.duration),
                    warmup=ctx.options.warmup,
                    clients=4,
                    streams=32,
                )
                result.extra["h2load"] = h.to_json()
                ctx.console.print(
                    f"\n[bold]baseline via h2load[/bold] (C client, {h.clients}x{h.streams_per_client} "
                    f"streams): {h.rps:,.0f} RPS, {h.succeeded:,} ok, {h.failed + h.errored} failed"
                )
                result.figures.append(
                    Figure(
                        "baseline",
                        "max RPS, h2load client",
                        h.rps,
                        "RPS",
                        "info",
                        ratio_to_l=h.rps / limit if limit else None,
                    )
                )
            except Exception as exc:  # h2load is optional; its failure is reported, not fatal
                result.extra["h2load_error"] = str(exc)
                ctx.console.print(f"[yellow]h2load failed: {exc}[/yellow]")
        if limit:
            client_share = best.client_cpu_s / best.duration_s
            result.extra["client_cpu_cores_at_L"] = client_share
    finally:
        ctx.stack.stop(proc)
        ctx.stack.procs.remove(proc)
    return result
