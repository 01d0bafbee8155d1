"""What a run tells the user: ghz-like summaries, the final table, JSON, and the latency chart."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from shop_mesh.bench.histogram import Histogram
from shop_mesh.bench.loadgen import LoadResult
from shop_mesh.bench.procmon import MonitorReport

PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.9)
Compare = Literal[">=", "<="]


def ms(ns: float) -> float:
    return ns / 1e6


def _latency_ms(h: Histogram) -> dict[str, float]:
    return {
        "min": ms(h.min_ns),
        "mean": ms(h.mean_ns),
        **{f"p{_pct_name(p)}": ms(h.percentile_ns(p)) for p in PERCENTILES},
        "max": ms(h.max_ns),
    }


@dataclass
class RunSummary:
    """One load run, reduced to what a user reads (and what --json carries)."""

    label: str
    target: str
    mode: str
    count: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    rps: float
    latency_ms: dict[str, float]
    histogram: Histogram
    client_cpu_s: float
    concurrency: int
    rate: float
    processes: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_load(cls, label: str, result: LoadResult, monitor: MonitorReport | None = None) -> RunSummary:
        h = result.histogram
        return cls(
            label=label,
            target=result.spec.target,
            mode=result.spec.mode,
            count=result.count,
            ok=result.ok,
            errors=dict(result.errors),
            duration_s=result.duration_s,
            rps=result.rps,
            latency_ms=_latency_ms(h),
            histogram=h,
            client_cpu_s=result.client_cpu_s,
            concurrency=result.spec.concurrency,
            rate=result.spec.rate,
            processes=monitor.to_json() if monitor else None,
            problems=list(result.problems),
        )

    @classmethod
    def from_histogram(
        cls,
        label: str,
        h: Histogram,
        *,
        target: str,
        mode: str,
        ok: int,
        errors: dict[str, int],
        duration_s: float,
        monitor: MonitorReport | None = None,
    ) -> RunSummary:
        count = ok + sum(errors.values())
        return cls(
            label=label,
            target=target,
            mode=mode,
            count=count,
            ok=ok,
            errors=errors,
            duration_s=duration_s,
            rps=count / duration_s if duration_s > 0 else 0.0,
            latency_ms=_latency_ms(h),
            histogram=h,
            client_cpu_s=0.0,
            concurrency=0,
            rate=0.0,
            processes=monitor.to_json() if monitor else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "target": self.target,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "count": self.count,
            "ok": self.ok,
            "errors": self.errors,
            "duration_s": self.duration_s,
            "rps": self.rps,
            "latency_ms": self.latency_ms,
            "client_cpu_s": self.client_cpu_s,
            "histogram": self.histogram.to_json(),
            "processes": self.processes,
            "problems": self.problems,
        }


def _pct_name(p: float) -> str:
    return str(int(p)) if p == int(p) else str(p)


@dataclass
class Figure:
    """One row of the final table. `value` is None when it could not be measured (see `note`)."""

    scenario: str
    name: str
    value: float | None
    unit: str
    target_text: str = ""
    target_value: float | None = None
    compare: Compare | None = None
    ratio_to_l: float | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None or self.target_value is None or self.compare is None:
            return None
        if self.compare == ">=":
            return self.value >= self.target_value
        return self.value <= self.target_value

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        p = self.passed
        return "info" if p is None else ("PASS" if p else "FAIL")

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "figure": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": self.target_text,
            "target_value": self.target_value,
            "ratio_to_L": self.ratio_to_l,
            "verdict": self.verdict,
            "note": self.note,
        }


@dataclass
class ScenarioResult:
    name: str
    figures: list[Figure] = field(default_factory=list)
    runs: list[RunSummary] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    unavailable: str = ""
    chart: str = ""

    @property
    def other_load_cores(self) -> float | None:
        """CPU cores that processes outside the benchmark used, on average, during its runs."""
        cpu = window = 0.0
        for r in self.runs:
            if r.processes and r.processes.get("window_s"):
                cpu += float(r.processes["other_cpu_s"])
                window += float(r.processes["window_s"])
        return cpu / window if window else None

    def to_json(self) -> dict[str, Any]:
        return {
            "other_load_cores": self.other_load_cores,
            "scenario": self.name,
            "unavailable": self.unavailable,
            "figures": [f.to_json() for f in self.figures],
            "runs": [r.to_json() for r in self.runs],
            "extra": self.extra,
            "chart": self.chart,
        }


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit in ("RPS", "orders/s"):
        return f"{v:,.0f} {unit}"
    if unit == "KB":
        return f"{v:,.1f} KB"
    if abs(v) >= 100:
        return f"{v:,.0f} {unit}"
    return f"{v:.3g} {unit}" if abs(v) < 10 else f"{v:.1f} {unit}"


# --------------------------------------------------------------------------- console output


def _histogram_rows(h: Histogram, bins: int = 10) -> list[tuple[float, int]]:
    """ghz-style: `bins` equal-width bins between the fastest and the slowest call."""
    if h.total == 0:
        return []
    lo, hi = h.min_ns, h.max_ns
    width = max(1.0, (hi - lo) / bins)
    counts = [0] * bins
    for upper, c in h.buckets():
        k = min(bins - 1, max(0, int((upper - lo) / width)))
        counts[k] += c
    return [(ms(lo + (k + 1) * width), counts[k]) for k in range(bins)]


def print_run(console: Console, run: RunSummary) -> None:
    lat = run.latency_ms
    console.print(f"\n[bold]{run.label}[/bold]  ({run.mode}-loop → {run.target})")
    console.print(
        f"  Count: {run.count:,}   Total: {run.duration_s:.2f} s   RPS: {run.rps:,.1f}   "
        f"OK: {run.ok:,}   client CPU: {run.client_cpu_s:.2f} s"
    )
    console.print(
        "  Latency (ms): "
        + "  ".join(
            f"{k} {v:.3f}" for k, v in lat.items() if k in ("min", "p50", "p90", "p99", "p99.9", "max")
        )
        + f"  mean {lat['mean']:.3f}"
    )
    rows = _histogram_rows(run.histogram)
    if rows:
        top = max(c for _, c in rows) or 1
        console.print("  Response time histogram (ms):")
        for upper, c in rows:
            bar = "∎" * round(40 * c / top)
            console.print(f"    {upper:10.3f} [{c:>8}] |{bar}")
    status = {"OK": run.ok, **run.errors}
    console.print("  Status code distribution: " + ", ".join(f"[{k}] {v:,}" for k, v in status.items() if v))
    if run.processes:
        procs = run.processes["processes"]
        if procs:
            console.print(
                "  Processes (CPU s / peak RSS MB): "
                + ", ".join(f"{p['label']} {p['cpu_s']:.2f}/{p['rss_peak_bytes'] / 2**20:.0f}" for p in procs)
                + f"   other load on the machine: {run.processes['other_cpu_s']:.2f} CPU s"
            )
    for p in run.problems:
        console.print(f"  [red]problem:[/red] {p}")


def failed_runs(res: ScenarioResult) -> list[Figure]:
    """One FAIL row per run of `res` that answered no call OK: such a run measured nothing (e.g.
    every call UNAUTHENTICATED, as create-order's overload run once was), whatever figures a
    scenario derived from it, and must not pass as a result."""
    rows: list[Figure] = []
    for run in res.runs:
        if run.ok > 0:
            continue
        codes = ", ".join(f"{k} {v:,}" for k, v in run.errors.items()) or "no call completed"
        rows.append(
            Figure(
                res.name,
                f"failed measurement: {run.label} ({codes})",
                float(run.ok),
                "OK calls",
                "> 0 (a run without OK calls measures nothing)",
                target_value=1.0,
                compare=">=",
                note="; ".join(run.problems),
            )
        )
    return rows


def results_table(results: Sequence[ScenarioResult], limit: float | None) -> Table:
    title = "shop-mesh benchmark" + (f" — L = {limit:,.0f} RPS (baseline, this machine)" if limit else "")
    table = Table(title=title, show_lines=False)
    for col, just in (
        ("scenario", "left"),
        ("figure", "left"),
        ("measured", "right"),
        ("target", "left"),
        ("ratio to L", "right"),
        ("result", "center"),
        ("other load", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for res in results:
        noise = res.other_load_cores
        noise_text = f"{noise:.2f} cores" if noise is not None else ""
        if res.unavailable and not res.figures:
            table.add_row(res.name, "—", "—", "", "", f"n/a: {res.unavailable}", "")
            continue
        for k, f in enumerate(res.figures):
            verdict = f.verdict
            color = {"PASS": "green", "FAIL": "red"}.get(verdict, "yellow")
            shown = verdict if verdict != "n/a" else f"n/a: {f.note}"
            table.add_row(
                f.scenario,
                f.name,
                fmt_value(f.value, f.unit),
                f.target_text,
                f"{f.ratio_to_l:.2f}" if f.ratio_to_l is not None else "",
                f"[{color}]{shown}[/{color}]",
                noise_text if k == 0 else "",
            )
    return table


def markdown_table(results: Sequence[ScenarioResult], limit: float | None) -> str:
    lines = [
        f"L = {limit:,.0f} RPS" if limit else "L not measured",
        "",
        "| scenario | figure | measured | target | ratio to L | result | other load |",
        "| --- | --- | ---: | --- | ---: | --- | ---: |",
    ]
    for res in results:
        noise = res.other_load_cores
        noise_text = f"{noise:.2f} cores" if noise is not None else ""
        if res.unavailable and not res.figures:
            lines.append(f"| {res.name} | — | — | | | n/a: {res.unavailable} | |")
            continue
        for k, f in enumerate(res.figures):
            ratio = f"{f.ratio_to_l:.2f}" if f.ratio_to_l is not None else ""
            verdict = f.verdict if f.verdict != "n/a" else f"n/a: {f.note}"
            cells = [f.scenario, f.name, fmt_value(f.value, f.unit), f.target_text, ratio, verdict]
            cells.append(noise_text if k == 0 else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def percentile_chart(path: Path, series: Sequence[tuple[str, Histogram]], title: str) -> Path | None:
    """Latency by percentile (HdrHistogram style: x = 1/(1-p) on a log axis), one line per series."""
    series = [(label, h) for label, h in series if h.total > 0]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, h in series:
        max_pct = 100.0 * (1 - 1 / max(h.total, 2))
        pcts = [p for p in _curve_points() if p <= max_pct] + [max_pct]
        xs = [1 / (1 - p / 100.0) for p in pcts]
        ys = [ms(h.percentile_ns(p)) for p in pcts]
        ax.plot(xs, ys, label=f"{label} (n={h.total:,})", linewidth=1.8)
    ax.set_xscale("log")
    ticks = [0.0, 50.0, 90.0, 99.0, 99.9, 99.99]
    ax.set_xticks([1 / (1 - p / 100) for p in ticks])
    ax.set_xticklabels([f"p{_pct_name(p)}" if p else "p0" for p in ticks])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _curve_points() -> list[float]:
    pts: list[float] = []
    for k in range(0, 400):
        # Evenly spaced in log(1/(1-p)) from p0 to p99.999.
        x = 10 ** (k * 5 / 399)
        pts.append(100.0 * (1 - 1 / x))
    return [p for p in pts if not math.isnan(p)]
