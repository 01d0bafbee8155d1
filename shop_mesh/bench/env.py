"""Starting and stopping what the scenarios measure: the baseline server, the services, the mesh.

Every process started here is registered in a `Stack` and stopped (SIGTERM, then SIGKILL after a
grace period) when the stack closes, whatever happened in between. Services get port 0 and a fresh
data directory, so a benchmark never collides with a running `make run` or with tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shop_mesh.mesh.local import GRPC_SERVER_EXPERIMENTS
from shop_mesh.mesh.local import free_port as free_port  # re-exported: the one port allocator

REPO = Path(__file__).resolve().parents[2]


class Unavailable(RuntimeError):
    """The system under test cannot be started here; the scenario reports 'unavailable: <why>'."""


@dataclass
class Proc:
    label: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    grace: float = 15.0  # seconds between SIGTERM and SIGKILL when stopping it

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Stack:
    """Owns processes; `close()` stops them in reverse start order."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    # Run by close() after the processes stopped (e.g. dropping the PostgreSQL variant's databases).
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def start(
        self,
        label: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        new_session: bool = True,
        grace: float = 15.0,
    ) -> Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{label}.log"
        full_env = {**os.environ, **(env or {})}
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,  # its own process group: stopping it stops its children
            )
        proc = Proc(label, popen, log_path, grace)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float | None = None) -> int | None:
        grace = proc.grace if grace is None else grace
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)
        # Children left behind in the group (e.g. Envoy under a runner that died) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.popen.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        self.procs.clear()
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        self.cleanups.clear()

    def release(self, proc: Proc) -> None:
        """Stop a process and forget it (a deployment stopped before the run ends)."""
        self.stop(proc)
        if proc in self.procs:
            self.procs.remove(proc)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(exc: BaseException) -> str:
    """One line for the report: a gRPC error as its code and details, anything else as type: text."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"[:300]


def wait_for_log(proc: Proc, pattern: str, timeout: float) -> re.Match[str]:
    """Wait until a line of the process's log matches; Unavailable if it exits or times out."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = proc.log_tail(200_000)
        m = rx.search(text)
        if m:
            return m
        if not proc.alive():
            raise Unavailable(f"{proc.label} exited with {proc.popen.returncode}: {_last_line(proc)}")
        time.sleep(0.05)
    raise Unavailable(f"{proc.label}: no {pattern!r} in its log within {timeout:.0f} s")


def _last_line(proc: Proc) -> str:
    lines = [line for line in proc.log_tail().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def check_serving(
    target: str, service: str = "", timeout: float = 1.0, metadata: tuple[tuple[str, str], ...] = ()
) -> bool:
    """One synchronous grpc.health.v1 Check."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata or None
            )
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def wait_serving(target: str, services: Sequence[str], timeout: float, proc: Proc | None = None) -> float:
    """Poll until every named service is SERVING at `target`; returns the seconds it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    pending = list(services)
    while pending and time.monotonic() < deadline:
        pending = [s for s in pending if not check_serving(target, s, timeout=0.5)]
        if not pending:
            break
        if proc is not None and not proc.alive():
            raise Unavailable(f"{proc.label} exited with {proc.popen.returncode}: {_last_line(proc)}")
        time.sleep(0.05)
    if pending:
        raise Unavailable(f"{target}: {pending} not SERVING within {timeout:.0f} s")
    return time.monotonic() - t0


# --------------------------------------------------------------------------- baseline


def start_baseline(stack: Stack, *, uvloop: bool = True) -> tuple[Proc, int]:
    argv = [sys.executable, "-m", "shop_mesh.bench.baseline_server", "--port", "0"]
    if not uvloop:
        argv.append("--no-uvloop")
    # The reference runs grpc as the apps do (same core experiments), so L is the limit of the same runtime.
    proc = stack.start("baseline-server", argv, {"GRPC_EXPERIMENTS": GRPC_SERVER_EXPERIMENTS})
    port = int(wait_for_log(proc, r"PORT (\d+)", 30).group(1))
    wait_serving(f"127.0.0.1:{port}", [""], 15, proc)
    return proc, port


# --------------------------------------------------------------------------- services

SERVICE_NAMES = {
    "user": "shop.user.v1.UserService",
    "order": "shop.order.v1.OrderService",
    "payment": "shop.payment.v1.PaymentService",
}


def service_runnable(name: str) -> str | None:
    """None if `python -m shop_mesh.services.<name>` exists, else why not."""
    if not (REPO / "shop_mesh" / "services" / name / "__main__.py").exists():
        return f"shop_mesh/services/{name}/__main__.py does not exist yet"
    return None


def start_service(
    stack: Stack, name: str, data_dir: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> tuple[Proc, int]:
    """`python -m shop_mesh.services.<name>` on a free port with its own data dir; returns once it is SERVING.

    The port is chosen here (not PORT=0 read back from the log), so it works at any LOG_LEVEL.
    """
    if why := service_runnable(name):
        raise Unavailable(why)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = stack.start(
        name,
        [sys.executable, "-m", f"shop_mesh.services.{name}"],
        {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "DATA_DIR": str(data_dir),
            "GRPC_EXPERIMENTS": GRPC_SERVER_EXPERIMENTS,  # as the mesh runs its apps
            **(env or {}),
        },
    )
    wait_serving(f"127.0.0.1:{port}", ["", SERVICE_NAMES[name]], timeout, proc)
    return proc, port


@contextlib.contextmanager
def stack_in(workdir: Path) -> Iterator[Stack]:
    stack = Stack(workdir)
    try:
        yield stack
    finally:
        stack.close()
