"""The mesh for real: the three services behind Envoy sidecars and the edge, started by `python -m
shop_mesh.mesh run`.

One mesh for the whole module (tests run in order on one xdist worker): user x2, order x2, payment x2;
user-1 and payment-1 fail half of their calls with UNAVAILABLE (CHAOS_UNAVAILABLE_PERCENT) so every
test also shows that the mesh's retries hide transient faults. Payments settle after SETTLE_S, so an
order's WatchOrder stream stays open (and silent) for more than a minute before PAID arrives.
The topology is the real one with DeleteUser switched to retry class `none` (a stand-in for a
mutation without request_id) and outlier detection at 30 consecutive failures, so the 50 % chaos
replica is never ejected by chance (at 10, a run of 12 injected failures in a row ejected it once in
a CI rehearsal and the retry tests then saw no chaos at all; test_outlier.py covers ejection).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.mesh import pki
from shop_mesh.mesh.topology import TOPOLOGY_PATH
from shop_mesh.services.common.ids import new_id
from tests.mesh.conftest import MeshProcess, admin_get, alive, running_mesh, stat
from tests.support import authorized_channel, run_grpcurl

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh")]

SETTLE_S = 65
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ clients
class Shop:
    """Typed stubs over one channel (the edge)."""

    def __init__(self, address: str, token: str):
        # An operator's token: these tests are about the mesh, tests/mesh/test_auth.py about who sees what.
        self.channel = authorized_channel(address, token)
        self.users = user_pb2_grpc.UserServiceStub(self.channel)
        self.orders = order_pb2_grpc.OrderServiceStub(self.channel)
        self.payments = payment_pb2_grpc.PaymentServiceStub(self.channel)

    def create_user(self, request_id: str | None = None, email: str | None = None) -> user_pb2.User:
        rid = request_id or f"u-{uuid.uuid4()}"
        reply = self.users.CreateUser(
            user_pb2.CreateUserRequest(
                request_id=rid,
                email=email or f"{uuid.uuid4().hex[:12]}@example.com",
                display_name="Mesh Test",
            ),
            timeout=10,
        )
        return reply.user

    def create_order(self, user_id: str, request_id: str | None = None) -> order_pb2.Order:
        reply = self.orders.CreateOrder(
            order_pb2.CreateOrderRequest(
                request_id=request_id or f"o-{uuid.uuid4()}",
                user_id=user_id,
                line_items=[
                    order_pb2.LineItem(
                        sku="book", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=12)
                    )
                ],
                payment_method_token="tok_visa",
            ),
            timeout=15,
        )
        return reply.order

    def close(self) -> None:
        self.channel.close()


def run_bounded(
    calls: Sequence[Callable[[], T]], workers: int = 4, timeout: float = 90
) -> list[T | BaseException]:
    """Run the calls concurrently; every result or exception, in order. Bounded in count and time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(c) for c in calls]
        deadline = time.monotonic() + timeout
        out: list[T | BaseException] = []
        for f in futures:
            try:
                out.append(f.result(timeout=max(0.1, deadline - time.monotonic())))
            except BaseException as exc:
                out.append(exc)
        return out


def succeeded(results: list[T | BaseException]) -> list[T]:
    """The results, after asserting that no call failed."""
    assert failures(results) == []
    return [r for r in results if not isinstance(r, BaseException)]


def failures(results: Sequence[Any]) -> list[str]:
    return [
        f"{r.code().name}: {r.details()}" if isinstance(r, grpc.RpcError) else repr(r)
        for r in results
        if isinstance(r, BaseException)
    ]


