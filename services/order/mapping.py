"""Proto <-> domain conversion and request validation for OrderService."""

from __future__ import annotations

from shop.order.v1 import order_pb2

from services.common.convert import money_from_proto, money_to_proto, timestamp
from services.common.errors import Violations
from services.common.money import NANOS_PER_UNIT
from services.common.pagination import PageRequest, make_page_token, parse_page
from services.common.validation import check_request_id, check_resource_id, check_text
from services.order.domain import (
    MAX_LINE_ITEMS,
    MAX_QUANTITY,
    MAX_REASON_LENGTH,
    MAX_SKU_LENGTH,
    MAX_TOKEN_LENGTH,
    MAX_TOTAL_UNITS,
    LineItem,
    NewOrder,
    Order,
    OrderEvent,
    OrderState,
    order_total,
)

_STATE_TO_PROTO: dict[OrderState, order_pb2.OrderState.ValueType] = {
    OrderState.PENDING: order_pb2.ORDER_STATE_PENDING,
    OrderState.PAYMENT_AUTHORIZED: order_pb2.ORDER_STATE_PAYMENT_AUTHORIZED,
    OrderState.AWAITING_SETTLEMENT: order_pb2.ORDER_STATE_AWAITING_SETTLEMENT,
    OrderState.PAID: order_pb2.ORDER_STATE_PAID,
    OrderState.REJECTED: order_pb2.ORDER_STATE_REJECTED,
    OrderState.CANCELLED: order_pb2.ORDER_STATE_CANCELLED,
}


def new_order_from_proto(request: order_pb2.CreateOrderRequest) -> NewOrder:
    v = Violations()
    check_request_id(v, request.request_id)
    check_resource_id(v, request.user_id, "user_id", "usr")
    items: list[LineItem] = []
    count = len(request.line_items)
    if count == 0:
        v.add("line_items", f"required: 1 to {MAX_LINE_ITEMS} items")
    elif count > MAX_LINE_ITEMS:
        v.add("line_items", f"at most {MAX_LINE_ITEMS} items")
    currency: str | None = None
    for i, item in enumerate(request.line_items[:MAX_LINE_ITEMS]):
        path = f"line_items[{i}]"
        if not item.sku.strip():
            v.add(f"{path}.sku", "required")
        elif len(item.sku) > MAX_SKU_LENGTH:
            v.add(f"{path}.sku", f"must be at most {MAX_SKU_LENGTH} characters")
        if not 1 <= item.quantity <= MAX_QUANTITY:
            v.add(f"{path}.quantity", f"must be between 1 and {MAX_QUANTITY}")
        price = money_from_proto(
            v, f"{path}.unit_price", item.unit_price, present=item.HasField("unit_price")
        )
        if price is None:
            continue
        if currency is None:
            currency = price.currency_code
        elif price.currency_code != currency:
            v.add(f"{path}.unit_price.currency_code", f"all line items must be in one currency ({currency})")
            continue
        items.append(LineItem(item.sku, item.quantity, price))
    if not v and order_total(items).total_nanos > MAX_TOTAL_UNITS * NANOS_PER_UNIT:
        v.add("line_items", f"the order total must be at most {MAX_TOTAL_UNITS} units")
    check_text(v, request.payment_method_token, "payment_method_token", max_len=MAX_TOKEN_LENGTH)
    v.raise_if_any()
    return NewOrder(request.request_id, request.user_id, tuple(items), request.payment_method_token)


def order_id_from(value: str) -> str:
    v = Violations()
    check_resource_id(v, value, "order_id", "ord")
    v.raise_if_any()
    return value


def cancel_from_proto(request: order_pb2.CancelOrderRequest) -> tuple[str, str, str]:
    v = Violations()
    check_request_id(v, request.request_id)
    check_resource_id(v, request.order_id, "order_id", "ord")
    check_text(v, request.reason, "reason", max_len=MAX_REASON_LENGTH, required=False)
    v.raise_if_any()
    return request.request_id, request.order_id, request.reason


def list_from_proto(request: order_pb2.ListOrdersRequest) -> tuple[str | None, PageRequest, str]:
    """(user filter, page, filter key the page tokens are bound to)."""
    v = Violations()
    if request.user_id:
        check_resource_id(v, request.user_id, "user_id", "usr")
    filter_key = f"user_id={request.user_id}"
    page = parse_page(v, request.page_size, request.page_token, filter_key)
    v.raise_if_any()
    return request.user_id or None, page, filter_key


def watch_from_proto(request: order_pb2.WatchOrderRequest) -> tuple[str, int]:
    v = Violations()
    check_resource_id(v, request.order_id, "order_id", "ord")
    if request.after_sequence < 0:
        v.add("after_sequence", "must not be negative")
    v.raise_if_any()
    return request.order_id, request.after_sequence


def order_to_proto(order: Order) -> order_pb2.Order:
    return order_pb2.Order(
        order_id=order.order_id,
        user_id=order.user_id,
        line_items=[
            order_pb2.LineItem(sku=i.sku, quantity=i.quantity, unit_price=money_to_proto(i.unit_price))
            for i in order.line_items
        ],
        total=money_to_proto(order.total),
        state=_STATE_TO_PROTO[order.state],
        payment_id=order.payment_id,
        reason=order.reason,
        create_time=timestamp(order.create_time),
        update_time=timestamp(order.update_time),
    )


def event_to_proto(event: OrderEvent) -> order_pb2.OrderEvent:
    return order_pb2.OrderEvent(
        sequence=event.sequence,
        order_id=event.order_id,
        state=_STATE_TO_PROTO[event.state],
        reason=event.reason,
        order=order_to_proto(event.order),
        create_time=timestamp(event.create_time),
    )


def list_to_proto(orders: list[Order], has_more: bool, filter_key: str) -> order_pb2.ListOrdersResponse:
    token = make_page_token(orders[-1].order_id, filter_key) if has_more and orders else ""
    return order_pb2.ListOrdersResponse(orders=[order_to_proto(o) for o in orders], next_page_token=token)
