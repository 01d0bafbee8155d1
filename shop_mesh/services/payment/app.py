"""Composition root of the payment service: the one place that constructs its dependencies."""

from __future__ import annotations

import asyncio
from functools import partial

from shop.payment.v1 import payment_pb2, payment_pb2_grpc

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.idempotency_sql import IdempotencyStore
from shop_mesh.services.common.server import ServiceParts
from shop_mesh.services.payment import metrics
from shop_mesh.services.payment.config import PaymentSettings
from shop_mesh.services.payment.domain import PaymentProcessor
from shop_mesh.services.payment.repository import (
    PaymentRepository,
    PaymentUnitsOnDatabase,
    idempotency_keys,
    metadata,
)
from shop_mesh.services.payment.servicer import PaymentServicer

SERVICE_NAME: str = payment_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name


def build(settings: PaymentSettings, stopping: asyncio.Event) -> ServiceParts:
    db = Database(settings.database_url, metadata)
    # With metrics on, a repository adapter records the payment events (the domain knows none).
    metered = settings.metrics_port != 0
    units = metrics.MeteredPaymentUnits(db) if metered else PaymentUnitsOnDatabase(db)
    processor = PaymentProcessor(
        units,
        IdempotencyStore(idempotency_keys),
        decline_limit_units=settings.decline_amount_limit_units,
        settlement_delay=settings.settlement_delay_seconds,
        settlement_poll_interval=settings.settlement_poll_interval_seconds,
        event_poll_interval=settings.event_poll_interval_seconds,
    )
    servicer = PaymentServicer(processor, stopping)

    async def on_start() -> None:
        await db.write(lambda session: PaymentRepository(session).ensure_sequence())

    register = partial(payment_pb2_grpc.add_PaymentServiceServicer_to_server, servicer)
    return ServiceParts(
        SERVICE_NAME,
        db,
        register,
        on_start,
        background=[
            ("event-hub", processor.events.run),
            ("settlement", processor.run_settlement),
            *([("metrics", metrics.gauge_job(units, processor))] if metered else []),
        ],
    )
