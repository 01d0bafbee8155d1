"""Composition root of the order service: the only place that constructs its dependencies."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from functools import partial

from shop.order.v1 import order_pb2, order_pb2_grpc

from shop_mesh.services.common.channels import upstream_channel
from shop_mesh.services.common.db import Database
from shop_mesh.services.common.idempotency_sql import IdempotencyStore
from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.outbox import SequenceAllocator
from shop_mesh.services.common.server import ServiceParts
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order import metrics
from shop_mesh.services.order.cancel import CancelOrder
from shop_mesh.services.order.clients import GrpcPaymentGateway, GrpcUserDirectory
from shop_mesh.services.order.config import OrderSettings
from shop_mesh.services.order.queries import OrderQueries
from shop_mesh.services.order.reconciler import Reconciler, SagaBound
from shop_mesh.services.order.repository import (
    ORDER_EVENTS_SEQUENCE,
    SqlOrderLookup,
    SqlOrderRepository,
    idempotency_keys,
    metadata,
    sequences,
)
from shop_mesh.services.order.saga import OrderSaga, StepHook
from shop_mesh.services.order.servicer import OrderServicer
from shop_mesh.services.order.settlement import PAYMENT_EVENTS_CURSOR, SettlementConsumer
from shop_mesh.services.order.store import OrderStore

SERVICE_NAME = order_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name
log = get_logger("order")


async def _no_faults(step: str) -> None:
    return None


def build(
    settings: OrderSettings, stopping: asyncio.Event, *, step_hook: StepHook | None = None
) -> ServiceParts:
    """The order service's parts. `step_hook` runs after each saga step is stored: production passes
    none; tests inject faults through it (tests/integration/order_with_faults.py)."""
    database = Database(settings.database_url, metadata)
    allocator = SequenceAllocator(sequences, ORDER_EVENTS_SEQUENCE)
    user_channel = upstream_channel(settings.user_service_addr, settings.max_message_bytes)
    payment_channel = upstream_channel(settings.payment_service_addr, settings.max_message_bytes)
    # With metrics on, adapters that record the saga's business metrics (the domain knows none).
    metered = settings.metrics_port != 0
    gateway = GrpcPaymentGateway
    repository = SqlOrderRepository
    lookup = SqlOrderLookup
    if metered:
        gateway, repository = metrics.MeteredPaymentGateway, metrics.MeteredOrderRepository
        lookup = metrics.MeteredOrderLookup
    store = OrderStore(
        database,
        repository,
        IdempotencyStore(idempotency_keys),
        allocator,
        poll_interval=settings.event_poll_interval_seconds,
    )
    payments = gateway(payment_channel, settings.upstream_timeout_seconds)
    saga = OrderSaga(
        store,
        GrpcUserDirectory(user_channel, settings.upstream_timeout_seconds),
        payments,
        step_hook=step_hook or _no_faults,
        lookup=lookup(database),
    )
    queries = OrderQueries(store)
    settlement = SettlementConsumer(store, payments)
    reconciler = Reconciler(
        saga,
        SagaBound(
            max_attempts=settings.reconcile_max_attempts,
            max_age=timedelta(seconds=settings.reconcile_max_age_seconds),
            backoff=timedelta(seconds=settings.reconcile_backoff_seconds),
            max_backoff=timedelta(seconds=settings.reconcile_max_backoff_seconds),
            stuck_after=timedelta(seconds=settings.reconcile_stuck_after_seconds),
        ),
    )
    servicer = OrderServicer(queries, saga, CancelOrder(store, payments, queries), stopping)

    async def on_start() -> None:
        def prepare(session: Session) -> None:
            allocator.ensure(session)
            SqlOrderRepository(session).ensure_cursor(PAYMENT_EVENTS_CURSOR)

        await database.write(prepare)

    # The background loops: the event log reader (WatchOrder), the settlement consumer, the reconciler.
    async def consume(stop: asyncio.Event) -> None:
        await settlement.run(stop, settings.consumer_max_backoff_seconds)

    async def reconcile(stop: asyncio.Event) -> None:
        await reconciler.run(stop, settings.reconcile_interval_seconds)

    async def on_stop() -> None:
        await user_channel.close()
        await payment_channel.close()

    register = partial(order_pb2_grpc.add_OrderServiceServicer_to_server, servicer)
    return ServiceParts(
        SERVICE_NAME,
        database,
        register,
        on_start,
        background=[
            ("event-hub", store.events.run),
            ("payment-events", consume),
            ("reconciler", reconcile),
            *([("metrics", metrics.gauge_job(database, store))] if metered else []),
        ],
        on_stop=on_stop,
    )
