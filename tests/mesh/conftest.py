"""Helpers for the mesh tier: a real `python -m shop_mesh.mesh run` (apps, Envoy sidecars, edge) per
fixture."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from shop_mesh.mesh import tokens
from shop_mesh.mesh.local import RunDir, read_state
from shop_mesh.mesh.topology import TOPOLOGY_PATH, load
from tests.support import REPO, authorized_channel, free_port

READY_TIMEOUT_S = 150.0


@pytest.hookimpl(trylast=True)
def admin_get(address: str, path: str, timeout: float = 3.0) -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as resp:
        return str(resp.read().decode())


def stats(admin: str, prefix: str = "") -> dict[str, int]:
    """Envoy counters and gauges (histograms skipped) as {name: value}."""
    out: dict[str, int] = {}
    for line in admin_get(admin, "/stats").splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def stat(admin: str, name: str) -> int:
    return stats(admin, name).get(name, 0)


def host_flags(admin: str, cluster: str, address: str) -> str:
    """Envoy's health flags for one upstream host ("healthy", "/failed_active_hc", ...); "" if absent."""
    prefix = f"{cluster}::{address}::health_flags::"
    for line in admin_get(admin, "/clusters").splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :]
    return ""


def wait_in_rotation(admin: str, cluster: str, address: str, timeout: float = 30.0) -> None:
    """Until the Envoy at `admin` load-balances to `address` (it passed its health checks)."""
    deadline = time.monotonic() + timeout
    flags = ""
    while time.monotonic() < deadline:
        flags = host_flags(admin, cluster, address)
        if flags == "healthy":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} not in rotation of {cluster} at {admin}: {flags!r}")