@dataclass(eq=False)
class Watcher(threading.Thread):
    """A WatchOrder client that resumes with after_sequence after a broken stream (as clients must)."""

    address: str
    order_id: str
    token: str
    max_reconnects: int = 20
    deadline_s: float = 120.0
    events: list[tuple[float, int, int]] = field(default_factory=list)  # (t, sequence, state)
    reconnects: int = 0
    final: str = ""
    opened: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True)

    def run(self) -> None:
        start = time.monotonic()
        channel = authorized_channel(self.address, self.token)
        stub = order_pb2_grpc.OrderServiceStub(channel)
        last = 0
        try:
            while time.monotonic() - start < self.deadline_s:
                try:
                    call = stub.WatchOrder(
                        order_pb2.WatchOrderRequest(order_id=self.order_id, after_sequence=last),
                        timeout=self.deadline_s,
                    )
                    for reply in call:
                        self.opened.set()
                        last = reply.event.sequence
                        self.events.append((time.monotonic() - start, last, reply.event.state))
                    self.final = "OK"
                    return
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.UNKNOWN,
                    ):
                        self.final = code.name
                        return
                    self.reconnects += 1
                    if self.reconnects > self.max_reconnects:
                        self.final = f"gave up: {code.name}"
                        return
                    time.sleep(0.2)
            self.final = "deadline"
        finally:
            channel.close()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    root = tmp_path_factory.mktemp("live-mesh")
    raw = yaml.safe_load(TOPOLOGY_PATH.read_text())
    raw["services"]["user"]["methods"]["DeleteUser"]["retry"] = "none"
    raw["upstream"]["outlier_detection"]["consecutive_5xx"] = 30
    raw["upstream"]["outlier_detection"]["consecutive_gateway_failure"] = 30
    topology = root / "topology.yaml"
    topology.write_text(yaml.safe_dump(raw, sort_keys=False))
    with running_mesh(
        root / "run",
        replicas={"user": 2, "order": 2, "payment": 2},
        env=[
            "user-1:CHAOS_UNAVAILABLE_PERCENT=50",
            "payment-1:CHAOS_UNAVAILABLE_PERCENT=50",
            f"payment:SETTLEMENT_DELAY_SECONDS={SETTLE_S}",
        ],
        topology=topology,
    ) as running:
        # "Ready" means every service answers through the edge; the tests also want every replica
        # (the failing ones included) in every caller's load balancing before they measure.
        running.wait_all_in_rotation()
        yield running


@pytest.fixture(scope="module")
def shop(mesh: MeshProcess) -> Iterator[Shop]:
    client = Shop(mesh.edge, mesh.admin_token)
    yield client
    client.close()


@pytest.fixture(scope="module")
def long_stream(mesh: MeshProcess, shop: Shop) -> Iterator[Watcher]:
    """Opened as soon as the mesh is up; PAID arrives after SETTLE_S (> 60 s) of silence."""
    user = shop.create_user()
    order = shop.create_order(user.user_id)
    watcher = Watcher(mesh.edge, order.order_id, mesh.admin_token, max_reconnects=0, deadline_s=SETTLE_S + 60)
    watcher.start()
    assert watcher.opened.wait(20), "WatchOrder delivered nothing"
    yield watcher
    watcher.join(timeout=1)


# ------------------------------------------------------------------------------------------------ tests
def test_long_stream_is_open(long_stream: Watcher) -> None:
    # Starts the >60 s stream first; the tests below run while it is open.
    assert long_stream.is_alive()


def _grpcurl(mesh: MeshProcess, *args: str, data: dict[str, Any] | None = None, header: str = "") -> Any:
    token = f"authorization: Bearer {mesh.admin_token}"
    proc = run_grpcurl(mesh.edge, *args, data=data, header=header, headers=[token])
    assert proc.returncode == 0, f"grpcurl {args}: {proc.stderr}"
    return proc.stdout


