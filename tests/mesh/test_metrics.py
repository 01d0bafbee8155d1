"""Metrics from a real mesh: the walk-through moves exactly the counters it should in the apps'
Prometheus endpoints, every sidecar and the edge serve /stats/prometheus (and nothing else of their
admin interface), no label carries an id, the dashboard and the alerts use only exported metrics,
and `mesh top` shows every instance busy under load in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.mesh.top import parse
from shop_mesh.services.common.ids import new_id
from tests.mesh.conftest import MeshProcess, running_mesh
from tests.support import REPO, bearer

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh")]

MONITORING = REPO / "k8s" / "components" / "monitoring"
ID = re.compile(r"(usr|ord|pay)_[0-9A-Z]{26}|[0-9a-f]{8}-[0-9a-f]{4}-")
Samples = dict[str, list[tuple[dict[str, str], float]]]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""


def scrape(url: str) -> Samples:
    code, body = get(url)
    assert code == 200, f"{url}: HTTP {code}"
    return parse(body)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    return sum(v for ls, v in samples.get(name, ()) if all(ls.get(k) == x for k, x in labels.items()))


def app_url(inst: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{inst['metrics_port']}/metrics"


def envoy_urls(state: dict[str, Any]) -> dict[str, str]:
    urls = {i["name"]: f"http://127.0.0.1:{i['stats_port']}" for i in state["instances"]}
    urls["edge"] = f"http://{state['edge_stats']}"
    return urls


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    # Settlement 6 s after capture: the cancel below lands before it, the watched order gets PAID.
    # With the prometheus binary installed, the mesh also runs a real Prometheus (last test).
    with running_mesh(
        tmp_path_factory.mktemp("metrics") / "run",
        env=["payment:SETTLEMENT_DELAY_SECONDS=6"],
        run_args=["--prometheus"] if shutil.which("prometheus") else [],
    ) as m:
        yield m


class Shop:
    def __init__(self, mesh: MeshProcess):
        self.channel = grpc.insecure_channel(mesh.edge)
        self.users = user_pb2_grpc.UserServiceStub(self.channel)
        self.orders = order_pb2_grpc.OrderServiceStub(self.channel)
        self.md = bearer(mesh.admin_token)

    def user(self) -> str:
        request = user_pb2.CreateUserRequest(
            request_id=f"u-{uuid.uuid4()}", email=f"{uuid.uuid4().hex[:12]}@example.com", display_name="M"
        )
        return str(self.users.CreateUser(request, timeout=10, metadata=self.md).user.user_id)

    def order(
        self, user_id: str, request_id: str, units: int = 12, token: str = "tok_visa"
    ) -> order_pb2.Order:
        item = order_pb2.LineItem(
            sku="book", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=units)
        )
        request = order_pb2.CreateOrderRequest(
            request_id=request_id, user_id=user_id, line_items=[item], payment_method_token=token
        )
        return self.orders.CreateOrder(request, timeout=15, metadata=self.md).order


def test_walkthrough_moves_exactly_its_counters(mesh: MeshProcess) -> None:
    shop = Shop(mesh)
    ids: list[str] = []
    user_id = shop.user()
    paid = shop.order(user_id, "metrics-paid")
    rejected = shop.order(user_id, "metrics-rejected", token="tok_decline")
    cancelled = shop.order(user_id, "metrics-cancelled")
    shop.orders.CancelOrder(
        order_pb2.CancelOrderRequest(
            request_id="metrics-cancel", order_id=cancelled.order_id, reason="changed my mind"
        ),
        timeout=15,
        metadata=shop.md,
    )
    replay = shop.order(user_id, "metrics-paid")  # the same request again: the first result
    assert replay.order_id == paid.order_id
    with pytest.raises(grpc.RpcError) as missing:
        shop.orders.GetOrder(order_pb2.GetOrderRequest(order_id=new_id("ord")), timeout=5, metadata=shop.md)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # The stream ends by itself once the order is PAID (settlement comes from the payment service).
    states = [
        e.event.state
        for e in shop.orders.WatchOrder(
            order_pb2.WatchOrderRequest(order_id=paid.order_id), timeout=30, metadata=shop.md
        )
    ]
    assert states[-1] == order_pb2.ORDER_STATE_PAID
    ids += [user_id, paid.order_id, rejected.order_id, cancelled.order_id, paid.payment_id]
    assert rejected.state == order_pb2.ORDER_STATE_REJECTED

    state = mesh.state()
    by_service = {i["service"]: i for i in state["instances"]}
    order = scrape(app_url(by_service["order"]))
    payment = scrape(app_url(by_service["payment"]))
    user = scrape(app_url(by_service["user"]))

    # The saga: one order paid, one rejected (declined), one cancelled (its capture refunded).
    assert value(order, "shop_orders_created_total") == 3
    assert value(order, "shop_orders_completed_total", outcome="paid") == 1
    assert value(order, "shop_orders_completed_total", outcome="rejected", reason="PAYMENT_DECLINED") == 1
    assert value(order, "shop_orders_completed_total", outcome="cancelled") == 1
    assert value(order, "shop_orders_completed_total") == 3
    assert value(order, "shop_order_payment_declines_total") == 1
    assert value(order, "shop_order_saga_compensations_total", action="refund") == 1
    assert value(order, "shop_order_saga_compensations_total") == 1
    assert value(order, "idempotent_replays_total", operation="CreateOrder") == 1
    assert value(order, "shop_order_settlement_lag_seconds_count") == 1
    assert value(order, "shop_order_settlement_lag_seconds_sum") > 0
    assert value(payment, "shop_payment_events_total", type="DECLINED") == 1
    assert value(payment, "shop_payment_declines_total", reason="CARD_DECLINED") == 1
    assert value(payment, "shop_payment_events_total", type="AUTHORIZED") == 2
    assert value(payment, "shop_payment_events_total", type="REFUNDED") == 1

    # RED per RPC: every call counted once with its code, histograms populated.
    create = {"rpc_service": "shop.order.v1.OrderService", "rpc_method": "CreateOrder"}
    assert value(order, "rpc_server_requests_total", **create, rpc_grpc_status_code="OK") == 4
    assert value(order, "rpc_server_duration_seconds_count", **create, rpc_grpc_status_code="OK") == 4
    assert value(order, "rpc_server_duration_seconds_sum", **create) > 0
    assert value(order, "rpc_server_duration_seconds_bucket", **create, le="+Inf") == 4
    assert (
        value(order, "rpc_server_requests_total", rpc_method="GetOrder", rpc_grpc_status_code="NOT_FOUND")
        == 1
    )
    assert value(order, "rpc_server_requests_total", rpc_method="CancelOrder", rpc_grpc_status_code="OK") == 1
    assert value(order, "rpc_server_requests_total", rpc_method="WatchOrder", rpc_type="server_stream") == 1
    assert value(order, "rpc_server_in_flight") == 0
    assert value(payment, "rpc_server_requests_total", rpc_method="AuthorizePayment") == 3
    # One CreateUser, and the order service's user check for each new order.
    assert value(user, "rpc_server_requests_total", rpc_method="CreateUser", rpc_grpc_status_code="OK") == 1
    assert value(user, "rpc_server_requests_total", rpc_method="GetUser", rpc_grpc_status_code="OK") == 3
    # The order service's settlement consumer holds one WatchPaymentEvents stream open.
    assert value(payment, "rpc_server_open_streams", rpc_method="WatchPaymentEvents") == 1
    assert value(order, "db_transaction_duration_seconds_count", outcome="commit") > 0
    for samples in (order, payment, user):
        assert value(samples, "health_serving") == 1
        assert "grpc.health.v1" not in json.dumps(samples.get("rpc_server_requests_total"))

    # No label anywhere (apps and proxies) carries an id.
    scrapes = [order, payment, user] + [
        scrape(f"{url}/stats/prometheus") for url in envoy_urls(state).values()
    ]
    for samples in scrapes:
        for name, series in samples.items():
            for labels, _ in series:
                for label, text in labels.items():
                    assert not ID.search(text), f"{name}{{{label}={text!r}}} carries an id"
                    assert not any(i in text for i in ids), f"{name}{{{label}={text!r}}} carries an id"


def test_every_proxy_serves_its_stats_and_nothing_else_of_its_admin(mesh: MeshProcess) -> None:
    state = mesh.state()
    for name, url in envoy_urls(state).items():
        samples = scrape(f"{url}/stats/prometheus")
        prefix = "edge" if name == "edge" else "inbound"
        assert value(samples, "envoy_http_downstream_rq_total", envoy_http_conn_manager_prefix=prefix) > 0, (
            name
        )
        assert value(samples, "envoy_server_live") == 1, name
        for path in ("/config_dump", "/quitquitquit", "/clusters", "/stats", "/runtime_modify"):
            assert get(f"{url}{path}")[0] == 404, f"{name}: {path} must not be reachable on the stats port"


def _expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    exprs = [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads((MONITORING / "dashboards" / "shop-mesh.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (recording rules, with a colon, excluded)."""
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)', " ", expr)
    return {
        name
        for name in re.findall(r"\b([a-zA-Z_][a-zA-Z0-9_:]*)\b(?!\s*\()", bare)
        if ":" not in name and name not in {"and", "or", "unless", "time"}
    }


