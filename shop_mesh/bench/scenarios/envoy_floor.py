"""`envoy-floor`: the mesh's hop against the cheapest Envoy hop this machine can do, in the same run.

mesh-overhead's measurement (GetUser at 200 RPS open loop, direct, then through the rendered edge
and the user's rendered sidecar) is repeated through a minimal edge and sidecar
(shop_mesh/bench/minimal_envoy.py:
HTTP/2 router only, the same mTLS between the proxies) in front of the same app process. Targets:

- added p50 per hop, rendered / minimal ≤ 1.25; added p99 per hop ≤ 1.5;
- CPU per call of the user's rendered sidecar / the minimal sidecar ≤ 1.3 (CPU seconds of the Envoy
  process over the run's window, divided by the calls of the run).

The absolute figures (per-hop ms, CPU µs per call) are info rows.
"""

from __future__ import annotations

from shop_mesh.bench import minimal_envoy
from shop_mesh.bench.context import RunContext
from shop_mesh.bench.env import Unavailable, wait_serving
from shop_mesh.bench.report import Figure, RunSummary, ScenarioResult
from shop_mesh.bench.scenarios.common import deployment, empty_reason
from shop_mesh.bench.scenarios.get_user import METHOD, payloads
from shop_mesh.bench.scenarios.mesh_overhead import measure_pair
from shop_mesh.mesh.runner import envoy_binary
from shop_mesh.mesh.topology import load

NAME = "envoy-floor"
P50_FACTOR, P99_FACTOR, CPU_FACTOR = 1.25, 1.5, 1.3
MIN_ADDED_MS = 0.005  # below this the minimal hop is lost in the timer's noise: no ratio


def cpu_per_call_us(run: RunSummary, label: str) -> float | None:
    procs = (run.processes or {}).get("processes", [])
    cpu = next((float(p["cpu_s"]) for p in procs if p["label"] == label), None)
    return cpu / run.count * 1e6 if cpu is not None and run.count else None


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult(NAME)
    dep = deployment(ctx)
    if dep.mesh is None or dep.mesh.run_dir is None:
        raise Unavailable(f"needs the mesh: {dep.mesh_unavailable}")
    pair = measure_pair(ctx, dep)
    topo = load()
    path = minimal_envoy.start(
        ctx.stack,
        ctx.workdir / "envoy-floor",
        envoy_binary(),
        dep.direct["user"],
        "user",
        dep.mesh.run_dir / "pki",
        {name: topo.spiffe_id(name) for name in topo.identities()},
    )
    try:
        wait_serving(path.edge, ["shop.user.v1.UserService"], 30, path.edge_proc)
        watch = {**dep.pids, "min-edge": path.edge_proc.pid, "min-sidecar": path.sidecar_proc.pid}
        minimal = ctx.measure(
            f"GetUser via minimal Envoys @ {pair.rate:g} RPS",
            ctx.spec(target=path.edge, method=METHOD, source=payloads(dep), mode="open", rate=pair.rate),
            watch,
        )
    finally:
        ctx.stack.release(path.edge_proc)
        ctx.stack.release(path.sidecar_proc)
    # All three runs, so the chart shows direct, minimal and rendered side by side.
    result.runs.extend([pair.direct, minimal] + ([pair.mesh] if pair.mesh else []))
    result.extra["series"] = [pair.direct.label, minimal.label] + ([pair.mesh.label] if pair.mesh else [])
    hops = pair.hops
    why = empty_reason(minimal) or empty_reason(pair.direct) or (empty_reason(pair.mesh) if pair.mesh else "")
    for what, factor in (("p50", P50_FACTOR), ("p99", P99_FACTOR)):
        project = pair.added_per_hop(what)
        floor = None if why else (minimal.latency_ms[what] - pair.direct.latency_ms[what]) / hops
        result.figures.append(
            Figure(NAME, f"minimal Envoy: added {what} per hop (÷{hops})", floor, "ms", "info", note=why)
        )
        note = why
        value = None
        if not note and (project is None or floor is None):
            note = "no mesh figure"
        elif not note and floor is not None and floor < MIN_ADDED_MS:
            note = f"minimal hop adds {floor:.3f} ms (< {MIN_ADDED_MS * 1000:g} µs: noise), no ratio"
        elif project is not None and floor is not None:
            value = project / floor
        result.figures.append(
            Figure(
                NAME,
                f"added {what} per hop: rendered / minimal"
                + (
                    f" ({project:.3f} / {floor:.3f} ms)"
                    if value is not None and project is not None and floor is not None
                    else ""
                ),
                value,
                "x",
                f"≤ {factor:g} x",
                target_value=factor,
                compare="<=",
                note=note,
            )
        )
    rendered_cpu = cpu_per_call_us(pair.mesh, "sidecar-user") if pair.mesh else None
    minimal_cpu = cpu_per_call_us(minimal, "min-sidecar")
    for label, value in (("rendered user sidecar", rendered_cpu), ("minimal sidecar", minimal_cpu)):
        result.figures.append(
            Figure(NAME, f"CPU per call, {label}", value, "µs", "info", note=_missing(value))
        )
    for label, run_, key in (("rendered edge", pair.mesh, "edge"), ("minimal edge", minimal, "min-edge")):
        value = cpu_per_call_us(run_, key) if run_ else None
        result.figures.append(
            Figure(NAME, f"CPU per call, {label}", value, "µs", "info", note=_missing(value))
        )
    ratio = rendered_cpu / minimal_cpu if rendered_cpu is not None and minimal_cpu else None
    result.figures.append(
        Figure(
            NAME,
            "sidecar CPU per call: rendered / minimal",
            ratio,
            "x",
            f"≤ {CPU_FACTOR:g} x",
            target_value=CPU_FACTOR,
            compare="<=",
            note="" if ratio is not None else "no CPU sample of one of the sidecars",
        )
    )
    return result


def _missing(value: float | None) -> str:
    return "" if value is not None else "no CPU sample"
