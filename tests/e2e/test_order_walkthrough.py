"""The README walk-through with the real grpcurl against the three real service processes:
CreateUser -> CreateOrder -> WatchOrder (until PAID, the stream ends by itself) -> CancelOrder
(refund) -> GetOrder shows CANCELLED; plus `grpcurl list` on each service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.e2e.order_processes import SERVICES, Processes, three_services
from tests.support import run_grpcurl


def grpcurl(address: str, *args: str, data: dict[str, Any] | None = None, timeout: float = 30) -> str:
    result = run_grpcurl(address, *args, data=data, max_time=int(timeout))
    assert result.returncode == 0, f"grpcurl {args} failed: {result.stderr}"
    return result.stdout


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON document per streamed message."""
    decoder, items, position = json.JSONDecoder(), [], 0
    while position < len(text.strip()):
        while text[position].isspace():
            position += 1
        item, position = decoder.raw_decode(text, position)
        items.append(item)
    return items


def _walkthrough(p: Processes) -> None:
    for process in (p.user, p.payment, p.order):
        assert SERVICES[process.name] in grpcurl(process.address, "list").split()

    user = json.loads(
        grpcurl(
            p.user.address,
            "shop.user.v1.UserService/CreateUser",
            data={"request_id": "walk-user-1", "email": "ada@example.com", "display_name": "Ada"},
        )
    )["user"]
    order = json.loads(
        grpcurl(
            p.order.address,
            "shop.order.v1.OrderService/CreateOrder",
            data={
                "request_id": "walk-order-1",
                "user_id": user["user_id"],
                "line_items": [
                    {"sku": "BOOK-1", "quantity": 2, "unit_price": {"currency_code": "EUR", "units": 12}}
                ],
                "payment_method_token": "tok_visa",
            },
        )
    )["order"]
    assert order["state"] in ("ORDER_STATE_AWAITING_SETTLEMENT", "ORDER_STATE_PAID")
    assert order["total"] == {"currency_code": "EUR", "units": "24"}

    events = json_stream(
        grpcurl(
            p.order.address, "shop.order.v1.OrderService/WatchOrder", data={"order_id": order["order_id"]}
        )
    )
    assert [e["event"]["state"] for e in events] == [
        "ORDER_STATE_PENDING",
        "ORDER_STATE_PAYMENT_AUTHORIZED",
        "ORDER_STATE_AWAITING_SETTLEMENT",
        "ORDER_STATE_PAID",
    ]

    cancelled = json.loads(
        grpcurl(
            p.order.address,
            "shop.order.v1.OrderService/CancelOrder",
            data={"request_id": "walk-cancel-1", "order_id": order["order_id"], "reason": "changed my mind"},
        )
    )["order"]
    assert cancelled["state"] == "ORDER_STATE_CANCELLED"
    payment = json.loads(
        grpcurl(
            p.payment.address,
            "shop.payment.v1.PaymentService/GetPayment",
            data={"payment_id": order["payment_id"]},
        )
    )["payment"]
    assert payment["state"] == "PAYMENT_STATE_REFUNDED"
    got = json.loads(
        grpcurl(p.order.address, "shop.order.v1.OrderService/GetOrder", data={"order_id": order["order_id"]})
    )["order"]
    assert (got["state"], got["reason"]) == ("ORDER_STATE_CANCELLED", "changed my mind")


def test_readme_walkthrough_with_grpcurl(tmp_path: Path) -> None:
    with three_services(tmp_path, payment_env={"SETTLEMENT_DELAY_SECONDS": "0.5"}) as processes:
        try:
            _walkthrough(processes)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{processes.logs()}") from exc
