"""Options and shared state of one benchmark run, and the `measure` helper every scenario uses."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from shop_mesh.bench.env import Stack
from shop_mesh.bench.loadgen import LoadResult, LoadSpec, run_load
from shop_mesh.bench.procmon import ProcessMonitor, wait_for_quiet
from shop_mesh.bench.report import RunSummary, print_run

TargetChoice = Literal["direct", "edge", "both"]


@dataclass
class Options:
    duration: float = 10.0
    warmup: float = 2.0
    concurrency: tuple[int, ...] = (16, 64)  # closed-loop sweep: the best level is the maximum
    rate: float | None = None  # open-loop rate override (mesh-overhead, create-order)
    mode: Literal["closed", "open"] | None = None  # override for get-user
    target: TargetChoice = "both"
    processes: int = 1
    channels: int = 2
    users: int = 10_000
    streams: int = 1_000
    out_dir: Path = Path("bench-results")
    json_path: Path | None = None
    progress: bool = True
    h2load: bool = True
    smoke: bool = False  # the `make test` tier: tiny sizes, no verdict on timing
    quiet_wait: float = 10.0  # before each run, wait up to this long for other CPU load to drop
    quiet_budget: float = 90.0  # ... and at most this long in total per invocation
    rounds: int | None = None  # interleaved rounds of mesh-overhead / envoy-floor (None: 6, smoke 2)

    def scaled(self, n: int, smoke_n: int) -> int:
        return smoke_n if self.smoke else n


@dataclass
class RunContext:
    options: Options
    console: Console
    workdir: Path  # scratch space for data dirs and logs of this run
    stack: Stack
    limit: float | None = None  # L, once the baseline ran
    shared: dict[str, object] = field(default_factory=dict)  # e.g. the running mesh, seeded ids
    quiet_waited: float = 0.0

    def spec(self, **kw: object) -> LoadSpec:
        o = self.options
        base = LoadSpec(
            target=str(kw.pop("target")),
            method=str(kw.pop("method")),
            source=kw.pop("source"),  # type: ignore[arg-type]
            duration=o.duration,
            warmup=o.warmup,
            processes=o.processes,
            channels=o.channels,
        )
        return replace(base, **kw)  # type: ignore[arg-type]

    def measure(
        self,
        label: str,
        spec: LoadSpec,
        watch: dict[str, int] | None = None,
        *,
        quiet: bool = True,
        quiet_wait: float | None = None,
    ) -> RunSummary:
        """One load run with the process monitor and a live progress bar; prints its summary.
        `quiet=False`: no wait for other load to drop first (runs that must share one background);
        `quiet_wait`: wait at most this long instead of --quiet-wait."""
        if quiet:
            self.wait_quiet(list((watch or {}).values()), quiet_wait)
        monitor = ProcessMonitor()
        for name, pid in (watch or {}).items():
            monitor.watch(name, pid)
        state = {"started": False}

        def on_window(what: str) -> None:
            if what == "start" and not state["started"]:
                state["started"] = True
                monitor.start()

        def on_workers(pids: list[int]) -> None:
            for pid in pids:
                monitor.watch("bench-client", pid)

        with self.progress(label, spec) as on_progress:
            result: LoadResult = run_load(
                spec, on_progress=on_progress, on_window=on_window, on_workers=on_workers
            )
        if not state["started"]:
            monitor.start()
        report = monitor.stop()
        summary = RunSummary.from_load(label, result, report)
        print_run(self.console, summary)
        return summary

    def wait_quiet(self, pids: list[int], max_wait: float | None = None) -> None:
        wait = self.options.quiet_wait if max_wait is None else min(max_wait, self.options.quiet_wait)
        budget = min(wait, self.options.quiet_budget - self.quiet_waited)
        if budget <= 0 or self.options.smoke:
            return
        waited, load = wait_for_quiet(pids, budget)
        self.quiet_waited += waited
        if load >= 0.3:
            self.console.print(f"[yellow]other processes use {load:.2f} cores; measuring anyway[/yellow]")

    @contextmanager
    def progress(self, label: str, spec: LoadSpec) -> Iterator[Callable[[float, int, int], None]]:
        if not self.options.progress or not self.console.is_terminal:
            yield lambda frac, ok, err: None
            return
        what = "open loop" if spec.mode == "open" else "closed loop"
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[live]}"),
            console=self.console,
            transient=True,
        ) as bar:
            task = bar.add_task(f"{label} ({what})", total=1.0, live="")
            t0 = time.monotonic()
            warm = spec.warmup

            def update(frac: float, ok: int, err: int) -> None:
                elapsed = time.monotonic() - t0 - warm
                rps = ok / elapsed if elapsed > 0.5 else 0.0
                bar.update(task, completed=frac, live=f"ok {ok:,}  err {err:,}  ~{rps:,.0f}/s")

            yield update