def test_grpcurl_walkthrough_through_the_edge(mesh: MeshProcess) -> None:
    listed = set(_grpcurl(mesh, "list").split())
    assert {
        "shop.user.v1.UserService",
        "shop.order.v1.OrderService",
        "shop.payment.v1.PaymentService",
    } <= listed
    assert "rpc CreateOrder" in _grpcurl(mesh, "describe", "shop.order.v1.OrderService")
    for name, service in [
        ("user", "shop.user.v1.UserService"),
        ("order", "shop.order.v1.OrderService"),
        ("payment", "shop.payment.v1.PaymentService"),
    ]:
        out = _grpcurl(
            mesh, "grpc.health.v1.Health/Check", data={"service": service}, header=f"x-shop-service: {name}"
        )
        assert json.loads(out)["status"] == "SERVING"

    user = json.loads(
        _grpcurl(
            mesh,
            "shop.user.v1.UserService/CreateUser",
            data={
                "request_id": f"u-{uuid.uuid4()}",
                "email": f"{uuid.uuid4().hex[:10]}@example.com",
                "display_name": "Ada",
            },
        )
    )["user"]
    assert (
        json.loads(_grpcurl(mesh, "shop.user.v1.UserService/GetUser", data={"user_id": user["user_id"]}))[
            "user"
        ]["email"]
        == user["email"]
    )
    create = {
        "request_id": f"o-{uuid.uuid4()}",
        "user_id": user["user_id"],
        "line_items": [{"sku": "book", "quantity": 2, "unit_price": {"currency_code": "EUR", "units": 12}}],
        "payment_method_token": "tok_visa",
    }
    order = json.loads(_grpcurl(mesh, "shop.order.v1.OrderService/CreateOrder", data=create))["order"]
    assert order["state"] in ("ORDER_STATE_AWAITING_SETTLEMENT", "ORDER_STATE_PAID")
    again = json.loads(_grpcurl(mesh, "shop.order.v1.OrderService/CreateOrder", data=create))["order"]
    assert again["order_id"] == order["order_id"]  # same request_id: the first result, no second order
    got = json.loads(
        _grpcurl(mesh, "shop.order.v1.OrderService/GetOrder", data={"order_id": order["order_id"]})
    )
    assert got["order"]["total"]["units"] == "24"
    listed_orders = json.loads(
        _grpcurl(mesh, "shop.order.v1.OrderService/ListOrders", data={"user_id": user["user_id"]})
    )["orders"]
    assert [o["order_id"] for o in listed_orders] == [order["order_id"]]
    payments = json.loads(
        _grpcurl(mesh, "shop.payment.v1.PaymentService/ListPayments", data={"order_id": order["order_id"]})
    )["payments"]
    assert len(payments) == 1
    cancelled = json.loads(
        _grpcurl(
            mesh,
            "shop.order.v1.OrderService/CancelOrder",
            data={"request_id": f"c-{uuid.uuid4()}", "order_id": order["order_id"], "reason": "walk-through"},
        )
    )["order"]
    assert cancelled["state"] == "ORDER_STATE_CANCELLED"
    # The stream replays the stored events and ends with OK at the terminal state.
    out = _grpcurl(mesh, "shop.order.v1.OrderService/WatchOrder", data={"order_id": order["order_id"]})
    states = [e["event"]["state"] for e in _json_stream(out)]
    assert states[0] == "ORDER_STATE_PENDING"
    assert states[-1] == "ORDER_STATE_CANCELLED"


def _json_stream(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    out, i = [], 0
    text = text.strip()
    while i < len(text):
        obj, end = decoder.raw_decode(text, i)
        out.append(obj)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return out


# ---- mTLS and RBAC at a sidecar's inbound port
def _tls_health(address: str, leaf: pki.Leaf, ca_pem: bytes, server: str) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=leaf.key_pem, certificate_chain=leaf.cert_pem
    )
    with grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", server)]) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _inbound_stat(mesh: MeshProcess, inst: dict[str, Any], name: str) -> int:
    return stat(f"127.0.0.1:{inst['admin_port']}", f"listener.127.0.0.1_{inst['inbound_port']}.{name}")


