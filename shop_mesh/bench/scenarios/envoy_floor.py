"""`envoy-floor`: the mesh's hop against the cheapest Envoy hop this machine can do, in the same run.

mesh-overhead's measurement (GetUser at 200 RPS open loop) goes direct, through the rendered edge
and the user's rendered sidecar, and through a minimal edge and sidecar (shop_mesh/bench/minimal_envoy.py:
HTTP/2 router only, the same mTLS between the proxies) in front of the same app process, the three
interleaved over several short rounds with the mesh up throughout (mesh_overhead.measure_paths). Targets:

- added p50 per hop, rendered / minimal ≤ 1.25; added p99 per hop ≤ 1.5: each path's added latency
  against the same round's direct run, median over the rounds, then rendered's / minimal's;
- CPU per call of the user's rendered sidecar / the minimal sidecar ≤ 1.3: each sidecar's CPU seconds
  over its runs' windows (the scheduler's ns counters: a round's tens of ms would be a few 10 ms
  ticks in psutil's figure) / the runs' calls, summed over the rounds.
Each row shows the per-round ratios' range.

The absolute figures (per-hop ms, CPU µs per call) are info rows.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from shop_mesh.bench.context import RunContext
from shop_mesh.bench.env import Unavailable
from shop_mesh.bench.report import Figure, RunSummary, ScenarioResult
from shop_mesh.bench.scenarios.common import deployment
from shop_mesh.bench.scenarios.mesh_overhead import DIRECT, MINIMAL, RENDERED, Paths, Spread, measure_paths

NAME = "envoy-floor"
P50_FACTOR, P99_FACTOR, CPU_FACTOR = 1.25, 1.5, 1.3
MIN_ADDED_MS = 0.005  # a hop adding less than this over its round's direct run: noise, no ratio


def cpu_s(run: RunSummary, label: str) -> float | None:
    """CPU seconds of `label` in the run's window: the scheduler's ns figure where there is one."""
    procs = (run.processes or {}).get("processes", [])
    stat = next((p for p in procs if p["label"] == label), None)
    if stat is None:
        return None
    exact = stat.get("cpu_exact_s")
    return float(exact if exact is not None else stat["cpu_s"])


def cpu_per_call_us(runs: list[RunSummary], label: str) -> float | None:
    """CPU of `label` over all `runs` / their calls (None if a run has no sample of it)."""
    cpus = [cpu_s(run, label) for run in runs]
    calls = sum(run.count for run in runs)
    if not runs or any(c is None for c in cpus) or not calls:
        return None
    return sum(c for c in cpus if c is not None) / calls * 1e6


def latency_ratios(paths: Paths, what: str) -> list[float | None]:
    """Per round: rendered's added latency / minimal's. None where either hop adds less than
    MIN_ADDED_MS: that round's direct run was about as slow as (or slower than) a proxied one, so it
    measured the machine, not the hops; a ratio there would be huge, or negative and a free PASS."""
    rendered, minimal = paths.added(RENDERED, what), paths.added(MINIMAL, what)
    return [
        r / m if r is not None and m is not None and min(r, m) >= MIN_ADDED_MS else None
        for r, m in zip(rendered, minimal, strict=True)
    ]


@dataclass
class HopRatio:
    """Rendered / minimal added latency per hop: the ratio of the two paths' medians over the rounds
    that measured both hops (dividing after the median: one round's small minimal hop would make a
    large ratio), with the per-round ratios' spread."""

    value: float
    rendered_ms: float
    minimal_ms: float
    per_round: Spread


def hop_ratio(paths: Paths, what: str) -> HopRatio | None:
    """None if fewer than verdict_rounds rounds measured both hops."""
    ratios = latency_ratios(paths, what)
    rendered, minimal = paths.added(RENDERED, what), paths.added(MINIMAL, what)
    kept = [(r, m) for r, m, q in zip(rendered, minimal, ratios, strict=True) if q is not None]
    spread = Spread.of(ratios)
    if spread is None or len(kept) < verdict_rounds(len(ratios)):
        return None
    r_med = statistics.median(r for r, _ in kept if r is not None)
    m_med = statistics.median(m for _, m in kept if m is not None)
    return HopRatio(r_med / m_med, r_med, m_med, spread)


