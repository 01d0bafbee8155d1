"""PaymentService settings (see docs/runtime-contract.md)."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from shop_mesh.services.common.config import ServiceSettings


class PaymentSettings(ServiceSettings):
    service_name: str = "payment"
    port: int = Field(default=50053, ge=0, le=65535)
    database_url: str = Field(
        default="", validation_alias=AliasChoices("PAYMENT_DATABASE_URL", "DATABASE_URL")
    )
    # A captured payment settles this long after capture (0 in tests).
    settlement_delay_seconds: float = Field(default=2.0, ge=0)
    # How often the settlement job rescans when nothing wakes it (captures by other replicas).
    settlement_poll_interval_seconds: float = Field(default=1.0, gt=0)
    # Deterministic test decline: authorizations above this many units (any currency) are declined.
    decline_amount_limit_units: int = Field(default=10_000, ge=0)
