"""WatchPaymentEvents: order, filters, replicas on one database, resume, restart and shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from shop.payment.v1 import payment_pb2

from shop_mesh.services.common.errors import StreamShutdown
from shop_mesh.services.common.ids import new_id
from tests.integration.payment_harness import (
    TIMEOUT,
    PaymentCluster,
    RunningPayment,
    authorize,
    capture,
    payment_cluster,
    read_events,
)
from tests.support import error_details

AUTHORIZED = payment_pb2.PAYMENT_EVENT_TYPE_AUTHORIZED
CAPTURED = payment_pb2.PAYMENT_EVENT_TYPE_CAPTURED
SETTLED = payment_pb2.PAYMENT_EVENT_TYPE_SETTLED
DECLINED = payment_pb2.PAYMENT_EVENT_TYPE_DECLINED
VOIDED = payment_pb2.PAYMENT_EVENT_TYPE_VOIDED


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[PaymentCluster]:
    async with payment_cluster(tmp_path) as running:
        yield running


def _watch(service: RunningPayment, after: int = 0, order_id: str = "") -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    return service.stub.WatchPaymentEvents(
        payment_pb2.WatchPaymentEventsRequest(after_sequence=after, order_id=order_id)
    )


async def _settled_payment(service: RunningPayment, order_id: str | None = None) -> str:
    payment = await authorize(service.stub, order_id=order_id)
    await capture(service.stub, payment.payment_id)
    return payment.payment_id


async def test_events_stream_in_order_with_payment_snapshots(
    cluster: PaymentCluster, database_url_factory: Callable[[str], str]
) -> None:
    service = await cluster.start(database_url_factory("payment"))
    watch = _watch(service)
    try:
        order_id = new_id("ord")
        payment_id = await _settled_payment(service, order_id)
        events = await read_events(watch, 3)
    finally:
        watch.cancel()
    assert [e.type for e in events] == [AUTHORIZED, CAPTURED, SETTLED]
    assert [e.sequence for e in events] == [1, 2, 3]
    assert {(e.payment_id, e.order_id) for e in events} == {(payment_id, order_id)}
    assert [e.payment.state for e in events] == [
        payment_pb2.PAYMENT_STATE_AUTHORIZED,
        payment_pb2.PAYMENT_STATE_CAPTURED,
        payment_pb2.PAYMENT_STATE_SETTLED,
    ]
    assert all(e.create_time.seconds > 0 for e in events)


async def test_order_filter_and_other_event_types(cluster: PaymentCluster, tmp_path: Path) -> None:
    service = await cluster.start(f"sqlite:///{tmp_path / 'filter.db'}")
    mine, other = new_id("ord"), new_id("ord")
    watch = _watch(service, order_id=mine)
    try:
        await authorize(service.stub, order_id=other)
        await authorize(service.stub, order_id=mine, token="tok_decline", request_id="m-1")
        voided = await authorize(service.stub, order_id=mine, request_id="m-2")
        await service.stub.VoidPayment(
            payment_pb2.VoidPaymentRequest(request_id="v", payment_id=voided.payment_id), timeout=TIMEOUT
        )
        await authorize(service.stub, order_id=other, request_id="o-2")
        events = await read_events(watch, 3)
    finally:
        watch.cancel()
    assert [e.type for e in events] == [DECLINED, AUTHORIZED, VOIDED]
    assert {e.order_id for e in events} == {mine}
    assert events[0].payment.decline_reason == "CARD_DECLINED"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (payment_pb2.WatchPaymentEventsRequest(after_sequence=-1), "after_sequence"),
        (payment_pb2.WatchPaymentEventsRequest(order_id="ord_bad"), "order_id"),
    ],
    ids=["negative-cursor", "malformed-order"],
)
async def test_invalid_watch_is_rejected(
    cluster: PaymentCluster, tmp_path: Path, request_: payment_pb2.WatchPaymentEventsRequest, field: str
) -> None:
    service = await cluster.start(f"sqlite:///{tmp_path / 'invalid.db'}")
    call = service.stub.WatchPaymentEvents(request_, timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error_details(caught.value)[1]


async def test_events_from_another_replica_reach_the_stream(
    cluster: PaymentCluster, database_url_factory: Callable[[str], str]
) -> None:
    url = database_url_factory("payment")
    writer = await cluster.start(url)
    reader = await cluster.start(url)
    watch = _watch(reader)
    try:
        first = await authorize(writer.stub)
        # Having read it, the stream is now tailing live: the next events must come by polling.
        (seen,) = await read_events(watch, 1)
        payment_id = await _settled_payment(writer)
        events = await read_events(watch, 3)
    finally:
        watch.cancel()
    assert seen.payment_id == first.payment_id
    assert [e.type for e in events] == [AUTHORIZED, CAPTURED, SETTLED]
    assert {e.payment_id for e in events} == {payment_id}
    assert [e.sequence for e in events] == [2, 3, 4]


async def test_resume_after_cancel_and_across_restart(
    cluster: PaymentCluster, database_url_factory: Callable[[str], str]
) -> None:
    url = database_url_factory("payment")
    service = await cluster.start(url)
    for _ in range(3):
        await _settled_payment(service)  # 9 events

    watch = _watch(service)
    head = await read_events(watch, 4)
    watch.cancel()
    watch = _watch(service, after=head[-1].sequence)
    middle = await read_events(watch, 2)
    watch.cancel()
    assert [e.sequence for e in head + middle] == list(range(1, 7))

    await service.stop()
    restarted = await cluster.start(url)
    watch = _watch(restarted, after=middle[-1].sequence)
    try:
        rest = await read_events(watch, 3)
        assert [e.sequence for e in rest] == [7, 8, 9]
        # The next event is the next new one: nothing is delivered twice.
        fresh = await authorize(restarted.stub)
        (after,) = await read_events(watch, 1)
    finally:
        watch.cancel()
    assert (after.sequence, after.type, after.payment_id) == (10, AUTHORIZED, fresh.payment_id)


async def test_shutdown_ends_stream_with_unavailable(cluster: PaymentCluster, tmp_path: Path) -> None:
    service = await cluster.start(f"sqlite:///{tmp_path / 'drain.db'}")
    await authorize(service.stub)
    watch = _watch(service)
    (event,) = await read_events(watch, 1)
    await service.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_events(watch, 1)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == StreamShutdown.MESSAGE
    assert error_details(caught.value)[0] == "SHUTTING_DOWN"
    assert event.sequence == 1
