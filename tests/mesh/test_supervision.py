"""The local mesh heals itself: SIGKILL of an app, of a sidecar and of the edge under steady CreateOrder
load. The runner restarts each within 5 s (measured from the kill until the process is back and routed),
the client's request_id retries lose nothing and double nothing, every order finishes its saga, and
`mesh status` counts the restarts.

One replica per service, so every kill is a real outage of its part of the mesh that only the
runner's supervision can end (no other replica to fail over to).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc

from tests.mesh.conftest import (
    CreateOrderLoad,
    MeshProcess,
    alive,
    create_user,
    edge_channel,
    host_flags,
    http_status,
    list_orders,
    running_mesh,
    serving_through_edge,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh-supervision")]

BACK_WITHIN_S = 5.0
TERMINAL = {order_pb2.ORDER_STATE_PAID, order_pb2.ORDER_STATE_REJECTED}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    root = tmp_path_factory.mktemp("supervision-mesh")
    with running_mesh(
        root / "run",
        env=[
            # Orders reach PAID right after capture; a saga whose driver died is finished quickly.
            "payment:SETTLEMENT_DELAY_SECONDS=0",
            "order:RECONCILE_INTERVAL_SECONDS=1",
            "order:RECONCILE_STUCK_AFTER_SECONDS=2",
        ],
    ) as running:
        running.wait_all_in_rotation()
        yield running


@pytest.fixture(scope="module")
def ports_before(mesh: MeshProcess) -> dict[str, list[int]]:
    """Every port of every process before the first kill."""
    state = mesh.state()
    ports = {"edge": [mesh.edge_port, int(str(state["edge_admin"]).rsplit(":", 1)[1])]}
    for inst in state["instances"]:
        ports[inst["name"]] = [
            inst["app_port"],
            inst["inbound_port"],
            inst["admin_port"],
            *sorted(inst["outbound_ports"].values()),
        ]
    return ports


def _back(
    mesh: MeshProcess, victim: str, old_pid: int, killed_at: float, timeout: float = 30.0
) -> tuple[float, float]:
    """Seconds from the kill until state.json stops calling the old process running, and until the
    victim runs again (a new pid), is ready and is routed: an app SERVING and its endpoint healthy at
    the edge, a sidecar ready and healthy at the edge, the edge ready and every service SERVING
    through it."""
    deadline = killed_at + timeout
    noticed = 0.0
    while time.monotonic() < deadline:
        state = mesh.state()
        if victim == "edge":
            proc = state.get("edge_process") or {}
        else:
            name, _, kind = victim.partition(".")
            inst = next(i for i in state["instances"] if i["name"] == name)
            proc = inst["sidecar_process" if kind else "app_process"]
        if not noticed and (proc.get("pid") != old_pid or proc.get("state") != "running"):
            noticed = time.monotonic() - killed_at
        if victim == "edge":
            if (
                proc.get("pid") not in (None, old_pid)
                and http_status(f"{state['edge_admin']}", "/ready") == 200
                and serving_through_edge(mesh)
            ):
                return noticed, time.monotonic() - killed_at
        elif proc["pid"] not in (None, old_pid) and proc["state"] == "running":
            inbound = f"127.0.0.1:{inst['inbound_port']}"
            if host_flags(str(state["edge_admin"]), inst["service"], inbound) == "healthy":
                return noticed, time.monotonic() - killed_at
        time.sleep(0.05)
    raise TimeoutError(f"{victim} not back {timeout:.0f}s after SIGKILL:\n{mesh.logs()[-3000:]}")


def _wait_standby_warm(mesh: MeshProcess, name: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while mesh.instance(name).get("standby") != "warm":
        assert time.monotonic() < deadline, f"{name}'s standby not warm after {timeout:.0f}s"
        time.sleep(0.1)


def _pid_of(mesh: MeshProcess, victim: str) -> int:
    state = mesh.state()
    if victim == "edge":
        return int(state["edge_pid"])
    name, _, kind = victim.partition(".")
    inst = mesh.instance(name)
    return int(inst["sidecar_pid" if kind else "app_pid"])


def _kill_under_load(mesh: MeshProcess, victim: str) -> None:
    user_id = create_user(mesh.edge)
    load = CreateOrderLoad(mesh, user_id, workers=3)
    load.start()
    try:
        load.wait_ok(10, timeout=60)  # the load runs before the fault
        if "." not in victim and victim != "edge":
            _wait_standby_warm(mesh, victim)  # the steady state: the app's standby has done its imports
        pid = _pid_of(mesh, victim)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        noticed, back = _back(mesh, victim, pid, killed_at)
        print(f"\n{victim}: state.json updated {noticed:.2f}s and back and routed {back:.2f}s after SIGKILL")
        assert not alive(pid)
        # ... and the load goes on through it.
        load.wait_ok(load.ok_count() + 10, timeout=60)
    finally:
        load.stop()
    print(f"{victim}: {load.summary()}")
    # Every request_id the client started got its order (0 lost): the client retried with the same id.
    assert load.lost() == {}, load.lost()
    assert len(load.orders) >= 20
    # Exactly one order per request_id (0 duplicated), and no other order for this user.
    listed = _wait_terminal(mesh, user_id, len(load.orders))
    assert sorted(o.order_id for o in listed) == sorted(load.orders.values())
    # ... and one payment per order: the sagas that were cut and driven again charged once.
    with edge_channel(mesh) as channel:
        payments = payment_pb2_grpc.PaymentServiceStub(channel)
        charged = {
            o.order_id: len(
                payments.ListPayments(
                    payment_pb2.ListPaymentsRequest(order_id=o.order_id), timeout=10
                ).payments
            )
            for o in listed
        }
    assert {k: v for k, v in charged.items() if v != 1} == {}
    # Within the bound measured above, so a failure shows the numbers.
    assert back <= BACK_WITHIN_S, f"{victim} back after {back:.2f}s"
    assert noticed < 1.0, f"state.json called {victim} running {noticed:.2f}s after it died"


def _wait_terminal(
    mesh: MeshProcess, user_id: str, expected: int, timeout: float = 45.0
) -> list[order_pb2.Order]:
    """The user's orders once every one is PAID or REJECTED (0 stuck); fails with the stragglers."""
    deadline = time.monotonic() + timeout
    with edge_channel(mesh) as channel:
        stub = order_pb2_grpc.OrderServiceStub(channel)
        orders = list_orders(stub, user_id)
        while time.monotonic() < deadline:
            assert len(orders) == expected, f"{len(orders)} orders listed for {expected} request ids"
            if all(o.state in TERMINAL for o in orders):
                return orders
            time.sleep(0.5)
            orders = list_orders(stub, user_id)
    stuck = [(o.order_id, order_pb2.OrderState.Name(o.state)) for o in orders if o.state not in TERMINAL]
    raise AssertionError(f"{len(stuck)} orders not PAID/REJECTED after {timeout:.0f}s: {stuck[:10]}")


