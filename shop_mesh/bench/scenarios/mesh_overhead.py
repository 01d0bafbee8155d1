"""`mesh-overhead`: GetUser at a fixed 200 RPS (open loop), direct vs through the mesh.

The added latency is divided by the number of proxy hops on the way in (edge + the app's sidecar =
2). The figures are absolute milliseconds on whatever machine runs them, so they are information;
the targets are in `envoy-floor`, which compares the same hop against a minimal Envoy.

Both scenarios share one *interleaved* measurement (`measure_paths`): several short rounds, each
measuring every path (direct, rendered edge + sidecar, minimal Envoy pair) against the same app
process at the same rate, the order reversed every other round (A B C, C B A, ...), the mesh (and
its health checks) up throughout. A figure is the median over the rounds of that round's value,
with the range of the rounds beside it: one long run per path, one after the other, let drift of
the machine between the runs decide the ratio (the same config measured 1.00 x then 1.37 x).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shop_mesh.bench import minimal_envoy
from shop_mesh.bench.context import RunContext
from shop_mesh.bench.env import Proc, wait_serving
from shop_mesh.bench.histogram import Histogram
from shop_mesh.bench.report import Figure, RunSummary, ScenarioResult
from shop_mesh.bench.scenarios.common import Deployment, deployment, empty_reason
from shop_mesh.bench.scenarios.get_user import METHOD, payloads
from shop_mesh.mesh.runner import envoy_binary
from shop_mesh.mesh.topology import load

NAME = "mesh-overhead"
RATE = 200.0
SHARED_KEY = "mesh-overhead"  # ctx.shared: the Paths of this run, reused by envoy-floor
DIRECT, RENDERED, MINIMAL = "direct", "rendered", "minimal"
ROUND_WARMUP_S = 0.3  # each run opens a fresh h2c connection (Envoy keeps its upstream ones)


@dataclass
class Spread:
    """The median of per-round values and their range (None: no round gave a value)."""

    median: float
    low: float
    high: float
    rounds: int  # rounds that gave a value

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        kept = [v for v in values if v is not None]
        if not kept:
            return None
        return cls(statistics.median(kept), min(kept), max(kept), len(kept))

    def text(self, fmt: str = "{:.2f}") -> str:
        return f"median of {self.rounds}, range {fmt.format(self.low)} to {fmt.format(self.high)}"


@dataclass
class Paths:
    """Every round's run of each measured path (a path without a deployment is absent)."""

    rate: float
    hops: int
    rounds: list[dict[str, RunSummary]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # path -> why it was not measured
    sequence: list[list[str]] = field(default_factory=list)  # per round, the paths in measured order

    @property
    def names(self) -> list[str]:
        return [p for p in (DIRECT, RENDERED, MINIMAL) if self.rounds and p in self.rounds[0]]

    def runs(self) -> list[RunSummary]:
        return [r[p] for r in self.rounds for p in (DIRECT, RENDERED, MINIMAL) if p in r]

    def empty_reason(self) -> str:
        return next((why for run in self.runs() if (why := empty_reason(run))), "")

    def added(self, path: str, what: str) -> list[float | None]:
        """Per round: (path p - direct p) / hops, in ms."""
        return [
            (r[path].latency_ms[what] - r[DIRECT].latency_ms[what]) / self.hops if path in r else None
            for r in self.rounds
        ]

    def per_round(self, fn: Callable[[dict[str, RunSummary]], float | None]) -> list[float | None]:
        return [fn(r) for r in self.rounds]

    def pooled(self, path: str) -> RunSummary:
        """The path's rounds as one run (for the chart and the absolute figures)."""
        runs = [r[path] for r in self.rounds]
        h = Histogram.empty()
        errors: dict[str, int] = {}
        for run in runs:
            h.merge(run.histogram)
            for code, n in run.errors.items():
                errors[code] = errors.get(code, 0) + n
        return RunSummary.from_histogram(
            f"GetUser {path}, {len(runs)} rounds pooled",
            h,
            target=runs[0].target,
            mode=runs[0].mode,
            ok=sum(r.ok for r in runs),
            errors=errors,
            duration_s=sum(r.duration_s for r in runs),
        )


def rounds_of(ctx: RunContext) -> int:
    return ctx.options.rounds if ctx.options.rounds else (2 if ctx.options.smoke else 6)


def measure_paths(ctx: RunContext, dep: Deployment) -> Paths:
    """Direct, rendered mesh and minimal Envoys, interleaved over rounds (cached for the run)."""
    cached = ctx.shared.get(SHARED_KEY)
    if isinstance(cached, Paths):
        return cached
    rate = ctx.options.rate or RATE
    n = rounds_of(ctx)
    # The per-path measured time of one long run, split over the rounds.
    duration = max(ctx.options.duration / n, 0.5)
    warmup = min(ctx.options.warmup, ROUND_WARMUP_S)
    paths = Paths(rate, dep.hops)
    source = payloads(dep)
    targets: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {DIRECT: (dep.direct["user"], ())}
    watch = dict(dep.pids)
    procs: list[Proc] = []
    ready: list[tuple[str, Proc]] = []  # the minimal edge, to wait for inside the try
    if dep.edge is None or dep.mesh is None or dep.mesh.run_dir is None:
        paths.unavailable[RENDERED] = paths.unavailable[MINIMAL] = f"needs the mesh: {dep.mesh_unavailable}"
    else:
        targets[RENDERED] = (dep.edge, dep.auth(dep.edge))
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
        procs = [path.edge_proc, path.sidecar_proc]
        ready.append((path.edge, path.edge_proc))
        targets[MINIMAL] = (path.edge, ())
        watch |= {"min-edge": path.edge_proc.pid, "min-sidecar": path.sidecar_proc.pid}
    try:
        for address, proc in ready:
            wait_serving(address, ["shop.user.v1.UserService"], 30, proc)
        order = list(targets)
        for k in range(n):
            measured: dict[str, RunSummary] = {}
            # Reversed every other round: each path's mean position in the sequence is the same.
            sequence = order if k % 2 == 0 else order[::-1]
            paths.sequence.append(sequence)
            for i, name in enumerate(sequence):
                target, metadata = targets[name]
                spec = ctx.spec(
                    target=target,
                    method=METHOD,
                    source=source,
                    mode="open",
                    rate=rate,
                    duration=duration,
                    warmup=warmup,
                    metadata=metadata,
                )
                # Quiet-wait once per round, not between its paths: they share the round's background.
                # The three runs of the old method waited up to 3 x --quiet-wait: so do the rounds.
                measured[name] = ctx.measure(
                    f"GetUser {name} @ {rate:g} RPS, round {k + 1}/{n}",
                    spec,
                    watch,
                    quiet=i == 0,
                    quiet_wait=ctx.options.quiet_wait * len(targets) / n,
                )
            paths.rounds.append(measured)
    finally:
        for proc in procs:
            ctx.stack.release(proc)
    ctx.shared[SHARED_KEY] = paths
    return paths


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult(NAME)
    dep = deployment(ctx)  # Unavailable: the runner reports the scenario as n/a
    paths = measure_paths(ctx, dep)
    rate = paths.rate
    shown = [p for p in paths.names if p != MINIMAL]  # envoy-floor shows the minimal path
    result.runs.extend(r[p] for r in paths.rounds for p in shown)
    result.extra["rounds"] = len(paths.rounds)
    result.extra["sequence"] = paths.sequence
    if why := paths.empty_reason():
        for what in ("p50", "p99"):
            result.figures.append(Figure(NAME, f"added {what} per hop", None, "ms", "info", note=why))
        return result
    pooled = {p: paths.pooled(p) for p in shown}
    result.runs.extend(pooled.values())  # no process stats: the rounds carry the other load
    result.extra["series"] = [run.label for run in pooled.values()]
    direct = pooled[DIRECT]
    result.figures.append(
        Figure(
            NAME,
            f"direct p50 @ {rate:g} RPS, rounds pooled (p99 {direct.latency_ms['p99']:.1f} ms)",
            direct.latency_ms["p50"],
            "ms",
            "info",
        )
    )
    if RENDERED not in pooled:
        for what in ("p50", "p99"):
            result.figures.append(
                Figure(NAME, f"added {what} per hop", None, "ms", "info", note=paths.unavailable[RENDERED])
            )
        return result
    mesh = pooled[RENDERED]
    result.extra["hops"] = paths.hops
    result.figures.append(
        Figure(
            NAME,
            f"mesh p50 @ {rate:g} RPS, rounds pooled (p99 {mesh.latency_ms['p99']:.1f} ms)",
            mesh.latency_ms["p50"],
            "ms",
            "info",
        )
    )
    for what in ("p50", "p99"):
        values = paths.added(RENDERED, what)
        spread = Spread.of(values)
        result.extra[f"added_{what}_per_hop_ms"] = values
        result.figures.append(
            Figure(
                NAME,
                f"added {what} per hop (÷{paths.hops}), "
                + (spread.text("{:.3f}") if spread else "no round")
                + "; target in envoy-floor",
                spread.median if spread else None,
                "ms",
                "info",
            )
        )
    errors = {p: run.errors for p, run in pooled.items() if run.errors}
    if errors:
        result.extra["errors"] = errors
    return result
