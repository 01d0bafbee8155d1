"""A developer's view: `python -m shop_mesh.services.payment` as a real process, driven with grpcurl."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shop_mesh.services.common.ids import new_id
from tests.support import ServiceProcess, free_port, run_grpcurl, wait_serving

SERVICE = "shop.payment.v1.PaymentService"


@pytest.fixture
def payment_process(tmp_path: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        "payment",
        {
            "PORT": str(free_port()),
            "DATA_DIR": str(tmp_path),
            "PAYMENT_DATABASE_URL": f"sqlite:///{tmp_path / 'payment.db'}",
            "SETTLEMENT_DELAY_SECONDS": "0",
            "GRACE_PERIOD_SECONDS": "1",
        },
        tmp_path / "payment.log",
    )
    try:
        asyncio.run(wait_serving(process.address, SERVICE, timeout=30))
        yield process
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, process.logs()
    finally:
        process.kill()


def grpcurl(
    address: str,
    *args: str,
    data: dict[str, Any] | None = None,
    max_time: float = 30,
    check: bool = True,
) -> str:
    result = run_grpcurl(address, *args, data=data, max_time=max_time)
    if check:
        assert result.returncode == 0, result.stderr
    return result.stdout


def json_messages(output: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty JSON object per streamed message, back to back."""
    decoder = json.JSONDecoder()
    messages, index = [], 0
    while index < len(output):
        if output[index].isspace():
            index += 1
            continue
        message, index = decoder.raw_decode(output, index)
        messages.append(message)
    return messages


def test_grpcurl_lists_describes_and_drives_a_payment(payment_process: ServiceProcess) -> None:
    address = payment_process.address
    services = grpcurl(address, "list").split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    description = grpcurl(address, "describe", SERVICE)
    for rpc in ("AuthorizePayment", "CapturePayment", "VoidPayment", "RefundPayment", "WatchPaymentEvents"):
        assert f"rpc {rpc}" in description

    order_id = new_id("ord")
    authorized = json.loads(
        grpcurl(
            address,
            f"{SERVICE}/AuthorizePayment",
            data={
                "requestId": f"{order_id}:authorize",
                "orderId": order_id,
                "amount": {"currencyCode": "EUR", "units": "42", "nanos": 500000000},
                "paymentMethodToken": "tok_visa",
            },
        )
    )["payment"]
    assert authorized["state"] == "PAYMENT_STATE_AUTHORIZED"
    payment_id = authorized["payment_id"]

    captured = json.loads(
        grpcurl(
            address,
            f"{SERVICE}/CapturePayment",
            data={"requestId": f"{order_id}:capture", "paymentId": payment_id},
        )
    )["payment"]
    assert captured["state"] == "PAYMENT_STATE_CAPTURED"

    # The stream never ends on its own: -max-time bounds it, so grpcurl exits non-zero by design.
    output = grpcurl(
        address,
        f"{SERVICE}/WatchPaymentEvents",
        max_time=3,
        data={"afterSequence": "0", "orderId": order_id},
        check=False,
    )
    events = [message["event"] for message in json_messages(output)]
    assert [event["type"] for event in events] == [
        "PAYMENT_EVENT_TYPE_AUTHORIZED",
        "PAYMENT_EVENT_TYPE_CAPTURED",
        "PAYMENT_EVENT_TYPE_SETTLED",
    ]
    assert [event["sequence"] for event in events] == ["1", "2", "3"]
    assert {event["payment_id"] for event in events} == {payment_id}
    assert events[-1]["payment"]["state"] == "PAYMENT_STATE_SETTLED"