def test_inbound_refuses_plaintext_foreign_ca_and_wrong_identity(mesh: MeshProcess) -> None:
    payment = mesh.instance("payment-0")
    inbound = f"127.0.0.1:{payment['inbound_port']}"
    mesh_ca = pki.load_or_create_ca(mesh.run.pki / "ca")
    server_name = "payment.mesh.local"

    # A mesh identity that may call payment: accepted (sanity check of the client below).
    good = pki.issue(mesh_ca, "spiffe://shop.local/ns/shop/sa/order", ttl=pki.LEAF_TTL)
    assert _tls_health(inbound, good, mesh_ca.cert_pem, server_name) == grpc.StatusCode.OK

    # Plaintext.
    before = _inbound_stat(mesh, payment, "ssl.connection_error")
    with grpc.insecure_channel(inbound) as channel, pytest.raises(grpc.RpcError) as plain:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _inbound_stat(mesh, payment, "ssl.connection_error") > before

    # A client certificate from another CA, claiming a valid mesh identity.
    before = _inbound_stat(mesh, payment, "ssl.fail_verify_error")
    rogue_ca = pki.new_ca("rogue CA")
    forged = pki.issue(rogue_ca, "spiffe://shop.local/ns/shop/sa/order")
    assert _tls_health(inbound, forged, mesh_ca.cert_pem, server_name) == grpc.StatusCode.UNAVAILABLE
    assert _inbound_stat(mesh, payment, "ssl.fail_verify_error") > before

    # A valid mesh certificate with an identity that is no caller of payment.
    before = _inbound_stat(mesh, payment, "ssl.fail_verify_san")
    stranger = pki.issue(mesh_ca, "spiffe://shop.local/ns/shop/sa/mallory")
    assert _tls_health(inbound, stranger, mesh_ca.cert_pem, server_name) == grpc.StatusCode.UNAVAILABLE
    assert _inbound_stat(mesh, payment, "ssl.fail_verify_san") > before


def test_rbac_denies_user_authorize_payment_and_allows_order(mesh: MeshProcess) -> None:
    inbound = f"127.0.0.1:{mesh.instance('payment-0')['inbound_port']}"
    mesh_ca = pki.load_or_create_ca(mesh.run.pki / "ca")

    def authorize(identity: str) -> grpc.StatusCode:
        leaf = pki.issue(mesh_ca, f"spiffe://shop.local/ns/shop/sa/{identity}")
        creds = grpc.ssl_channel_credentials(mesh_ca.cert_pem, leaf.key_pem, leaf.cert_pem)
        options = [("grpc.ssl_target_name_override", "payment.mesh.local")]
        with grpc.secure_channel(inbound, creds, options=options) as channel:
            try:
                payment_pb2_grpc.PaymentServiceStub(channel).AuthorizePayment(
                    payment_pb2.AuthorizePaymentRequest(
                        request_id=f"rbac-{uuid.uuid4()}",
                        order_id=new_id("ord"),
                        amount=money_pb2.Money(currency_code="EUR", units=5),
                        payment_method_token="tok_visa",
                    ),
                    timeout=10,
                )
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert authorize("user") == grpc.StatusCode.PERMISSION_DENIED
    assert authorize("order") == grpc.StatusCode.OK


# ---- retries
def _route_stat(admin: str, method: str, name: str, vhost: str = "edge") -> int:
    return stat(admin, f"vhost.{vhost}.route.{method}.{name}")


def test_reads_heal_through_retries(mesh: MeshProcess, shop: Shop) -> None:
    mesh.wait_all_in_rotation()  # the 50 % chaos replicas take their share of calls
    user = shop.create_user()
    admin = mesh.edge_admin
    method = "shop.user.v1.UserService.GetUser"
    retries, successes = (
        _route_stat(admin, method, "upstream_rq_retry"),
        _route_stat(admin, method, "upstream_rq_retry_success"),
    )
    results = run_bounded(
        [lambda: shop.users.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=10)] * 60
    )
    assert failures(results) == []
    # Proof from Envoy, not inference: the edge retried GetUser and the retries succeeded.
    assert _route_stat(admin, method, "upstream_rq_retry") > retries
    assert _route_stat(admin, method, "upstream_rq_retry_success") > successes


