"""`python -m shop_mesh.bench <scenario> [options]` — see `python -m shop_mesh.bench --help` and
docs/performance.md."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from shop_mesh.bench import h2load
from shop_mesh.bench.context import Options, RunContext
from shop_mesh.bench.env import Stack, Unavailable, describe
from shop_mesh.bench.histogram import Histogram
from shop_mesh.bench.report import (
    ScenarioResult,
    failed_runs,
    markdown_table,
    percentile_chart,
    results_table,
    write_json,
)
from shop_mesh.bench.scenarios import NEEDS, SCENARIOS, STANDARD, display_order


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("use e.g. 16 or 16,64") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency must be >= 1")
    return values


def parse_args(argv: list[str] | None) -> tuple[list[str], Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m shop_mesh.bench",
        description="Load generator and benchmark scenarios of shop-mesh. Prints a ghz-like summary per "
        "run and one table (figure, target, ratio to L, pass/fail); writes JSON, a Markdown table and "
        "latency charts.",
    )
    p.add_argument(
        "scenario", nargs="+", choices=[*SCENARIOS, "all"], help="'all' = the standard set (make bench)"
    )
    p.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument(
        "-w", "--warmup", type=float, default=2.0, help="warm-up seconds before each run (default 2)"
    )
    p.add_argument(
        "-c",
        "--concurrency",
        type=_concurrency,
        default=(16, 64),
        help="closed-loop callers; a list sweeps and keeps the best (default 16,64)",
    )
    p.add_argument(
        "-r", "--rate", type=float, default=None, help="open-loop RPS (overrides the scenario's rate)"
    )
    p.add_argument(
        "--mode", choices=["open", "closed"], default=None, help="force the loop mode where it is a choice"
    )
    p.add_argument(
        "--target",
        choices=["direct", "edge", "both"],
        default="both",
        help="direct, through the edge, or both",
    )
    p.add_argument(
        "-p", "--processes", type=int, default=1, help="load-generator processes (default 1; see docs)"
    )
    p.add_argument("--channels", type=int, default=2, help="HTTP/2 connections per load process (default 2)")
    p.add_argument("--users", type=int, default=10_000, help="users seeded for get-user (default 10000)")
    p.add_argument("--streams", type=int, default=1_000, help="watchers for watch-fanout (default 1000)")
    p.add_argument(
        "--json", type=Path, default=None, help="write the JSON report here (chart goes next to it)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="where reports go (default bench-results)"
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--no-h2load", action="store_true", help="skip the h2load cross-checks")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="do not measure L (nor F for create-order) first: ratios become n/a",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds of mesh-overhead / envoy-floor; each run lasts duration / rounds "
        "(default 6)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite; timings meaningless")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target fails")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each run wait up to this many seconds for other CPU load to drop (default 10; 0 = off)",
    )
    a = p.parse_args(argv)
    if a.rounds is not None and a.rounds < 1:
        p.error("--rounds must be >= 1")
    names: list[str] = []
    for s in a.scenario:
        for name in STANDARD if s == "all" else (s,):
            if name not in names:
                names.append(name)
    opts = Options(
        duration=a.duration,
        warmup=a.warmup,
        concurrency=a.concurrency,
        rate=a.rate,
        mode=a.mode,
        target=a.target,
        processes=a.processes,
        channels=a.channels,
        users=a.users,
        streams=a.streams,
        out_dir=a.out,
        json_path=a.json,
        progress=not a.no_progress,
        h2load=not a.no_h2load,
        smoke=a.smoke,
        quiet_wait=a.quiet_wait,
        rounds=a.rounds,
    )
    return names, opts, a


def _environment() -> dict[str, Any]:
    return {
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": list(psutil.getloadavg()),
        "h2load": shutil.which("h2load") is not None,
    }


def _charts(results: list[ScenarioResult], stem: Path) -> None:
    for res in results:
        series: list[tuple[str, Histogram]] = [
            (r.label, r.histogram)
            for r in res.runs
            if r.histogram.total and r.label in res.extra.get("series", [])
        ]
        if res.name == "mesh-overhead" and len(series) == 2:
            series = [("direct", series[0][1]), ("mesh (edge + sidecar)", series[1][1])]
        if not series:
            continue
        path = percentile_chart(
            stem.with_name(f"{stem.name}-{res.name}.png"), series, f"{res.name}: latency by percentile"
        )
        if path:
            res.chart = str(path)
    main = next((r for r in results if r.name == "mesh-overhead" and r.chart), None) or next(
        (r for r in results if r.chart), None
    )
    if main:
        target = stem.with_suffix(".png")
        shutil.copyfile(main.chart, target)


def main(argv: list[str] | None = None) -> int:
    names, opts, args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: keep the table on one line per row
    if not args.no_baseline and "baseline" not in names:
        names.insert(0, "baseline")
    for needed in dict.fromkeys(NEEDS[n] for n in names if n in NEEDS and not args.no_baseline):
        if needed not in names:  # e.g. F for create-order: measured first, before any deployment
            names.insert(1 if names[:1] == ["baseline"] else 0, needed)
    workdir = Path(tempfile.mkdtemp(prefix="shop-bench-"))
    stack = Stack(workdir)
    ctx = RunContext(options=opts, console=console, workdir=workdir, stack=stack)
    env = _environment()
    console.print(
        f"[bold]shop-mesh bench[/bold]: {', '.join(names)} — {env['cpus']} CPUs, Python {env['python']}, "
        f"h2load {'yes' if h2load.available() else 'no'}; scratch {workdir}"
    )
    results: list[ScenarioResult] = []
    t0 = time.monotonic()
    try:
        for name in names:
            console.rule(f"[bold]{name}")
            started = time.monotonic()
            try:
                res = SCENARIOS[name](ctx)
            except Unavailable as exc:  # the system under test cannot run here: n/a, with why
                res = ScenarioResult(name, unavailable=str(exc))
            except Exception as exc:  # one broken scenario must not hide the others' numbers
                res = ScenarioResult(name, unavailable=describe(exc))
            res.extra["elapsed_s"] = round(time.monotonic() - started, 1)  # with its deployment's start
            res.figures.extend(failed_runs(res))
            if res.unavailable:
                console.print(f"[yellow]{name}: unavailable: {res.unavailable}[/yellow]")
            results.append(res)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t0
    order = display_order([r.name for r in results])
    results.sort(key=lambda r: order.index(r.name))
    console.print()
    console.print(results_table(results, ctx.limit))
    stem = (opts.json_path or opts.out_dir / "latest.json").with_suffix("")
    _charts(results, stem)
    payload = {
        "environment": env,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "limit_rps": ctx.limit,
        "elapsed_s": elapsed,
        "scenarios": [r.to_json() for r in results],
        "table": [f.to_json() for r in results for f in r.figures],
    }
    json_path = stem.with_suffix(".json")
    write_json(json_path, payload)
    stem.with_suffix(".md").write_text(markdown_table(results, ctx.limit))
    console.print(
        f"report: {json_path}  table: {stem.with_suffix('.md')}  charts: {stem}*.png  ({elapsed:.0f} s)"
    )
    failed = any(f.verdict == "FAIL" for r in results for f in r.figures)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
