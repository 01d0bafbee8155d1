"""Smoke tier of the benchmark: every scenario for about a second, so the tool keeps working.

One `python -m shop_mesh.bench all --smoke` run (tiny sizes: 200 users, 20 watchers, ~1 s per load run) is
shared by the tests below; they check that each scenario produced a report with calls counted and
a row in the table. No timing is asserted here: the numbers of a one-second run on a busy test
machine mean nothing (targets are checked by `make bench`'s own report).
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shop_mesh.bench.histogram import Histogram
from shop_mesh.bench.report import RunSummary, ScenarioResult, failed_runs
from shop_mesh.bench.scenarios import STANDARD
from shop_mesh.bench.scenarios.common import empty_reason

pytestmark = [pytest.mark.xdist_group("bench-smoke"), pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
ENVOY = Path(sys.executable).with_name("envoy")
MESH_SCENARIOS = {
    "saga-floor",
    "get-user",
    "mesh-overhead",
    "envoy-floor",
    "create-order",
    "watch-fanout",
    "get-user-pg",
    "create-order-pg",
    "startup",
}
POSTGRES_SCENARIOS = {"get-user-pg", "create-order-pg"}


def _postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    cmd = [
        sys.executable,
        "-m",
        "shop_mesh.bench",
        "all",
        "--smoke",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--concurrency",
        "4",
        "--users",
        "200",
        "--streams",
        "20",
        "--no-progress",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data: dict[str, Any] = json.loads(out.read_text())
    data["_stdout"] = proc.stdout
    data["_dir"] = str(out.parent)
    return data


def _scenario(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in report["scenarios"] if s["scenario"] == name]
    assert found, f"no {name} section in the report"
    return found[0]


def _needs_mesh(name: str) -> None:
    if name in MESH_SCENARIOS and not ENVOY.exists():
        pytest.skip(f"{name} needs Envoy ({ENVOY} is missing)")
    if name in POSTGRES_SCENARIOS and not _postgres_reachable():
        pytest.skip(f"{name} needs PostgreSQL on 127.0.0.1:5432")


@pytest.mark.parametrize("name", STANDARD)
def test_each_scenario_reports_calls_and_a_table_row(report: dict[str, Any], name: str) -> None:
    _needs_mesh(name)
    section = _scenario(report, name)
    assert not section["unavailable"], section["unavailable"]
    rows = [row for row in report["table"] if row["scenario"] == name]
    assert rows, f"the table has no row for {name}"
    # A ratio to a floor that one second on a busy machine measured as ~0 (noise) is n/a, saying so.
    assert all(
        row["verdict"] in ("PASS", "FAIL", "info") or (row["verdict"] == "n/a" and "noise" in row["note"])
        for row in rows
    ), rows
    if name == "startup":
        assert rows[0]["value"] > 0
    else:
        assert section["runs"], f"{name} recorded no runs"
        assert max(run["count"] for run in section["runs"]) > 0
        # A run with no OK call measured nothing (create-order's overload run once sent every call
        # without the token: 100 % UNAUTHENTICATED, reported as "goodput 0").
        empty = {run["label"]: run["errors"] for run in section["runs"] if run["ok"] == 0}
        assert not empty, f"runs of {name} without a single OK call: {empty}"
        assert not [row for row in rows if row["figure"].startswith("failed measurement")], rows
    # The printed table carries the scenario too (rich may shorten long names with an ellipsis).
    assert name[:8] in report["_stdout"]


def test_create_order_is_judged_against_the_saga_floor(report: dict[str, Any]) -> None:
    _needs_mesh("saga-floor")
    floor = [row for row in report["table"] if row["scenario"] == "saga-floor"]
    assert floor[0]["value"] > 0, floor
    rows = {
        row["figure"].split(" @ ")[0].split(",")[0]: row
        for row in report["table"]
        if row["scenario"] == "create-order"
    }
    sustained = next(row for name, row in rows.items() if name.startswith("C = sustained"))
    assert sustained["target"].startswith("≥ 0.7 x F")
    assert sustained["target_value"] == pytest.approx(0.7 * floor[0]["value"])
    figures = " ".join(row["figure"] for row in report["table"] if row["scenario"] == "create-order")
    assert "(0.5 x C)" in figures and "(2 x C)" in figures and "RESOURCE_EXHAUSTED" in figures
    # Whether the capacity moved between the sweep and the overload run: C measured again right after.
    again = [row for name, row in rows.items() if name.startswith("C again right after the 2 x C run")]
    assert again and again[0]["value"] > 0 and "other load" in again[0]["figure"], rows
    # Every create-order run goes through the edge with the bench's token: the edge never refuses it.
    section = _scenario(report, "create-order")
    overload = [run for run in section["runs"] if "overload" in run["label"]]
    assert overload, [run["label"] for run in section["runs"]]
    assert all("UNAUTHENTICATED" not in run["errors"] for run in section["runs"]), section["runs"]


def test_envoy_floor_compares_the_rendered_hop_with_a_minimal_one(report: dict[str, Any]) -> None:
    _needs_mesh("envoy-floor")
    section = _scenario(report, "envoy-floor")
    minimal = [run for run in section["runs"] if "minimal" in run["label"] and ", round " in run["label"]]
    assert minimal and all(run["ok"] > 0 for run in minimal), minimal
    for run in minimal:
        sidecars = {p["label"]: p for p in run["processes"]["processes"]}
        assert {"min-edge", "min-sidecar"} <= set(sidecars)
        assert sidecars["min-sidecar"]["cpu_exact_s"] > 0  # the scheduler's ns figure, not 10 ms ticks
    targets = {
        row["figure"].split(" (")[0]: row for row in report["table"] if row["scenario"] == "envoy-floor"
    }
    assert targets["added p50 per hop: rendered / minimal"]["target_value"] == 1.25
    assert targets["added p99 per hop: rendered / minimal"]["target_value"] == 1.5
    cpu = targets["sidecar CPU per call: rendered / minimal"]
    assert cpu["target_value"] == 1.3 and cpu["verdict"] in ("PASS", "FAIL"), cpu
    assert "rounds summed" in cpu["figure"] and cpu["value"] > 0, cpu
    # Every round measured each path once; a positive CPU ratio each round.
    rounds = section["extra"]["rounds"]
    cpu_ratios = section["extra"]["cpu_ratio_per_round"]
    assert rounds >= 2 and len(cpu_ratios) == rounds and all(r > 0 for r in cpu_ratios), cpu_ratios
    for what in ("p50", "p99"):
        row = targets[f"added {what} per hop: rendered / minimal"]
        ratios = section["extra"][f"{what}_ratio_per_round"]
        added = section["extra"][f"{what}_added_per_hop_ms"]
        kept = [k for k, ratio in enumerate(ratios) if ratio is not None]
        if len(kept) >= (rounds + 1) // 2:  # the verdict: rendered's median hop / minimal's
            rendered = statistics.median(added["rendered"][k] for k in kept)
            minimal = statistics.median(added["minimal"][k] for k in kept)
            assert row["value"] == pytest.approx(rendered / minimal) and row["value"] > 0, row
        else:  # most rounds' direct run was as slow as a proxied one (a busy machine): no verdict
            assert row["verdict"] == "n/a" and "noise" in row["note"], row


def test_mesh_paths_are_interleaved_round_by_round(report: dict[str, Any]) -> None:
    _needs_mesh("mesh-overhead")
    section = _scenario(report, "mesh-overhead")
    sequence = section["extra"]["sequence"]
    assert len(sequence) == section["extra"]["rounds"] >= 2
    assert all(sorted(seq) == ["direct", "minimal", "rendered"] for seq in sequence), sequence
    assert sequence[1] == sequence[0][::-1], sequence  # order reversed every other round
    per_round = [run for run in section["runs"] if ", round " in run["label"]]
    assert len(per_round) == 2 * len(sequence) and all(run["ok"] > 0 for run in per_round)
    rows = {row["figure"]: row for row in report["table"] if row["scenario"] == "mesh-overhead"}
    added = [row for name, row in rows.items() if name.startswith("added p50 per hop")]
    assert added and "median of" in added[0]["figure"], rows


def test_limit_is_measured_and_ratios_use_it(report: dict[str, Any]) -> None:
    assert report["limit_rps"] and report["limit_rps"] > 0
    baseline = [row for row in report["table"] if row["scenario"] == "baseline"]
    assert baseline[0]["ratio_to_L"] == pytest.approx(1.0)


def test_summary_has_ghz_fields_and_process_stats(report: dict[str, Any]) -> None:
    run = _scenario(report, "baseline")["runs"][0]
    for key in ("min", "p50", "p90", "p99", "p99.9", "max"):
        assert key in run["latency_ms"]
    assert run["histogram"]["total"] == run["count"]
    labels = {p["label"] for p in run["processes"]["processes"]}
    assert {"baseline-server", "bench-client"} <= labels


def test_chart_and_markdown_are_written_next_to_the_json(report: dict[str, Any]) -> None:
    out = Path(report["_dir"])
    assert (out / "smoke.md").read_text().count("|") > 10
    assert (out / "smoke.png").stat().st_size > 1000


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed (nghttp2-client)")
def test_h2load_cross_check_ran(report: dict[str, Any]) -> None:
    assert _scenario(report, "baseline")["extra"]["h2load"]["succeeded"] > 0


def test_a_run_without_ok_calls_is_a_failed_measurement_not_a_figure() -> None:
    h = Histogram.empty()
    h.record_many([1_000_000] * 10)
    refused = RunSummary.from_histogram(
        "CreateOrder overload",
        h,
        target="127.0.0.1:1",
        mode="open",
        ok=0,
        errors={"UNAUTHENTICATED": 10},
        duration_s=1.0,
    )
    served = replace(refused, label="CreateOrder steady", ok=10, errors={})
    res = ScenarioResult("create-order", runs=[served, refused])
    assert empty_reason(refused) == "no call succeeded (UNAUTHENTICATED 10)"
    assert empty_reason(served) == ""
    rows = failed_runs(res)
    assert [(row.name, row.verdict) for row in rows] == [
        ("failed measurement: CreateOrder overload (UNAUTHENTICATED 10)", "FAIL")
    ]


def test_histogram_percentiles_are_within_one_percent() -> None:
    h = Histogram.empty()
    values = list(range(1_000, 10_000_001, 1_000))  # 1 us .. 10 ms
    h.record_many(values)
    for pct in (50.0, 90.0, 99.0, 99.9):
        exact = values[int(pct / 100 * len(values)) - 1]
        assert abs(h.percentile_ns(pct) - exact) / exact < 0.01
    assert h.min_ns == 1_000 and h.max_ns == 10_000_000
    clone = Histogram.from_json(h.to_json())
    clone.merge(h)
    assert clone.total == 2 * h.total and clone.percentile_ns(50) == h.percentile_ns(50)