def test_request_id_mutations_heal_without_duplicate_effects(mesh: MeshProcess, shop: Shop) -> None:
    mesh.wait_all_in_rotation()  # the 50 % chaos replicas take their share of calls
    admin = mesh.edge_admin
    method = "shop.user.v1.UserService.CreateUser"
    before = _route_stat(admin, method, "upstream_rq_retry")
    emails = [f"dup-{uuid.uuid4().hex[:10]}@example.com" for _ in range(20)]
    rids = [f"u-{uuid.uuid4()}" for _ in emails]
    calls = [functools.partial(shop.create_user, r, e) for r, e in zip(rids, emails, strict=True)]
    first = succeeded(run_bounded(calls))
    assert _route_stat(admin, method, "upstream_rq_retry") > before
    # Repeating every request_id returns the first result; no user exists twice.
    again = succeeded(run_bounded(calls))
    assert [u.user_id for u in first] == [u.user_id for u in again]
    users: list[user_pb2.User] = []
    token = ""
    for _ in range(50):
        page = shop.users.ListUsers(user_pb2.ListUsersRequest(page_size=500, page_token=token), timeout=10)
        users += page.users
        token = page.next_page_token
        if not token:
            break
    mine = [u.email for u in users if u.email in set(emails)]
    assert sorted(mine) == sorted(emails)

    # Order -> payment through order's sidecar: AuthorizePayment/CapturePayment are retried there.
    def order_sidecar_retries() -> int:
        total = 0
        for inst in mesh.state()["instances"]:
            if inst["service"] == "order":
                for m in ("AuthorizePayment", "CapturePayment"):
                    total += _route_stat(
                        f"127.0.0.1:{inst['admin_port']}",
                        f"shop.payment.v1.PaymentService.{m}",
                        "upstream_rq_retry",
                        vhost="payment",
                    )
        return total

    payment_retries = order_sidecar_retries()
    buyer = shop.create_user()
    orders = succeeded(run_bounded([functools.partial(shop.create_order, buyer.user_id)] * 16))
    assert order_sidecar_retries() > payment_retries
    for order in orders:
        listed = shop.payments.ListPayments(
            payment_pb2.ListPaymentsRequest(order_id=order.order_id),
            timeout=10,
        )
        assert len(listed.payments) == 1  # one authorization per order, never a double charge


def test_mutation_without_request_id_is_not_retried(mesh: MeshProcess, shop: Shop) -> None:
    mesh.wait_all_in_rotation()  # the 50 % chaos replicas take their share of calls
    admin = mesh.edge_admin
    method = "shop.user.v1.UserService.DeleteUser"
    retries, total = (
        _route_stat(admin, method, "upstream_rq_retry"),
        _route_stat(admin, method, "upstream_rq_total"),
    )
    seen: list[grpc.StatusCode] = []
    for _ in range(60):  # bounded; stops at the first injected UNAVAILABLE
        try:
            shop.users.DeleteUser(user_pb2.DeleteUserRequest(user_id=f"usr_{uuid.uuid4().hex}"), timeout=10)
            seen.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            seen.append(exc.code())
        if seen[-1] == grpc.StatusCode.UNAVAILABLE:
            break
    # The client sees the fault: the mesh did not retry a route of class `none`.
    assert grpc.StatusCode.UNAVAILABLE in seen
    assert _route_stat(admin, method, "upstream_rq_retry") == retries
    assert _route_stat(admin, method, "upstream_rq_total") - total == len(seen)


def test_stream_open_more_than_60s_keeps_delivering(long_stream: Watcher) -> None:
    long_stream.join(timeout=SETTLE_S + 60)
    assert not long_stream.is_alive()
    assert long_stream.final == "OK", long_stream.final
    assert long_stream.reconnects == 0
    sequences = [s for _, s, _ in long_stream.events]
    assert sequences == sorted(set(sequences))
    last_t, _, last_state = long_stream.events[-1]
    assert last_state == order_pb2.ORDER_STATE_PAID
    assert last_t > 60, f"PAID arrived after {last_t:.1f}s; the stream must have been open > 60 s"


