"""Two replicas of user and of order: a hung replica (SIGSTOP) costs no read, and `mesh restart`
returns only once every caller routes to the restarted instance, so a second fault right after it
finds a replica in rotation (no outage)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.mesh.runner import control_request
from tests.mesh.conftest import (
    FAST_RECONNECT,
    CreateOrderLoad,
    MeshProcess,
    alive,
    create_user,
    edge_channel,
    host_flags,
    running_mesh,
    stat,
)
from tests.support import authorized_channel

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh-supervision-replicas")]

HANG_S = 5.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    root = tmp_path_factory.mktemp("supervision-replicas")
    with running_mesh(
        root / "run", replicas={"user": 2, "order": 2}, env=["payment:SETTLEMENT_DELAY_SECONDS=0"]
    ) as running:
        running.wait_all_in_rotation()
        yield running


class ReadLoad:
    """GetUser and GetOrder through the edge from a few threads until stop(); every outcome kept."""

    def __init__(self, mesh: MeshProcess, user_id: str, order_id: str, workers: int = 4):
        self.edge = mesh.edge
        self.token = mesh.admin_token
        self.user_id = user_id
        self.order_id = order_id
        self.ok: list[tuple[float, float]] = []  # (finished at, latency)
        self.failed: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _work(self, worker: int) -> None:
        with authorized_channel(self.edge, self.token, options=FAST_RECONNECT) as channel:
            users = user_pb2_grpc.UserServiceStub(channel)
            orders = order_pb2_grpc.OrderServiceStub(channel)
            calls: list[Callable[[], Any]] = [
                lambda: users.GetUser(user_pb2.GetUserRequest(user_id=self.user_id), timeout=10),
                lambda: orders.GetOrder(order_pb2.GetOrderRequest(order_id=self.order_id), timeout=10),
            ]
            for i in range(100_000):  # bounded; stop() ends it
                if self._stop.is_set():
                    return
                t0 = time.monotonic()
                try:
                    calls[(i + worker) % 2]()
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failed.append((time.monotonic(), f"{exc.code().name}: {exc.details()}"))
                    continue
                with self._lock:
                    self.ok.append((time.monotonic(), time.monotonic() - t0))

    def ok_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for t, _ in self.ok if start <= t <= end)

    def worst(self, start: float, end: float) -> float:
        with self._lock:
            return max((lat for t, lat in self.ok if start <= t <= end), default=0.0)


def _edge_stat_sum(mesh: MeshProcess, name: str) -> int:
    return stat(mesh.edge_admin, f"cluster.user.{name}") + stat(mesh.edge_admin, f"cluster.order.{name}")


def _out_of_rotation_after(admin: str, cluster: str, address: str, since: float, timeout: float) -> float:
    deadline = since + timeout
    while time.monotonic() < deadline:
        if host_flags(admin, cluster, address) not in ("healthy", ""):
            return time.monotonic() - since
        time.sleep(0.05)
    raise TimeoutError(f"{address} still in {cluster}'s rotation {timeout:.0f}s after SIGSTOP")


def test_a_hung_replica_costs_no_read(mesh: MeshProcess) -> None:
    user_id = create_user(mesh.edge)
    with edge_channel(mesh) as channel:
        order = CreateOrderLoad.create_one(channel, user_id)
    load = ReadLoad(mesh, user_id, order.order_id)
    load.start()
    hung = [mesh.instance("user-1"), mesh.instance("order-1")]
    per_try_timeouts = _edge_stat_sum(mesh, "upstream_rq_per_try_timeout")
    retried_ok = _edge_stat_sum(mesh, "upstream_rq_retry_success")
    stopped: list[int] = []
    try:
        time.sleep(1)  # load before the fault (how much is measured below, not assumed)
        t_stop = time.monotonic()
        for inst in hung:
            os.kill(inst["app_pid"], signal.SIGSTOP)
            stopped.append(inst["app_pid"])
        # The edge's health checks (and per-try timeouts) take the hung replicas out of rotation.
        out_after = [
            _out_of_rotation_after(
                mesh.edge_admin, inst["service"], f"127.0.0.1:{inst['inbound_port']}", t_stop, HANG_S
            )
            for inst in hung
        ]
        time.sleep(max(0.0, t_stop + HANG_S - time.monotonic()))
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    t_cont = time.monotonic()
    try:
        for inst in hung:  # back in rotation after SIGCONT
            address = f"127.0.0.1:{inst['inbound_port']}"
            deadline = time.monotonic() + 20
            while host_flags(mesh.edge_admin, inst["service"], address) != "healthy":
                assert time.monotonic() < deadline, f"{inst['name']} not back in rotation after SIGCONT"
                time.sleep(0.1)
        time.sleep(0.5)
    finally:
        load.stop()
    per_try_timeouts = _edge_stat_sum(mesh, "upstream_rq_per_try_timeout") - per_try_timeouts
    retried_ok = _edge_stat_sum(mesh, "upstream_rq_retry_success") - retried_ok
    print(
        f"\n{per_try_timeouts} reads timed out on a hung replica and {retried_ok} retries succeeded; "
        f"hung replicas out of the edge's rotation after {', '.join(f'{s:.2f}s' for s in out_after)}; "
        f"{load.ok_between(t_stop, t_cont)} reads OK during the {HANG_S:.0f}s hang, slowest "
        f"{load.worst(t_stop, t_cont):.2f}s; {len(load.ok)} reads in all"
    )
    assert all(alive(inst["app_pid"]) for inst in hung)  # paused, not restarted
    assert load.failed == []
    assert load.ok_between(t_stop, t_cont) > 20  # the reads went on during the hang
    # The edge gave up on the hung replica after the read's per-try timeout and retried elsewhere.
    assert per_try_timeouts > 0 and retried_ok > 0
    assert max(out_after) < 4.0


def test_restart_returns_once_routed_so_a_second_fault_is_no_outage(mesh: MeshProcess) -> None:
    user_id = create_user(mesh.edge)
    with edge_channel(mesh) as channel:
        order = CreateOrderLoad.create_one(channel, user_id)
    reads = ReadLoad(mesh, user_id, order.order_id, workers=2)
    writes = CreateOrderLoad(mesh, user_id, workers=2, retry_for=0.0)  # no client retries
    reads.start()
    writes.start()
    try:
        writes.wait_ok(5, timeout=60)
        other = mesh.instance("order-1")
        t0 = time.monotonic()
        # In-process (no CLI start-up between the reply and the checks below).
        restarted = asyncio.run(control_request(mesh.run, {"command": "restart", "instance": "order-0"}))
        returned = time.monotonic()
        # The moment restart returns, the edge routes to the new order-0 ...
        new = next(i for i in restarted["instances"] if i["name"] == "order-0")
        flags = host_flags(mesh.edge_admin, "order", f"127.0.0.1:{new['inbound_port']}")
        assert flags == "healthy", flags
        # ... so losing the other replica right now costs no call.
        os.kill(other["app_pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        time.sleep(3)
        writes.wait_ok(writes.ok_count() + 5, timeout=60)
    finally:
        writes.stop()
        reads.stop()
    print(
        f"\nrestart of order-0 took {returned - t0:.2f}s; after the kill of order-1: "
        f"{reads.ok_between(t_kill, t_kill + 3)} reads OK in 3 s, "
        f"slowest {reads.worst(t_kill, t_kill + 3):.2f}s; "
        f"writes {writes.summary()}"
    )
    assert reads.failed == []
    assert writes.errors == {}, writes.errors
    assert writes.lost() == {}


def _views(mesh: MeshProcess, inst: dict[str, Any]) -> dict[str, str]:
    """How the edge and every sidecar that calls the instance's service see it, right now."""
    state = mesh.state()
    address = f"127.0.0.1:{inst['inbound_port']}"
    views = {"edge": host_flags(str(state["edge_admin"]), inst["service"], address) or "absent"}
    for caller in state["instances"]:
        if inst["service"] in caller["outbound_ports"]:
            admin = f"127.0.0.1:{caller['admin_port']}"
            views[caller["name"]] = host_flags(admin, inst["service"], address) or "absent"
    return views


def test_scale_returns_once_every_caller_routes_accordingly(mesh: MeshProcess) -> None:
    # user is called by the edge and by both order sidecars.
    up = asyncio.run(control_request(mesh.run, {"command": "scale", "service": "user", "replicas": 3}))
    added = next(i for i in up["instances"] if i["name"] == "user-2")
    assert set(_views(mesh, added).values()) == {"healthy"}, _views(mesh, added)
    assert len(_views(mesh, added)) == 3  # the edge, order-0.envoy, order-1.envoy

    asyncio.run(control_request(mesh.run, {"command": "scale", "service": "user", "replicas": 2}))
    assert set(_views(mesh, added).values()) == {"absent"}, _views(mesh, added)
