"""The two pictures in docs/observability.md, from a real run: `mesh top` under load, and the Grafana
dashboard's panels (their own PromQL, asked of the real Prometheus of `mesh run --prometheus`, drawn
with matplotlib).

    python -m shop_mesh.mesh run --prometheus &      # then, once it is up:
    python scripts/metrics_screenshots.py --seconds 120 --out docs/observability
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.mesh.local import RunDir, read_state
from shop_mesh.mesh.top import compute, render, scrape_all, targets
from shop_mesh.services.common.ids import new_id

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "k8s" / "components" / "monitoring" / "dashboards" / "shop-mesh.json"
PANELS = [
    "Requests per second",
    "Success rate",
    "Latency p50 / p99",
    "Orders per second by outcome",
    "Waiting for settlement",
    "Settlement lag p50 / p99",
    "Compensations, reconciler, stuck sagas",
    "Sidecar inbound and edge requests per second",
    "Database write transactions p99",
]


def load(edge: str, stop: threading.Event, n: int) -> None:
    """A shop's day: paid orders, declined ones (tok_decline), cancellations, reads, a missing order."""
    channel = grpc.insecure_channel(edge)
    users, orders = user_pb2_grpc.UserServiceStub(channel), order_pb2_grpc.OrderServiceStub(channel)
    user_id = users.CreateUser(
        user_pb2.CreateUserRequest(
            request_id=f"u-{uuid.uuid4()}", email=f"{uuid.uuid4().hex[:10]}@example.com", display_name="S"
        ),
        timeout=10,
    ).user.user_id
    i = 0
    while not stop.is_set():
        i += 1
        token = "tok_decline" if i % 7 == 0 else "tok_visa"
        item = order_pb2.LineItem(
            sku="book", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=9)
        )
        try:
            order = orders.CreateOrder(
                order_pb2.CreateOrderRequest(
                    request_id=f"s-{uuid.uuid4()}",
                    user_id=user_id,
                    line_items=[item],
                    payment_method_token=token,
                ),
                timeout=10,
            ).order
            if i % 5 == 0 and order.state != order_pb2.ORDER_STATE_REJECTED:
                orders.CancelOrder(
                    order_pb2.CancelOrderRequest(request_id=f"c-{uuid.uuid4()}", order_id=order.order_id),
                    timeout=10,
                )
            users.GetUser(user_pb2.GetUserRequest(user_id=user_id), timeout=5)
            if i % 11 == 0:
                orders.GetOrder(order_pb2.GetOrderRequest(order_id=new_id("ord")), timeout=5)
        except grpc.RpcError:
            pass  # NOT_FOUND on purpose; anything else shows in the success-rate panel
        time.sleep(0.02 * n)
    channel.close()


def top_png(run: RunDir, out: Path) -> None:
    state = read_state(run)
    assert state is not None
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ts = targets(state)
        older = scrape_all(ts, pool)  # Envoy's p99 over 10 s (mesh top keeps the same window)
        time.sleep(8.0)
        before, t0 = scrape_all(ts, pool), time.monotonic()
        time.sleep(2.0)
        after, t1 = scrape_all(ts, pool), time.monotonic()
    rows, saga = compute(ts, before, after, t1 - t0, older=older)
    console = Console(record=True, width=132, file=io.StringIO())
    console.print(render(rows, saga, run))
    text = console.export_text()
    lines = text.rstrip().splitlines()
    fig = plt.figure(figsize=(13, 0.22 * len(lines) + 0.4))
    fig.patch.set_facecolor("#1e1e1e")
    fig.text(0.01, 0.98, "\n".join(lines), family="DejaVu Sans Mono", fontsize=9, color="#e6e6e6", va="top")
    fig.savefig(out, dpi=110)
    plt.close(fig)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode(
        {"query": expr.replace("$__rate_interval", "30s"), "start": start, "end": end, "step": step}
    )
    with urllib.request.urlopen(f"http://{prometheus}/api/v1/query_range?{params}", timeout=20) as resp:
        result: list[dict[str, Any]] = json.load(resp)["data"]["result"]
    return result


def legend(fmt: str, labels: dict[str, str]) -> str:
    for key, val in labels.items():
        fmt = fmt.replace("{{" + key + "}}", val)
    return fmt.replace("shop.", "").replace(".v1.", ".")


def dashboard_png(prometheus: str, start: float, end: float, out: Path) -> None:
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "timeseries"}
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    for ax, title in zip(axes.flat, PANELS, strict=True):
        panel = panels[title]
        for target in panel["targets"]:
            for series in query_range(prometheus, target["expr"], start, end, 5):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]))
        unit = panel["fieldConfig"]["defaults"]["unit"]
        ax.set_title(f"{title}  [{unit}]", fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("shop-mesh dashboard panels (k8s/components/monitoring), from a local run's Prometheus")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", default=".run")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--out", default="docs/observability")
    args = p.parse_args()
    run = RunDir(Path(args.run_dir).resolve())
    state = read_state(run)
    if not state or not state.get("prometheus"):
        raise SystemExit("start the mesh with `python -m shop_mesh.mesh run --prometheus` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    workers = [threading.Thread(target=load, args=(state["edge"], stop, 2), daemon=True) for _ in range(2)]
    start = time.time()
    for w in workers:
        w.start()
    try:
        time.sleep(max(args.seconds - 15, 5))
        top_png(run, out / "mesh-top.png")
        time.sleep(5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    time.sleep(6)  # one more scrape
    dashboard_png(state["prometheus"], start, time.time(), out / "dashboard.png")
    print(f"wrote {out / 'mesh-top.png'} and {out / 'dashboard.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