def test_sigkill_of_an_app_under_load(mesh: MeshProcess, ports_before: dict[str, list[int]]) -> None:
    _kill_under_load(mesh, "order-0")


def test_sigkill_of_a_sidecar_under_load(mesh: MeshProcess) -> None:
    # Payment's sidecar: the sagas in flight lose their AuthorizePayment/CapturePayment hop.
    _kill_under_load(mesh, "payment-0.envoy")


def test_sigkill_of_the_edge_under_load(mesh: MeshProcess) -> None:
    _kill_under_load(mesh, "edge")


def test_status_shows_each_restart(mesh: MeshProcess, ports_before: dict[str, list[int]]) -> None:
    proc = mesh.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout)
    by_name = {i["name"]: i for i in state["instances"]}
    assert state["edge_process"]["restarts"] == 1
    assert state["edge_process"]["last_exit"] == "SIGKILL"
    assert state["edge_process"]["state"] == "running"
    assert by_name["order-0"]["app_process"]["restarts"] == 1
    assert by_name["order-0"]["app_process"]["last_exit"] == "SIGKILL"
    assert by_name["payment-0"]["sidecar_process"]["restarts"] == 1
    assert by_name["payment-0"]["app_process"]["restarts"] == 0
    assert by_name["user-0"]["app_process"]["restarts"] == 0
    assert state["crashes"] == 3
    assert state["through_edge"] == {"user": "SERVING", "payment": "SERVING", "order": "SERVING"}
    for inst in state["instances"]:
        assert inst["app_health"] == "SERVING" and inst["sidecar_ready"], inst
        assert inst["endpoint_health"] == "HEALTHY", inst
    # Restarted on the same ports: the sidecars' configs, the EDS files and clients stay valid.
    ports_after = {"edge": [mesh.edge_port, int(str(state["edge_admin"]).rsplit(":", 1)[1])]}
    for inst in state["instances"]:
        ports_after[inst["name"]] = [
            inst["app_port"],
            inst["inbound_port"],
            inst["admin_port"],
            *sorted(inst["outbound_ports"].values()),
        ]
    assert ports_after == ports_before

    table = mesh.cli("status")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[4:] if line.strip()}
    # process, port, pid, state, since, restarts, last exit, ...
    assert rows["order-0"][3] == "running" and rows["order-0"][5:7] == ["1", "SIGKILL"]
    assert rows["payment-0.envoy"][5:7] == ["1", "SIGKILL"]
    assert rows["edge"][5:7] == ["1", "SIGKILL"]
    assert rows["user-0"][5:7] == ["0", "-"]
    # The runner's log tells the story too.
    log = mesh.logs()
    for name in ("order-0", "payment-0.envoy", "edge"):
        assert f"{name} exited unexpectedly (SIGKILL)" in log
        assert f"{name} is back after" in log
