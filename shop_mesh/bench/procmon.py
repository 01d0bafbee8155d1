"""CPU seconds and peak RSS of every process of the system under test, sampled with psutil.

`start()` snapshots CPU times (user + system, all threads) at the opening of the measurement window,
`stop()` at its close; a background thread samples RSS every `interval` seconds in between, so the
peak is the highest sample. The machine-wide busy CPU time over the same window is recorded too:
`other_cpu_s` is the part no watched process accounts for (other work on the machine), which tells
the reader whether a run was disturbed.

psutil's CPU times come in 10 ms clock ticks; `cpu_exact_s` is the same CPU time in nanoseconds
from the scheduler (/proc/<pid>/task/*/schedstat, every live thread; None where unavailable), for
figures built from short windows (envoy-floor's per-round CPU per call: tens of ms per round).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass
class ProcStat:
    label: str
    pid: int
    cpu_s: float
    rss_start_bytes: int
    rss_peak_bytes: int
    rss_end_bytes: int
    cpu_exact_s: float | None = None  # scheduler ns: see the module docstring

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MonitorReport:
    window_s: float
    processes: list[ProcStat]
    machine_busy_cpu_s: float
    cpu_count: int

    @property
    def watched_cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.processes)

    @property
    def other_cpu_s(self) -> float:
        return max(0.0, self.machine_busy_cpu_s - self.watched_cpu_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "cpu_count": self.cpu_count,
            "machine_busy_cpu_s": self.machine_busy_cpu_s,
            "watched_cpu_s": self.watched_cpu_s,
            "other_cpu_s": self.other_cpu_s,
            "processes": [p.to_json() for p in self.processes],
        }


def _busy(t: Any) -> float:
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _cpu_exact(pid: int) -> float | None:
    """On-CPU seconds of every live thread of `pid`, from the scheduler's ns counters."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
                total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


class ProcessMonitor:
    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self._procs: dict[str, psutil.Process] = {}
        self._cpu0: dict[str, float] = {}
        self._rss0: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self._last_rss: dict[str, int] = {}
        self._last_cpu: dict[str, float] = {}
        self._exact0: dict[str, float | None] = {}
        self._last_exact: dict[str, float | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._machine0 = 0.0
        self._lock = threading.Lock()

    def watch(self, label: str, pid: int) -> None:
        """Add a process (before or during the window). A label seen twice gets a suffix."""
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        base, n = label, 2
        while label in self._procs:
            label = f"{base}#{n}"
            n += 1
        with self._lock:
            self._procs[label] = proc
            if self._thread is not None:
                self._snapshot_start(label, proc)

    def _snapshot_start(self, label: str, proc: psutil.Process) -> None:
        with contextlib.suppress(psutil.Error):
            self._cpu0[label] = _cpu(proc)
            rss = int(proc.memory_info().rss)
            self._rss0[label] = rss
            self._peak[label] = rss
            self._last_rss[label] = rss
            self._last_cpu[label] = self._cpu0[label]
            self._exact0[label] = self._last_exact[label] = _cpu_exact(proc.pid)

    def start(self) -> None:
        with self._lock:
            self._t0 = time.monotonic()
            self._machine0 = _busy(psutil.cpu_times())
            for label, proc in self._procs.items():
                self._snapshot_start(label, proc)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="procmon", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with self._lock:
            for label, proc in self._procs.items():
                with contextlib.suppress(psutil.Error):
                    rss = int(proc.memory_info().rss)
                    self._last_rss[label] = rss
                    self._peak[label] = max(self._peak.get(label, 0), rss)
                    # Keep the last CPU reading: a process that exits mid-window still counts.
                    self._last_cpu[label] = _cpu(proc)
                    if (exact := _cpu_exact(proc.pid)) is not None:
                        self._last_exact[label] = exact

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def rss(self, label: str) -> int:
        """Current RSS of a watched process (sampled now)."""
        return int(self._procs[label].memory_info().rss)

    def stop(self) -> MonitorReport:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        machine = _busy(psutil.cpu_times()) - self._machine0
        window = time.monotonic() - self._t0
        stats: list[ProcStat] = []
        with self._lock:
            for label, proc in self._procs.items():
                if label not in self._cpu0:
                    continue
                exact0, exact1 = self._exact0.get(label), self._last_exact.get(label)
                stats.append(
                    ProcStat(
                        label=label,
                        pid=proc.pid,
                        cpu_s=max(0.0, self._last_cpu.get(label, 0.0) - self._cpu0[label]),
                        rss_start_bytes=self._rss0[label],
                        rss_peak_bytes=self._peak.get(label, 0),
                        rss_end_bytes=self._last_rss.get(label, 0),
                        cpu_exact_s=max(0.0, exact1 - exact0)
                        if exact0 is not None and exact1 is not None
                        else None,
                    )
                )
        self._thread = None
        return MonitorReport(window, stats, machine, psutil.cpu_count() or 1)


def other_load(pids: list[int], interval: float = 0.5) -> float:
    """CPU cores used over `interval` by everything on the machine except `pids`."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))

    def ours() -> float:
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += _cpu(p)
        return total

    m0, o0 = _busy(psutil.cpu_times()), ours()
    time.sleep(interval)
    m1, o1 = _busy(psutil.cpu_times()), ours()
    return max(0.0, (m1 - m0) - (o1 - o0)) / interval


def wait_for_quiet(pids: list[int], max_wait: float, threshold: float = 0.3) -> tuple[float, float]:
    """Wait (at most `max_wait` s) until other work on the machine uses < `threshold` cores.

    Returns (seconds waited, the last load seen). Other users of a shared machine skew a benchmark;
    the wait lowers the odds, the 'other load' column of the report shows what remained.
    """
    t0 = time.monotonic()
    load = other_load(pids, 0.3)
    while load >= threshold and time.monotonic() - t0 < max_wait:
        load = other_load(pids, 0.5)
    return time.monotonic() - t0, load
