"""Request sources: what a load-generator worker sends on each call, as already-serialized bytes.

A source is a small picklable object (it travels to the worker processes). The workers call
`payload(worker, seq)` once per request; fixed requests are serialized once, up front, so the
client spends its CPU on gRPC and not on protobuf.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol


class RequestSource(Protocol):
    def payload(self, worker: int, seq: int) -> bytes: ...

    @property
    def fixed(self) -> bytes | None:
        """The one request every call sends, or None if requests differ (h2load needs a fixed one)."""
        ...


@dataclass(frozen=True)
class FixedPayload:
    data: bytes

    def payload(self, worker: int, seq: int) -> bytes:
        return self.data

    @property
    def fixed(self) -> bytes | None:
        return self.data


@dataclass(frozen=True)
class CyclePayloads:
    """Cycle through pre-serialized requests; workers start at different offsets."""

    items: tuple[bytes, ...]

    def payload(self, worker: int, seq: int) -> bytes:
        return self.items[(seq * 7919 + worker * 104729) % len(self.items)]

    @property
    def fixed(self) -> bytes | None:
        return self.items[0] if len(self.items) == 1 else None


@dataclass(frozen=True)
class CreateOrderPayloads:
    """A new CreateOrder per call (fresh request_id, so every call is a real saga, never a replay)."""

    user_ids: tuple[str, ...]
    run_id: str = ""

    def payload(self, worker: int, seq: int) -> bytes:
        from shop.common.v1 import money_pb2
        from shop.order.v1 import order_pb2

        user = self.user_ids[(seq * 7919 + worker * 104729) % len(self.user_ids)]
        request = order_pb2.CreateOrderRequest(
            request_id=f"bench-{self.run_id or uuid.uuid4().hex[:8]}-{worker}-{seq}",
            user_id=user,
            line_items=[
                order_pb2.LineItem(
                    sku="SKU-BENCH-1",
                    quantity=2,
                    unit_price=money_pb2.Money(currency_code="EUR", units=12, nanos=500_000_000),
                )
            ],
            payment_method_token="tok_visa",
        )
        return request.SerializeToString()

    @property
    def fixed(self) -> bytes | None:
        return None