class MeshProcess:
    """`python -m shop_mesh.mesh run` in its own process group; stopped with SIGINT like a Ctrl-C."""

    def __init__(
        self,
        run_dir: Path,
        *,
        replicas: dict[str, int] | None = None,
        env: Sequence[str] = (),
        topology: Path | None = None,
        cwd: Path = REPO,
        extra_env: dict[str, str] | None = None,
        run_args: Sequence[str] = (),
    ):
        self.run = RunDir(run_dir)
        self.topology = topology or TOPOLOGY_PATH
        self.edge_port = free_port()
        self.edge = f"127.0.0.1:{self.edge_port}"
        self.log_path = run_dir.parent / f"{run_dir.name}-runner.log"
        argv = [sys.executable, "-m", "shop_mesh.mesh", "--run-dir", str(run_dir)]
        if topology is not None:
            argv += ["--topology", str(topology)]
        argv += ["run", "--quiet", "--edge-port", str(self.edge_port), "--edge-admin-port", "0"]
        for name, count in (replicas or {}).items():
            argv += ["--replicas", f"{name}={count}"]
        for item in env:
            argv += ["--env", item]
        argv += list(run_args)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **(extra_env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mesh runner exited ({self.proc.returncode}):\n{self.logs()[-4000:]}")
            state = read_state(self.run)
            if state and state.get("ready"):
                return state
            time.sleep(0.3)
        raise TimeoutError(f"mesh not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def state(self) -> dict[str, Any]:
        state = read_state(self.run)
        assert state is not None
        return state

    def instance(self, name: str) -> dict[str, Any]:
        return next(i for i in self.state()["instances"] if i["name"] == name)

    def wait_all_in_rotation(self) -> None:
        """Every live instance is in the edge's rotation and in its callers' sidecars' rotation."""
        state = self.state()
        live = [i for i in state["instances"] if i["app_alive"] and i["ready"]]
        for inst in live:
            address = f"127.0.0.1:{inst['inbound_port']}"
            wait_in_rotation(str(state["edge_admin"]), inst["service"], address)
            for caller in live:
                if inst["service"] in caller["outbound_ports"]:
                    wait_in_rotation(f"127.0.0.1:{caller['admin_port']}", inst["service"], address)

    def token(self, user_id: str | None = None, *, admin: bool = False, ttl_s: float = 3600) -> str:
        """An end-user JWT the edge accepts (what `python -m shop_mesh.mesh token` prints): a customer
        (`user_id`) or an admin."""
        auth = load(self.topology).auth
        roles = [auth.admin_role] if admin else ["customer"]
        return tokens.mint(self.run.jwt, auth.local, user_id or "admin", roles, ttl_s)

    @property
    def admin_token(self) -> str:
        return self.token(admin=True)

    @property
    def edge_admin(self) -> str:
        return str(self.state()["edge_admin"])

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shop_mesh.mesh", "--run-dir", str(self.run.root), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def control(self, *args: str) -> dict[str, Any]:
        proc = self.cli(*args)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def all_pids(self) -> list[int]:
        state = read_state(self.run) or {}
        pids = [state.get("edge_pid")]
        for inst in state.get("instances", []):
            pids += [inst.get("app_pid"), inst.get("sidecar_pid"), inst.get("standby_pid")]
        return [p for p in pids if p]

    def stop(self, timeout: float = 60) -> int | None:
        """Ctrl-C, wait for the orderly stop; then make sure nothing it started is left."""
        pids = self.all_pids()
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_mesh(run_dir: Path, **kwargs: Any) -> Iterator[MeshProcess]:
    mesh = MeshProcess(run_dir, **kwargs)
    try:
        mesh.wait_ready()
        yield mesh
    finally:
        mesh.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def edge_channel(mesh: MeshProcess, token: str | None = None) -> grpc.Channel:
    """A channel through the edge; its calls present `token` (default: an admin's)."""
    return authorized_channel(mesh.edge, token or mesh.admin_token)


# ---------------------------------------------------------------- supervision tests (load and probes)
# A client that reconnects quickly after the edge comes back (gRPC's default backoff starts at 1 s).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
# What a client with a request_id retries: transient faults (a retry has no second effect).
CLIENT_RETRIED = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


def http_status(address: str, path: str, timeout: float = 1.0) -> int:
    """HTTP status of an admin endpoint; 0 if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def serving_through_edge(mesh: MeshProcess, timeout: float = 1.0) -> bool:
    """Every service answers SERVING through the edge, on a fresh connection."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(mesh.edge) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name, service in SERVICES.items():
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=timeout,
                    metadata=(("x-shop-service", name),),
                )
            except grpc.RpcError:
                return False
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
    return True


SERVICES = {
    "user": "shop.user.v1.UserService",
    "order": "shop.order.v1.OrderService",
    "payment": "shop.payment.v1.PaymentService",
}


def sign_up_request(display_name: str = "Mesh Test") -> Any:
    """A CreateUserRequest with a fresh request_id and email."""
    from shop.user.v1 import user_pb2

    return user_pb2.CreateUserRequest(
        request_id=f"u-{uuid.uuid4()}",
        email=f"{uuid.uuid4().hex[:12]}@example.com",
        display_name=display_name,
    )


def create_order_request(user_id: str, units: int = 9) -> Any:
    """A one-book CreateOrderRequest in EUR with a fresh request_id."""
    from shop.common.v1 import money_pb2
    from shop.order.v1 import order_pb2

    return order_pb2.CreateOrderRequest(
        request_id=f"o-{uuid.uuid4()}",
        user_id=user_id,
        line_items=[
            order_pb2.LineItem(
                sku="book", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=units)
            )
        ],
        payment_method_token="tok_visa",
    )


def create_user(edge: str) -> str:
    from shop.user.v1 import user_pb2_grpc

    with grpc.insecure_channel(edge) as channel:
        reply = user_pb2_grpc.UserServiceStub(channel).CreateUser(
            sign_up_request("Supervision Test"), timeout=10
        )
    return str(reply.user.user_id)


def list_orders(stub: Any, user_id: str) -> list[Any]:
    """Every order of a user (all pages; bounded)."""
    from shop.order.v1 import order_pb2

    orders: list[Any] = []
    token = ""
    for _ in range(100):
        page = stub.ListOrders(
            order_pb2.ListOrdersRequest(user_id=user_id, page_size=500, page_token=token), timeout=10
        )
        orders += page.orders
        token = page.next_page_token
        if not token:
            break
    return orders