def exported_names(url: str) -> set[str]:
    """Every series name as Prometheus would store it, also of families without a sample yet (a
    labelled counter nothing has incremented, e.g. db_transaction_errors_total on a healthy run).
    Read from the raw text: prometheus_client's parser renames Envoy's counters (adds _total)."""
    code, body = get(url)
    assert code == 200, url
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_{suffix}" for suffix in ("bucket", "count", "sum")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_dashboard_and_alerts_use_only_exported_metrics(mesh: MeshProcess) -> None:
    state = mesh.state()
    exported: set[str] = set()
    for inst in state["instances"]:
        exported |= exported_names(app_url(inst))
    for url in envoy_urls(state).values():
        exported |= exported_names(f"{url}/stats/prometheus")
    used = {name for expr in _expressions() for name in metric_names(expr)}
    assert {"rpc_server_requests_total", "shop_orders_completed_total"} <= used  # the parser finds names
    assert metric_names('sum by (x) (rate(a_total{b="c"}[5m])) / b_total') == {"a_total", "b_total"}
    assert sorted(used - exported) == []


def _load(mesh: MeshProcess, stop: threading.Event, errors: list[str]) -> None:
    """CreateOrder + GetUser in a loop until stopped: traffic for every service (bounded by the test)."""
    shop = Shop(mesh)
    user_id = shop.user()
    while not stop.is_set():
        try:
            shop.order(user_id, f"top-{uuid.uuid4()}")
            shop.users.GetUser(user_pb2.GetUserRequest(user_id=user_id), timeout=5, metadata=shop.md)
        except grpc.RpcError as exc:
            errors.append(str(exc.code()))


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_pty(argv: list[str], timeout: float) -> str:
    """Run argv on a pseudo-terminal (160x50) until it exits; everything it drew, ANSI removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "50"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return ANSI.sub("", out.decode(errors="replace"))


def test_mesh_top_shows_every_instance_busy_under_load(mesh: MeshProcess) -> None:
    stop, errors = threading.Event(), list[str]()
    loaders = [threading.Thread(target=_load, args=(mesh, stop, errors), daemon=True) for _ in range(2)]
    for t in loaders:
        t.start()
    try:
        time.sleep(1.0)  # the first frame compares two scrapes taken under load
        screen = run_in_pty(
            [
                sys.executable,
                "-m",
                "shop_mesh.mesh",
                "--run-dir",
                str(mesh.run.root),
                "top",
                "--iterations",
                "3",
            ],
            timeout=45,
        )
    finally:
        stop.set()
        for t in loaders:
            t.join(timeout=20)
    assert errors == []
    # The last frame: a row per instance with its RPS, success rate and latency.
    frame = screen[screen.rindex("shop-mesh top") :]
    for inst in [*(i["name"] for i in mesh.state()["instances"]), "edge"]:
        row = next((line for line in frame.splitlines() if f" {inst} " in line), None)
        assert row is not None, f"no row for {inst} in:\n{frame}"
        cells = [c.strip() for c in row.strip("│┃ ").split("│")]
        if inst == "edge":
            assert float(cells[6]) > 0, row  # the edge has only the mesh view
            continue
        rps, success, p50, p99 = float(cells[1]), cells[2], float(cells[3]), float(cells[4])
        assert rps > 0, row
        assert success.endswith("%") and float(success[:-1]) > 99, row
        assert 0 < p50 <= p99, row
        assert float(cells[6]) > 0, row  # the sidecar saw the calls too
    assert re.search(r"saga: orders/s paid [0-9.]+  rejected [0-9.]+  cancelled [0-9.]+", frame)
    # The load's orders wait 6 s for settlement (the fixture's delay): top shows them waiting.
    waiting = re.search(r"awaiting settlement ([0-9]+) \(oldest ([0-9.]+) s\)", frame)
    assert waiting is not None and int(waiting.group(1)) > 0, frame


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no prometheus binary (Debian package `prometheus`; .ci/run installs it)",
)
def test_mesh_run_prometheus_scrapes_every_app_and_proxy_and_loads_the_alerts(mesh: MeshProcess) -> None:
    state = mesh.state()
    assert state["prometheus"], "mesh run --prometheus printed no address"
    base = f"http://{state['prometheus']}/api/v1"
    expected = {(i["name"], job) for i in state["instances"] for job in ("shop-apps", "shop-envoy")}
    expected.add(("edge", "shop-envoy"))
    deadline = time.monotonic() + 45
    up: set[tuple[str, str]] = set()
    while time.monotonic() < deadline:
        targets = json.loads(get(f"{base}/targets")[1] or "{}").get("data", {}).get("activeTargets", [])
        up = {(t["labels"]["instance"], t["labels"]["job"]) for t in targets if t["health"] == "up"}
        if up >= expected:
            break
        time.sleep(1)
    assert up >= expected
    # The queries of the dashboard work on the scraped series: a per-service request rate exists.
    query = urllib.parse.quote('sum by (rpc_service) (rpc_server_requests_total{rpc_type="unary"})')
    result = json.loads(get(f"{base}/query?query={query}")[1])["data"]["result"]
    assert {r["metric"]["rpc_service"] for r in result} >= {"shop.order.v1.OrderService"}
    groups = json.loads(get(f"{base}/rules")[1])["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 15 and all(r["health"] in ("ok", "unknown") for r in rules), rules