def verdict_rounds(n: int) -> int:
    """Rounds with a ratio needed for a verdict: at least half of them (else the median is noise)."""
    return (n + 1) // 2


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult(NAME)
    dep = deployment(ctx)
    if dep.mesh is None or dep.mesh.run_dir is None:
        raise Unavailable(f"needs the mesh: {dep.mesh_unavailable}")
    paths = measure_paths(ctx, dep)
    if MINIMAL not in paths.names or RENDERED not in paths.names:
        raise Unavailable(paths.unavailable.get(MINIMAL) or paths.unavailable.get(RENDERED) or "no mesh path")
    n = len(paths.rounds)
    result.runs.extend(r[p] for r in paths.rounds for p in (DIRECT, MINIMAL, RENDERED))
    result.extra["rounds"] = n
    result.extra["sequence"] = paths.sequence
    why = paths.empty_reason()
    if not why:
        pooled = [paths.pooled(p) for p in (DIRECT, MINIMAL, RENDERED)]
        result.runs.extend(pooled)  # the chart: direct, minimal and rendered side by side
        result.extra["series"] = [run.label for run in pooled]
    for what, factor in (("p50", P50_FACTOR), ("p99", P99_FACTOR)):
        floor = None if why else Spread.of(paths.added(MINIMAL, what))
        result.figures.append(
            Figure(
                NAME,
                f"minimal Envoy: added {what} per hop (÷{paths.hops})"
                + (f", {floor.text('{:.3f}')}" if floor else ""),
                floor.median if floor else None,
                "ms",
                "info",
                note=why,
            )
        )
        ratios = [] if why else latency_ratios(paths, what)
        result.extra[f"{what}_ratio_per_round"] = ratios
        result.extra[f"{what}_added_per_hop_ms"] = {p: paths.added(p, what) for p in (RENDERED, MINIMAL)}
        hop = None if why else hop_ratio(paths, what)
        note = why
        if not note and hop is None:
            used = sum(q is not None for q in ratios)
            note = (
                f"only {used} of {n} rounds had both hops above {MIN_ADDED_MS * 1000:g} µs "
                "(noise: direct as slow as a proxied path), no ratio"
            )
        text = ""
        if hop is not None:
            skipped = n - hop.per_round.rounds
            text = (
                f" ({hop.rendered_ms:.3f} / {hop.minimal_ms:.3f} ms, medians of {hop.per_round.rounds}"
                f" rounds; per round {hop.per_round.low:.2f} to {hop.per_round.high:.2f}"
                + (f", {skipped} in the noise" if skipped else "")
                + ")"
            )
        result.figures.append(
            Figure(
                NAME,
                f"added {what} per hop: rendered / minimal{text}",
                hop.value if hop else None,
                "x",
                f"≤ {factor:g} x",
                target_value=factor,
                compare="<=",
                note=note,
            )
        )
    rendered_runs = [r[RENDERED] for r in paths.rounds]
    minimal_runs = [r[MINIMAL] for r in paths.rounds]
    rendered_cpu = cpu_per_call_us(rendered_runs, "sidecar-user")
    minimal_cpu = cpu_per_call_us(minimal_runs, "min-sidecar")
    for label, value in (("rendered user sidecar", rendered_cpu), ("minimal sidecar", minimal_cpu)):
        result.figures.append(
            Figure(NAME, f"CPU per call, {label}, {n} rounds", value, "µs", "info", note=_missing(value))
        )
    for label, runs, key in (
        ("rendered edge", rendered_runs, "edge"),
        ("minimal edge", minimal_runs, "min-edge"),
    ):
        value = cpu_per_call_us(runs, key)
        result.figures.append(
            Figure(NAME, f"CPU per call, {label}, {n} rounds", value, "µs", "info", note=_missing(value))
        )
    summed = rendered_cpu / minimal_cpu if rendered_cpu is not None and minimal_cpu else None
    ratios = [
        a / b if a is not None and b else None
        for a, b in (
            (cpu_per_call_us([r], "sidecar-user"), cpu_per_call_us([m], "min-sidecar"))
            for r, m in zip(rendered_runs, minimal_runs, strict=True)
        )
    ]
    result.extra["cpu_ratio_per_round"] = ratios
    spread = Spread.of(ratios)
    result.figures.append(
        Figure(
            NAME,
            f"sidecar CPU per call: rendered / minimal ({n} rounds summed"
            + (f"; per round {spread.low:.2f} to {spread.high:.2f}" if spread else "")
            + ")",
            summed,
            "x",
            f"≤ {CPU_FACTOR:g} x",
            target_value=CPU_FACTOR,
            compare="<=",
            note="" if summed is not None else "no CPU sample of one of the sidecars",
        )
    )
    return result


def _missing(value: float | None) -> str:
    return "" if value is not None else "no CPU sample"
