"""The process caps its open streams (MAX_OPEN_STREAMS): beyond it a new stream is refused at once with
RESOURCE_EXHAUSTED, unary calls keep flowing, and a freed slot admits the next stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from shop.payment.v1 import payment_pb2

from tests.integration.payment_harness import PaymentCluster, authorize, payment_cluster
from tests.support import error_details

CAP = 3


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[PaymentCluster]:
    async with payment_cluster(tmp_path) as running:
        yield running


async def test_streams_beyond_the_cap_are_refused_and_unary_calls_flow(
    cluster: PaymentCluster, tmp_path: Path
) -> None:
    service = await cluster.start(f"sqlite:///{tmp_path / 'p.db'}", max_open_streams=CAP)
    payment = await authorize(service.stub)
    watch = payment_pb2.WatchPaymentEventsRequest(order_id=payment.order_id)
    held = [service.stub.WatchPaymentEvents(watch, timeout=30) for _ in range(CAP)]
    for call in held:
        await asyncio.wait_for(call.read(), 10)  # open: the AUTHORIZED event arrived
    extra = service.stub.WatchPaymentEvents(watch, timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(extra.read(), 10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit {CAP}" in (refused.value.details() or "")
    reason, _ = error_details(refused.value)
    assert reason == "TOO_MANY_STREAMS"
    # Unary calls are not counted: they keep working while every stream slot is taken.
    got = await service.stub.GetPayment(
        payment_pb2.GetPaymentRequest(payment_id=payment.payment_id), timeout=10
    )
    assert got.payment.payment_id == payment.payment_id
    # A stream that ends frees its slot.
    held[0].cancel()
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        again = service.stub.WatchPaymentEvents(watch, timeout=30)
        try:
            await asyncio.wait_for(again.read(), 10)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert asyncio.get_running_loop().time() < deadline, "the freed slot was never reused"
            await asyncio.sleep(0.05)
    again.cancel()
    for call in held[1:]:
        call.cancel()
