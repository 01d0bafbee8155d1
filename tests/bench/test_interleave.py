"""The interleaved measurement of mesh-overhead / envoy-floor: per-round figures and their median."""

from __future__ import annotations

import pytest

from shop_mesh.bench.histogram import Histogram
from shop_mesh.bench.report import RunSummary
from shop_mesh.bench.scenarios.envoy_floor import (
    cpu_per_call_us,
    hop_ratio,
    latency_ratios,
    verdict_rounds,
)
from shop_mesh.bench.scenarios.mesh_overhead import DIRECT, MINIMAL, RENDERED, Paths, Spread


def _run(
    label: str, p50_ms: float, *, cpu: dict[str, tuple[float, float | None]] | None = None
) -> RunSummary:
    h = Histogram.empty()
    h.record_many([int(p50_ms * 1e6)] * 100)
    run = RunSummary.from_histogram(
        label, h, target="127.0.0.1:1", mode="open", ok=100, errors={}, duration_s=1.0
    )
    run.processes = {
        "processes": [
            {"label": name, "cpu_s": ticks, "cpu_exact_s": exact}
            for name, (ticks, exact) in (cpu or {}).items()
        ]
    }
    return run


def _paths(rounds: list[tuple[float, float, float]]) -> Paths:
    """Rounds of (direct, rendered, minimal) p50 in ms, two hops."""
    paths = Paths(rate=200.0, hops=2)
    for d, r, m in rounds:
        paths.rounds.append({DIRECT: _run("d", d), RENDERED: _run("r", r), MINIMAL: _run("m", m)})
    return paths


def test_each_round_is_judged_against_its_own_direct_run_not_a_pooled_one() -> None:
    # Round 2's direct run was slow (the machine got busy): against its own direct run the rendered
    # hop still adds 1.2 x the minimal one; against round 1's direct run it would look like 3 x.
    paths = _paths([(1.0, 2.2, 2.0), (3.0, 4.2, 4.0), (1.0, 2.3, 2.0)])
    ratios = latency_ratios(paths, "p50")
    assert [round(r, 1) for r in ratios if r is not None] == [1.2, 1.2, 1.3]
    spread = Spread.of(ratios)
    assert spread is not None and round(spread.median, 1) == 1.2
    assert (round(spread.low, 1), round(spread.high, 1), spread.rounds) == (1.2, 1.3, 3)
    assert "median of 3" in spread.text()
    hop = hop_ratio(paths, "p50")  # the verdict: rendered's median hop / minimal's
    assert hop is not None and hop.value == pytest.approx(1.2)
    assert hop.rendered_ms == pytest.approx(0.6) and hop.minimal_ms == pytest.approx(0.5)


def test_a_round_whose_direct_run_was_as_slow_as_a_proxied_one_gives_no_ratio() -> None:
    # Round 1: the minimal hop adds nothing; round 2: the direct run was the slowest (a negative
    # rendered hop would make a negative ratio, a free PASS); round 3 measured both hops.
    paths = _paths([(1.0, 1.5, 1.0), (3.0, 2.0, 2.5), (1.0, 1.5, 1.4)])
    ratios = latency_ratios(paths, "p50")
    assert ratios[0] is None and ratios[1] is None
    assert ratios[2] is not None and 1.2 < ratios[2] < 1.3
    assert Spread.of([None, None]) is None
    assert verdict_rounds(6) == 3 and verdict_rounds(3) == 2
    assert hop_ratio(paths, "p50") is None  # 1 of 3 rounds with a ratio: n/a


def test_cpu_per_call_prefers_the_schedulers_figure_over_ticks() -> None:
    run = _run("r", 1.0, cpu={"sidecar-user": (0.0, 0.006)})  # ticks say 0: under one 10 ms tick
    assert cpu_per_call_us([run], "sidecar-user") == 60.0  # 6 ms / 100 calls
    ticks_only = _run("r", 1.0, cpu={"sidecar-user": (0.01, None)})
    assert cpu_per_call_us([ticks_only], "sidecar-user") == 100.0
    assert cpu_per_call_us([run], "min-sidecar") is None