class CreateOrderLoad:
    """Closed-loop CreateOrder through the edge from `workers` threads. Each call has its own
    request_id, which the client retries on a transient fault (same id: no second order) until it
    succeeds or `retry_for` runs out; bounded by `max_orders` and by stop()."""

    def __init__(
        self,
        mesh: MeshProcess,
        user_id: str,
        *,
        workers: int = 3,
        retry_for: float = 30.0,
        max_orders: int = 2000,
    ):
        self.edge = mesh.edge
        self.token = mesh.admin_token
        self.user_id = user_id
        self.retry_for = retry_for
        self.max_orders = max_orders
        self.orders: dict[str, str] = {}  # request_id -> order_id
        self.started: set[str] = set()
        self.errors: dict[str, int] = {}  # "CODE: details" -> count (each one retried)
        self.gave_up: dict[str, str] = {}  # request_id -> last error
        self.latencies: list[float] = []  # per request_id, retries included
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=timeout)

    def ok_count(self) -> int:
        with self._lock:
            return len(self.orders)

    def wait_ok(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ok_count() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.ok_count()} of {count} orders after {timeout:.0f}s: {self.summary()}"
                )
            time.sleep(0.05)

    def lost(self) -> dict[str, str]:
        """Request ids the client started that never got their order."""
        with self._lock:
            return {rid: self.gave_up.get(rid, "unfinished") for rid in self.started - set(self.orders)}

    def summary(self) -> str:
        with self._lock:
            lat = sorted(self.latencies)
            p99 = lat[int(len(lat) * 0.99)] if lat else 0.0
            retried = sum(self.errors.values())
            return (
                f"{len(self.orders)} orders, {retried} client retries {dict(self.errors)}, "
                f"latency p99 {p99:.2f}s max {(lat[-1] if lat else 0.0):.2f}s"
            )

    @staticmethod
    def request(user_id: str, request_id: str) -> Any:
        from shop.common.v1 import money_pb2
        from shop.order.v1 import order_pb2

        return order_pb2.CreateOrderRequest(
            request_id=request_id,
            user_id=user_id,
            line_items=[
                order_pb2.LineItem(
                    sku="book", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=12)
                )
            ],
            payment_method_token="tok_visa",
        )

    @staticmethod
    def create_one(channel: grpc.Channel, user_id: str) -> Any:
        from shop.order.v1 import order_pb2_grpc

        stub = order_pb2_grpc.OrderServiceStub(channel)
        return stub.CreateOrder(CreateOrderLoad.request(user_id, f"o-{uuid.uuid4()}"), timeout=15).order

    def _work(self) -> None:
        from shop.order.v1 import order_pb2_grpc

        channel = authorized_channel(self.edge, self.token, options=FAST_RECONNECT)
        stub = order_pb2_grpc.OrderServiceStub(channel)
        try:
            while not self._stop.is_set():
                with self._lock:
                    if len(self.started) >= self.max_orders:
                        return
                    rid = f"sup-{uuid.uuid4()}"
                    self.started.add(rid)
                request = self.request(self.user_id, rid)
                t0 = time.monotonic()
                # A started request_id is retried to the end even after stop(): never left half done.
                while True:
                    try:
                        order = stub.CreateOrder(request, timeout=10).order
                    except grpc.RpcError as exc:
                        key = f"{exc.code().name}: {(exc.details() or '')[:80]}"
                        with self._lock:
                            self.errors[key] = self.errors.get(key, 0) + 1
                        if exc.code() not in CLIENT_RETRIED or time.monotonic() - t0 > self.retry_for:
                            with self._lock:
                                self.gave_up[rid] = key
                            break
                        time.sleep(0.1)
                        continue
                    with self._lock:
                        self.orders[rid] = order.order_id
                        self.latencies.append(time.monotonic() - t0)
                    break
        finally:
            channel.close()