# ---- outlier detection, SIGKILL, scale, rotation
def test_sigkill_of_a_replica_loses_no_mutation_and_streams_resume(
    mesh: MeshProcess, shop: Shop, long_stream: Watcher
) -> None:
    long_stream.join(timeout=SETTLE_S + 60)  # the >60 s stream is not this test's victim
    buyer = shop.create_user()
    watched = [shop.create_order(buyer.user_id) for _ in range(6)]
    watchers = [Watcher(mesh.edge, o.order_id, mesh.admin_token) for o in watched]
    for w in watchers:
        w.start()
    for w in watchers:
        assert w.opened.wait(20)
    victim = mesh.instance("order-1")
    rids = [f"kill-{i}-{uuid.uuid4()}" for i in range(40)]
    done = threading.Semaphore(0)

    def create(rid: str) -> order_pb2.Order:
        try:
            return shop.create_order(buyer.user_id, rid)
        finally:
            done.release()

    def killer() -> None:
        for _ in range(10):
            done.acquire(timeout=30)
        os.kill(victim["app_pid"], signal.SIGKILL)

    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    results = run_bounded([functools.partial(create, r) for r in rids], workers=4, timeout=120)
    kill_thread.join(timeout=30)
    assert not alive(victim["app_pid"])
    created = succeeded(results)
    # Every request_id has exactly one order: nothing lost, nothing doubled.
    orders = shop.orders.ListOrders(
        order_pb2.ListOrdersRequest(user_id=buyer.user_id, page_size=500), timeout=10
    )
    assert len(orders.orders) == len(rids) + len(watched)
    assert {o.order_id for o in created} <= {o.order_id for o in orders.orders}

    # New events reach every watcher, including the ones whose replica died (they resumed).
    for order in watched:
        shop.orders.CancelOrder(
            order_pb2.CancelOrderRequest(request_id=f"c-{uuid.uuid4()}", order_id=order.order_id), timeout=15
        )
    for w in watchers:
        w.join(timeout=60)
        assert w.final == "OK", (w.order_id, w.final)
        sequences = [s for _, s, _ in w.events]
        assert sequences == sorted(set(sequences)), sequences  # exactly once, in order
        assert w.events[-1][2] == order_pb2.ORDER_STATE_CANCELLED
    assert sum(w.reconnects for w in watchers) >= 1  # some streams were on the killed replica


def _method_total(inst: dict[str, Any], method: str) -> int:
    """Calls of `method` (`<package>.<Service>.<Method>`) the instance's app served (its RED metric)."""
    service, name = method.rsplit(".", 1)
    with urllib.request.urlopen(f"http://127.0.0.1:{inst['metrics_port']}/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    labels = (f'rpc_service="{service}"', f'rpc_method="{name}"')
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in lines
        if line.startswith("rpc_server_requests_total{") and all(x in line for x in labels)
    )


def test_scale_adds_replicas_that_get_traffic_without_restarts(mesh: MeshProcess, shop: Shop) -> None:
    before = {p for p in mesh.all_pids() if alive(p)}
    edge_uptime = stat(mesh.edge_admin, "server.uptime")
    proc = mesh.cli("scale", "order", "3")
    assert proc.returncode == 0, proc.stderr
    proc = mesh.cli("scale", "user", "3")
    assert proc.returncode == 0, proc.stderr
    new_order, new_user = mesh.instance("order-2"), mesh.instance("user-2")
    buyer = shop.create_user()
    order = shop.create_order(buyer.user_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run_bounded(
            [lambda: shop.orders.GetOrder(order_pb2.GetOrderRequest(order_id=order.order_id), timeout=10)]
            * 10
        )
        run_bounded([lambda: shop.create_order(buyer.user_id)] * 4)
        if (
            _method_total(new_order, "shop.order.v1.OrderService.GetOrder") > 0
            and _method_total(new_user, "shop.user.v1.UserService.GetUser") > 0
        ):
            break
    # The edge sends to the new order replica; order's sidecars send GetUser to the new user replica.
    assert _method_total(new_order, "shop.order.v1.OrderService.GetOrder") > 0
    assert _method_total(new_user, "shop.user.v1.UserService.GetUser") > 0
    # Nothing else was restarted.
    assert all(alive(p) for p in before)
    assert stat(mesh.edge_admin, "server.uptime") >= edge_uptime
    status = mesh.cli("status")
    assert status.returncode == 0, status.stderr
    assert "order-2" in status.stdout and "user-2" in status.stdout


def _served_serial(admin: str) -> int:
    certs = json.loads(admin_get(admin, "/certs"))["certificates"]
    return int(certs[0]["cert_chain"][0]["serial_number"], 16)


def test_certificate_rotation_under_load_fails_no_call(mesh: MeshProcess, shop: Shop) -> None:
    user = shop.create_user()
    admins = {mesh.edge_admin: mesh.run.pki / "edge"}
    for inst in mesh.state()["instances"]:
        if inst["sidecar_alive"]:
            admins[f"127.0.0.1:{inst['admin_port']}"] = mesh.run.pki / inst["service"]
    old = {admin: _served_serial(admin) for admin in admins}
    stop = threading.Event()
    results: list[Any] = []

    def load() -> None:
        for i in range(400):  # bounded in count and (below) time
            if stop.is_set():
                return
            try:
                if i % 4 == 0:
                    results.append(shop.create_order(user.user_id))
                else:
                    results.append(
                        shop.users.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=10)
                    )
            except grpc.RpcError as exc:
                results.append(exc)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    rotated = mesh.control("rotate-certs")
    assert set(rotated["renewed"]) == {"user", "order", "payment", "edge"}
    # Every Envoy serves its new certificate without a restart.
    deadline = time.monotonic() + 20
    pending = dict(admins)
    while pending and time.monotonic() < deadline:
        for admin, identity_dir in list(pending.items()):
            if _served_serial(admin) == pki.serial(identity_dir) != old[admin]:
                pending.pop(admin)
        time.sleep(0.5)
    assert not pending, f"still on the old certificate: {sorted(pending)}"
    # New connections (a fresh channel through the edge, new handshakes to the sidecars) work too.
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    fresh = Shop(mesh.edge, mesh.admin_token)
    try:
        fresh.users.GetUser(user_pb2.GetUserRequest(user_id=user.user_id), timeout=10)
    finally:
        fresh.close()
    assert len(results) > 20
    assert failures(results) == []


