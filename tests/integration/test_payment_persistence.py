"""Idempotency under concurrency and multi-replica settlement, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from shop.payment.v1 import payment_pb2

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.idempotency_sql import IdempotencyStore
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.payment.domain import (
    AuthorizeCommand,
    PaymentProcessor,
    capture,
    decide_authorization,
)
from shop_mesh.services.payment.repository import (
    PaymentRepository,
    PaymentUnitsOnDatabase,
    idempotency_keys,
    metadata,
    payment_events,
    payments,
)
from tests.integration.payment_harness import (
    TIMEOUT,
    PaymentCluster,
    RunningPayment,
    authorize,
    authorize_request,
    money,
    payment_cluster,
    read_events,
)
from tests.support import error_details

N = 10


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[PaymentCluster]:
    async with payment_cluster(tmp_path) as running:
        yield running


@pytest.fixture
async def service(cluster: PaymentCluster, database_url_factory: Callable[[str], str]) -> RunningPayment:
    # A long delay keeps captured payments CAPTURED while these tests look at them.
    return await cluster.start(database_url_factory("payment"), settlement_delay_seconds=3600)


async def _outcomes(calls: list[object]) -> list[object]:
    return list(await asyncio.gather(*calls, return_exceptions=True))  # type: ignore[call-overload]


async def test_concurrent_duplicate_authorize_has_one_effect(service: RunningPayment) -> None:
    request = authorize_request()
    replies = await asyncio.gather(
        *(service.stub.AuthorizePayment(request, timeout=TIMEOUT) for _ in range(N))
    )
    assert len({reply.payment.payment_id for reply in replies}) == 1
    assert all(reply.payment == replies[0].payment for reply in replies)
    assert await service.count(payments) == 1
    assert await service.count(payment_events, event_type="AUTHORIZED") == 1
    assert await service.count(idempotency_keys) == 1


async def test_concurrent_duplicate_capture_has_one_effect(service: RunningPayment) -> None:
    payment = await authorize(service.stub)
    request = payment_pb2.CapturePaymentRequest(request_id="order-1:capture", payment_id=payment.payment_id)
    replies = await asyncio.gather(*(service.stub.CapturePayment(request, timeout=TIMEOUT) for _ in range(N)))
    assert {reply.payment.state for reply in replies} == {payment_pb2.PAYMENT_STATE_CAPTURED}
    assert await service.count(payment_events, event_type="CAPTURED") == 1


async def test_concurrent_captures_with_distinct_ids_capture_once(service: RunningPayment) -> None:
    payment = await authorize(service.stub)
    outcomes = await _outcomes(
        [
            service.stub.CapturePayment(
                payment_pb2.CapturePaymentRequest(request_id=f"cap-{i}", payment_id=payment.payment_id),
                timeout=TIMEOUT,
            )
            for i in range(N)
        ]
    )
    succeeded = [o for o in outcomes if isinstance(o, payment_pb2.CapturePaymentResponse)]
    failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(succeeded) == 1
    assert len(failed) == N - 1
    assert {(e.code(), error_details(e)[0]) for e in failed} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_CAPTURED")
    }
    assert await service.count(payment_events, event_type="CAPTURED") == 1


async def test_concurrent_partial_refunds_never_exceed_captured(service: RunningPayment) -> None:
    payment = await authorize(service.stub, amount=money(100))
    await service.stub.CapturePayment(
        payment_pb2.CapturePaymentRequest(request_id="c", payment_id=payment.payment_id), timeout=TIMEOUT
    )
    outcomes = await _outcomes(
        [
            service.stub.RefundPayment(
                payment_pb2.RefundPaymentRequest(
                    request_id=f"refund-{i}", payment_id=payment.payment_id, amount=money(30)
                ),
                timeout=TIMEOUT,
            )
            for i in range(5)
        ]
    )
    succeeded = [o for o in outcomes if isinstance(o, payment_pb2.RefundPaymentResponse)]
    failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(succeeded) == 3
    assert {error_details(e)[0] for e in failed} == {"REFUND_EXCEEDS_CAPTURED"}
    final = await service.stub.GetPayment(
        payment_pb2.GetPaymentRequest(payment_id=payment.payment_id), timeout=TIMEOUT
    )
    assert final.payment.refunded_amount.units == 90
    assert final.payment.state == payment_pb2.PAYMENT_STATE_PARTIALLY_REFUNDED
    assert await service.count(payment_events, event_type="REFUNDED") == 3


async def test_reused_request_id_with_other_payload_is_rejected(service: RunningPayment) -> None:
    first = authorize_request(request_id="same-id", amount=money(10))
    await service.stub.AuthorizePayment(first, timeout=TIMEOUT)
    changed = authorize_request(request_id="same-id", order_id=first.order_id, amount=money(11))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.AuthorizePayment(changed, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(caught.value)[0] == "REQUEST_ID_REUSED"
    assert await service.count(payments) == 1

    await service.stub.CapturePayment(
        payment_pb2.CapturePaymentRequest(
            request_id="c1", payment_id=(await authorize(service.stub)).payment_id
        ),
        timeout=TIMEOUT,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.CapturePayment(
            payment_pb2.CapturePaymentRequest(request_id="c1", payment_id=new_id("pay")), timeout=TIMEOUT
        )
    assert error_details(caught.value)[0] == "REQUEST_ID_REUSED"


async def test_repeat_returns_first_result_without_second_effect(service: RunningPayment) -> None:
    payment = await authorize(service.stub, amount=money(50))
    await service.stub.CapturePayment(
        payment_pb2.CapturePaymentRequest(request_id="c", payment_id=payment.payment_id), timeout=TIMEOUT
    )
    refund = payment_pb2.RefundPaymentRequest(
        request_id="r", payment_id=payment.payment_id, amount=money(20), reason="damaged"
    )
    first = await service.stub.RefundPayment(refund, timeout=TIMEOUT)
    await service.stub.RefundPayment(
        payment_pb2.RefundPaymentRequest(request_id="r2", payment_id=payment.payment_id), timeout=TIMEOUT
    )
    repeat = await service.stub.RefundPayment(refund, timeout=TIMEOUT)
    assert repeat.payment == first.payment
    assert repeat.payment.state == payment_pb2.PAYMENT_STATE_PARTIALLY_REFUNDED
    assert await service.count(payment_events, event_type="REFUNDED") == 2


async def test_replicas_settle_each_payment_once(
    cluster: PaymentCluster, database_url_factory: Callable[[str], str]
) -> None:
    url = database_url_factory("payment")
    replica_a = await cluster.start(url)
    replica_b = await cluster.start(url)
    watch = replica_b.stub.WatchPaymentEvents(payment_pb2.WatchPaymentEventsRequest())
    try:
        ids = [(await authorize(replica_a.stub)).payment_id for _ in range(N)]
        stubs = [replica_a.stub, replica_b.stub]
        await asyncio.gather(
            *(
                stubs[i % 2].CapturePayment(
                    payment_pb2.CapturePaymentRequest(request_id=f"{pid}:capture", payment_id=pid),
                    timeout=TIMEOUT,
                )
                for i, pid in enumerate(ids)
            )
        )
        events = await read_events(watch, 3 * N)
    finally:
        watch.cancel()
    settled = [e.payment_id for e in events if e.type == payment_pb2.PAYMENT_EVENT_TYPE_SETTLED]
    assert sorted(settled) == sorted(ids)
    assert await replica_a.count(payment_events, event_type="SETTLED") == N
    assert await replica_a.count(payments, state="SETTLED") == N


async def test_concurrent_settlement_claims_each_row_once(database_url_factory: Callable[[str], str]) -> None:
    url = database_url_factory("payment")
    dbs = [Database(url, metadata) for _ in range(3)]
    try:
        await dbs[0].create_schema()
        now = datetime.now(UTC)

        def seed(session: Session) -> None:
            repo = PaymentRepository(session)
            repo.ensure_sequence()
            for _ in range(20):
                order_id = new_id("ord")
                command = AuthorizeCommand(f"{order_id}:a", order_id, Money.of("EUR", 5), "tok")
                authorized, _ = decide_authorization(command, 10_000, now, new_id("pay"))
                repo.add(capture(authorized, now))

        await dbs[0].write(seed)
        processors = [
            PaymentProcessor(
                PaymentUnitsOnDatabase(db),
                IdempotencyStore(idempotency_keys),
                decline_limit_units=10_000,
                settlement_delay=0,
                settlement_poll_interval=1,
                event_poll_interval=0.05,
            )
            for db in dbs
        ]
        settled = await asyncio.wait_for(asyncio.gather(*(p.settle_due() for p in processors)), TIMEOUT)
        assert sum(settled) == 20
        events = await dbs[0].read(lambda session: PaymentRepository(session).events_after(0, None, 100))
        assert len(events) == 20
        assert len({e.payment_id for e in events}) == 20
        assert [e.sequence for e in events] == list(range(1, 21))
    finally:
        for db in dbs:
            await db.dispose()


async def test_settlement_survives_restart(
    cluster: PaymentCluster, database_url_factory: Callable[[str], str]
) -> None:
    url = database_url_factory("payment")
    first = await cluster.start(url, settlement_delay_seconds=3600)
    payment = await authorize(first.stub)
    await first.stub.CapturePayment(
        payment_pb2.CapturePaymentRequest(request_id="c", payment_id=payment.payment_id), timeout=TIMEOUT
    )
    await first.stop()

    second = await cluster.start(url, settlement_delay_seconds=0)
    watch = second.stub.WatchPaymentEvents(payment_pb2.WatchPaymentEventsRequest(after_sequence=2))
    try:
        (event,) = await read_events(watch, 1)
    finally:
        watch.cancel()
    assert event.type == payment_pb2.PAYMENT_EVENT_TYPE_SETTLED
    assert event.payment.state == payment_pb2.PAYMENT_STATE_SETTLED
    assert event.payment_id == payment.payment_id


async def test_settlement_waits_for_the_delay(cluster: PaymentCluster, tmp_path: Path) -> None:
    service = await cluster.start(f"sqlite:///{tmp_path / 'delay.db'}", settlement_delay_seconds=1.0)
    payment = await authorize(service.stub)
    watch = service.stub.WatchPaymentEvents(payment_pb2.WatchPaymentEventsRequest())
    try:
        captured = (
            await service.stub.CapturePayment(
                payment_pb2.CapturePaymentRequest(request_id="c", payment_id=payment.payment_id),
                timeout=TIMEOUT,
            )
        ).payment
        events = await read_events(watch, 3)
    finally:
        watch.cancel()
    assert [e.type for e in events] == [
        payment_pb2.PAYMENT_EVENT_TYPE_AUTHORIZED,
        payment_pb2.PAYMENT_EVENT_TYPE_CAPTURED,
        payment_pb2.PAYMENT_EVENT_TYPE_SETTLED,
    ]
    waited = events[2].create_time.ToDatetime() - captured.update_time.ToDatetime()
    assert waited.total_seconds() >= 1.0


async def test_capture_wakes_settlement_without_waiting_for_the_poll(
    cluster: PaymentCluster, tmp_path: Path
) -> None:
    service = await cluster.start(f"sqlite:///{tmp_path / 'wake.db'}", settlement_poll_interval_seconds=3600)
    payment = await authorize(service.stub)
    watch = service.stub.WatchPaymentEvents(payment_pb2.WatchPaymentEventsRequest(after_sequence=1))
    try:
        await service.stub.CapturePayment(
            payment_pb2.CapturePaymentRequest(request_id="c", payment_id=payment.payment_id), timeout=TIMEOUT
        )
        events = await read_events(watch, 2)
    finally:
        watch.cancel()
    assert [e.type for e in events] == [
        payment_pb2.PAYMENT_EVENT_TYPE_CAPTURED,
        payment_pb2.PAYMENT_EVENT_TYPE_SETTLED,
    ]
