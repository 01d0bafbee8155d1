"""OrderService settings (docs/runtime-contract.md), loaded once in __main__."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from shop_mesh.services.common.config import ServiceSettings


class OrderSettings(ServiceSettings):
    service_name: str = "order"
    port: int = Field(default=50052, ge=0, le=65535)
    database_url: str = Field(default="", validation_alias=AliasChoices("ORDER_DATABASE_URL", "DATABASE_URL"))
    user_service_addr: str = "127.0.0.1:50051"
    payment_service_addr: str = "127.0.0.1:50053"
    # Deadline of an upstream call when the incoming call has none (background jobs, no-deadline clients).
    upstream_timeout_seconds: float = Field(default=5.0, gt=0)
    # Lower than the other services' 128: a CreateOrder is a three-hop saga, and ~16 in flight already
    # reach this process's capacity; more would only queue past the callers' deadlines (measured in
    # docs/performance.md, "unary admission").
    max_inflight_unary: int = Field(default=32, ge=1)
    reconcile_interval_seconds: float = Field(default=10.0, gt=0)
    # A saga untouched for this long is stuck (its driver crashed or gave up); the reconciler finishes it.
    reconcile_stuck_after_seconds: float = Field(default=30.0, ge=0)
    # The reconciler's bound: after this many attempts, or this long after the order was created, a
    # saga that has not reached AWAITING_SETTLEMENT is compensated and REJECTED (SAGA_TIMEOUT).
    reconcile_max_attempts: int = Field(default=10, ge=1)
    reconcile_max_age_seconds: float = Field(default=300.0, gt=0)
    # Backoff between two attempts on one saga: doubles from this, capped at the maximum.
    reconcile_backoff_seconds: float = Field(default=5.0, ge=0)
    reconcile_max_backoff_seconds: float = Field(default=60.0, ge=0)
    # Bounded reconnect backoff of the payment-event consumer.
    consumer_max_backoff_seconds: float = Field(default=5.0, gt=0)