def test_rolling_restart_under_load_fails_no_call(mesh: MeshProcess, shop: Shop) -> None:
    buyer = shop.create_user()
    pid_before = mesh.instance("payment-1")["app_pid"]
    stop = threading.Event()
    results: list[Any] = []

    def load() -> None:
        for _ in range(300):  # bounded in count and (below) time
            if stop.is_set():
                return
            try:
                results.append(shop.create_order(buyer.user_id))
            except grpc.RpcError as exc:
                results.append(exc)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1)
    # payment-1 leaves EDS rotation, drains (in-flight calls finish), then its sidecar stops; then both start.
    mesh.control("restart", "payment-1", "--env", "CHAOS_UNAVAILABLE_PERCENT=0")
    # ... and is back in the callers' rotation: its new sidecar (fresh stats) sees order's calls.
    restarted = mesh.instance("payment-1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _method_total(
        restarted, "shop.payment.v1.PaymentService.AuthorizePayment"
    ):
        time.sleep(0.5)
    stop.set()
    assert _method_total(restarted, "shop.payment.v1.PaymentService.AuthorizePayment") > 0
    for t in threads:
        t.join(timeout=60)
    assert mesh.instance("payment-1")["app_pid"] != pid_before
    assert len(results) > 5
    assert failures(results) == []


def test_status_reports_each_instance(mesh: MeshProcess) -> None:
    proc = mesh.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout)
    by_name = {i["name"]: i for i in state["instances"]}
    assert by_name["order-0"]["app_health"] == "SERVING"
    assert by_name["order-0"]["sidecar_ready"] is True
    assert by_name["order-0"]["endpoint_health"] == "HEALTHY"
    # SIGKILLed above: the runner restarted it (tests/mesh/test_supervision.py covers the details).
    assert by_name["order-1"]["app_process"]["restarts"] >= 1
    assert by_name["order-1"]["app_process"]["last_exit"] == "SIGKILL"
    assert by_name["order-1"]["app_process"]["state"] == "running"
    assert state["through_edge"] == {"user": "SERVING", "payment": "SERVING", "order": "SERVING"}


def test_a_second_runner_on_the_same_run_dir_refuses_and_disturbs_nothing(mesh: MeshProcess) -> None:
    proc = mesh.cli("run", "--quiet", "--edge-port", "0", "--edge-admin-port", "0", timeout=60)
    assert proc.returncode == 1
    assert "a mesh is already running" in proc.stdout
    status = json.loads(mesh.cli("status", "--json").stdout)
    assert status["through_edge"] == {"user": "SERVING", "payment": "SERVING", "order": "SERVING"}


def test_runner_stops_everything_in_order(mesh: MeshProcess) -> None:
    pids = mesh.all_pids()
    assert mesh.stop() == 0
    assert [p for p in pids if alive(p)] == []
    log = mesh.logs()
    assert "stopping: edge, then apps (drain), then sidecars" in log
