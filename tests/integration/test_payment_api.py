"""PaymentService over gRPC: what a client sees for good calls, bad input, conflicts and paging."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from shop.common.v1 import money_pb2
from shop.payment.v1 import payment_pb2

from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.payment.domain import AuthorizeCommand, decide_authorization
from shop_mesh.services.payment.repository import (
    PaymentRepository,
    idempotency_keys,
    payment_events,
    payments,
)
from tests.integration.payment_harness import (
    TIMEOUT,
    PaymentCluster,
    RunningPayment,
    authorize,
    authorize_request,
    capture,
    money,
    payment_cluster,
)
from tests.support import error_details


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[PaymentCluster]:
    async with payment_cluster(tmp_path) as running:
        yield running


@pytest.fixture
async def service(cluster: PaymentCluster, database_url_factory: Callable[[str], str]) -> RunningPayment:
    return await cluster.start(database_url_factory("payment"))


async def _error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_authorize_capture_get_round_trip(service: RunningPayment) -> None:
    order_id = new_id("ord")
    authorized = await authorize(service.stub, order_id=order_id, amount=money(12, "USD", 340_000_000))
    assert authorized.state == payment_pb2.PAYMENT_STATE_AUTHORIZED
    assert authorized.payment_id.startswith("pay_")
    assert (authorized.amount.currency_code, authorized.amount.units, authorized.amount.nanos) == (
        "USD",
        12,
        340_000_000,
    )
    assert authorized.decline_reason == ""
    assert authorized.create_time.seconds > 0

    captured = await capture(service.stub, authorized.payment_id)
    assert captured.state == payment_pb2.PAYMENT_STATE_CAPTURED
    assert captured.captured_amount == authorized.amount

    got = await service.stub.GetPayment(
        payment_pb2.GetPaymentRequest(payment_id=authorized.payment_id), timeout=TIMEOUT
    )
    assert got.payment.order_id == order_id
    assert got.payment.state in (payment_pb2.PAYMENT_STATE_CAPTURED, payment_pb2.PAYMENT_STATE_SETTLED)
    assert await service.count(payments) == 1


@pytest.mark.parametrize(
    ("token", "amount", "reason"),
    [
        ("tok_decline", money(10), "CARD_DECLINED"),
        ("tok_visa", money(10_000, "JPY", 1), "AMOUNT_LIMIT_EXCEEDED"),
    ],
)
async def test_declines_are_results_not_errors(
    service: RunningPayment, token: str, amount: object, reason: str
) -> None:
    declined = await authorize(service.stub, token=token, amount=amount)
    assert declined.state == payment_pb2.PAYMENT_STATE_DECLINED
    assert declined.decline_reason == reason
    assert await service.count(payment_events, event_type="DECLINED") == 1
    err = await _error(
        service.stub.CapturePayment(
            payment_pb2.CapturePaymentRequest(request_id="c-1", payment_id=declined.payment_id)
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(err)[0] == "PAYMENT_NOT_AUTHORIZED"


async def test_amount_at_the_limit_is_authorized(service: RunningPayment) -> None:
    payment = await authorize(service.stub, amount=money(10_000, "GBP"))
    assert payment.state == payment_pb2.PAYMENT_STATE_AUTHORIZED


# Fixed ids keep test ids identical across xdist workers.
FIXED_ORD = "ord_01JC" + "0" * 22
FIXED_PAY = "pay_01JC" + "0" * 22


def _authorize(**changes: object) -> payment_pb2.AuthorizePaymentRequest:
    request = authorize_request(request_id="req-1", order_id=FIXED_ORD)
    for name, value in changes.items():
        if name == "amount" and value is None:
            request.ClearField("amount")
        elif name == "amount":
            request.amount.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    return request


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_authorize(request_id=""), "request_id"),
        (_authorize(request_id="has space"), "request_id"),
        (_authorize(request_id="x" * 129), "request_id"),
        (_authorize(order_id=""), "order_id"),
        (_authorize(order_id="ord_123"), "order_id"),
        (_authorize(order_id="usr_01JC" + "0" * 22), "order_id"),
        (_authorize(amount=None), "amount"),
        (_authorize(amount=money(0)), "amount"),
        (_authorize(amount=money(-5)), "amount"),
        (_authorize(amount=money(1, "")), "amount.currency_code"),
        (_authorize(amount=money(1, "XXX")), "amount.currency_code"),
        (_authorize(amount=money(1, "eur")), "amount.currency_code"),
        (_authorize(amount=money(1, "EUR", 1_000_000_000)), "amount.nanos"),
        (_authorize(amount=money(1, "EUR", -1)), "amount.nanos"),
        (_authorize(amount=money(1_000_000_001)), "amount.units"),
        (_authorize(payment_method_token=""), "payment_method_token"),
        (_authorize(payment_method_token="   "), "payment_method_token"),
        (_authorize(payment_method_token="t" * 129), "payment_method_token"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_invalid_authorize_is_rejected_and_writes_nothing(
    service: RunningPayment, request_: payment_pb2.AuthorizePaymentRequest, field: str
) -> None:
    err = await _error(service.stub.AuthorizePayment(request_, timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, fields = error_details(err)
    assert field in fields, fields
    assert await service.count(payments) == 0
    assert await service.count(payment_events) == 0
    assert await service.count(idempotency_keys) == 0


async def test_all_bad_fields_are_reported_at_once(service: RunningPayment) -> None:
    request = payment_pb2.AuthorizePaymentRequest()
    err = await _error(service.stub.AuthorizePayment(request, timeout=TIMEOUT))
    assert set(error_details(err)[1]) == {"request_id", "order_id", "amount", "payment_method_token"}


@pytest.mark.parametrize(
    ("request_id", "payment_id", "field"),
    [("", FIXED_PAY, "request_id"), ("r-1", "", "payment_id"), ("r-1", FIXED_ORD, "payment_id")],
    ids=["no-request-id", "no-payment-id", "wrong-prefix"],
)
async def test_invalid_capture_void_refund_get(
    service: RunningPayment, request_id: str, payment_id: str, field: str
) -> None:
    stub = service.stub
    calls = [
        stub.CapturePayment(payment_pb2.CapturePaymentRequest(request_id=request_id, payment_id=payment_id)),
        stub.VoidPayment(payment_pb2.VoidPaymentRequest(request_id=request_id, payment_id=payment_id)),
        stub.RefundPayment(payment_pb2.RefundPaymentRequest(request_id=request_id, payment_id=payment_id)),
    ]
    if field == "payment_id":
        calls.append(stub.GetPayment(payment_pb2.GetPaymentRequest(payment_id=payment_id)))
    for call in calls:
        err = await _error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error_details(err)[1]
    assert await service.count(idempotency_keys) == 0


async def test_unknown_payment_is_not_found(service: RunningPayment) -> None:
    missing = new_id("pay")
    stub = service.stub
    for call in [
        stub.GetPayment(payment_pb2.GetPaymentRequest(payment_id=missing)),
        stub.CapturePayment(payment_pb2.CapturePaymentRequest(request_id="r-1", payment_id=missing)),
        stub.VoidPayment(payment_pb2.VoidPaymentRequest(request_id="r-2", payment_id=missing)),
        stub.RefundPayment(payment_pb2.RefundPaymentRequest(request_id="r-3", payment_id=missing)),
    ]:
        err = await _error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(err)[0] == "PAYMENT_NOT_FOUND"
    # A failed request leaves no idempotency key behind: a retry after the payment exists may succeed.
    assert await service.count(idempotency_keys) == 0


async def test_state_conflicts_are_failed_precondition(service: RunningPayment) -> None:
    stub = service.stub

    async def reason_of(call: object) -> str | None:
        err = await _error(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        return error_details(err)[0]

    authorized = await authorize(stub)
    pid = authorized.payment_id
    assert (
        await reason_of(
            stub.RefundPayment(payment_pb2.RefundPaymentRequest(request_id="f-1", payment_id=pid))
        )
        == "PAYMENT_NOT_CAPTURED"
    )
    await capture(stub, pid)
    assert (
        await reason_of(
            stub.CapturePayment(payment_pb2.CapturePaymentRequest(request_id="f-2", payment_id=pid))
        )
        == "ALREADY_CAPTURED"
    )
    assert (
        await reason_of(stub.VoidPayment(payment_pb2.VoidPaymentRequest(request_id="f-3", payment_id=pid)))
        == "PAYMENT_NOT_AUTHORIZED"
    )

    other = await authorize(stub)
    voided = await stub.VoidPayment(
        payment_pb2.VoidPaymentRequest(request_id="v-1", payment_id=other.payment_id), timeout=TIMEOUT
    )
    assert voided.payment.state == payment_pb2.PAYMENT_STATE_VOIDED
    assert (
        await reason_of(
            stub.VoidPayment(payment_pb2.VoidPaymentRequest(request_id="v-2", payment_id=other.payment_id))
        )
        == "ALREADY_VOIDED"
    )
    assert (
        await reason_of(
            stub.CapturePayment(
                payment_pb2.CapturePaymentRequest(request_id="v-3", payment_id=other.payment_id)
            )
        )
        == "PAYMENT_NOT_AUTHORIZED"
    )


async def test_refunds_partial_then_rest(service: RunningPayment) -> None:
    stub = service.stub
    payment = await authorize(stub, amount=money(100, "EUR"))
    await capture(stub, payment.payment_id)

    def refund(
        request_id: str, amount: money_pb2.Money | None = None
    ) -> Awaitable[payment_pb2.RefundPaymentResponse]:
        request = payment_pb2.RefundPaymentRequest(
            request_id=request_id, payment_id=payment.payment_id, reason="customer asked"
        )
        if amount is not None:
            request.amount.CopyFrom(amount)
        return stub.RefundPayment(request, timeout=TIMEOUT)

    err = await _error(refund("x-1", money(5, "USD")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount.currency_code" in error_details(err)[1]
    err = await _error(refund("x-2", money(100, "EUR", 1)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(err)[0] == "REFUND_EXCEEDS_CAPTURED"
    err = await _error(refund("x-3", money(0, "EUR")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    partial = (await refund("r-1", money(30, "EUR", 250_000_000))).payment
    assert partial.state == payment_pb2.PAYMENT_STATE_PARTIALLY_REFUNDED
    assert (partial.refunded_amount.units, partial.refunded_amount.nanos) == (30, 250_000_000)
    rest = (await refund("r-2")).payment
    assert rest.state == payment_pb2.PAYMENT_STATE_REFUNDED
    assert (rest.refunded_amount.units, rest.refunded_amount.nanos) == (100, 0)
    err = await _error(refund("r-3"))
    assert error_details(err)[0] == "ALREADY_REFUNDED"
    assert await service.count(payment_events, event_type="REFUNDED") == 2


async def test_list_pages_by_id_with_order_filter(service: RunningPayment) -> None:
    stub = service.stub
    order_a, order_b = new_id("ord"), new_id("ord")
    created_a = [(await authorize(stub, order_id=order_a, request_id=f"a-{i}")).payment_id for i in range(5)]
    created_b = [(await authorize(stub, order_id=order_b)).payment_id]

    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListPayments(
            payment_pb2.ListPaymentsRequest(page_size=2, page_token=token, order_id=order_a), timeout=TIMEOUT
        )
        assert len(page.payments) <= 2
        seen += [p.payment_id for p in page.payments]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(created_a)

    everything = await stub.ListPayments(payment_pb2.ListPaymentsRequest(), timeout=TIMEOUT)
    assert [p.payment_id for p in everything.payments] == sorted(created_a + created_b)
    assert everything.next_page_token == ""

    first = await stub.ListPayments(
        payment_pb2.ListPaymentsRequest(page_size=1, order_id=order_a), timeout=TIMEOUT
    )
    err = await _error(
        stub.ListPayments(payment_pb2.ListPaymentsRequest(page_token=first.next_page_token, order_id=order_b))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in error_details(err)[1]

    for request, field in [
        (payment_pb2.ListPaymentsRequest(page_size=-1), "page_size"),
        (payment_pb2.ListPaymentsRequest(page_token="garbage!"), "page_token"),
        (payment_pb2.ListPaymentsRequest(order_id="nope"), "order_id"),
    ]:
        err = await _error(stub.ListPayments(request, timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error_details(err)[1]


async def test_list_page_size_default_and_cap(cluster: PaymentCluster, tmp_path: Path) -> None:
    service = await cluster.start(f"sqlite:///{tmp_path / 'cap.db'}")
    now = datetime.now(UTC)

    def seed(session: Session) -> None:
        repo = PaymentRepository(session)
        for _ in range(501):
            order_id = new_id("ord")
            command = AuthorizeCommand(f"{order_id}:a", order_id, Money.of("EUR", 1), "tok")
            repo.add(decide_authorization(command, 10_000, now, new_id("pay"))[0])

    await service.host.parts.database.write(seed)
    default = await service.stub.ListPayments(payment_pb2.ListPaymentsRequest(), timeout=TIMEOUT)
    assert len(default.payments) == 50
    capped = await service.stub.ListPayments(
        payment_pb2.ListPaymentsRequest(page_size=100_000), timeout=TIMEOUT
    )
    assert len(capped.payments) == 500
    last = await service.stub.ListPayments(
        payment_pb2.ListPaymentsRequest(page_size=500, page_token=capped.next_page_token), timeout=TIMEOUT
    )
    assert len(last.payments) == 1
    assert last.next_page_token == ""
