"""Proto <-> domain conversion for OrderService. Request rules live in order.proto
(enforced by shop_mesh.services.common.validation)."""

from __future__ import annotations

from shop.order.v1 import order_pb2

from shop_mesh.services.common.convert import money_from_proto, money_to_proto, timestamp
from shop_mesh.services.common.errors import FieldViolation, InvalidArgument
from shop_mesh.services.common.pagination import Page, PageRequest, next_page_token, page_request
from shop_mesh.services.common.validation import MONEY_MAX_UNITS
from shop_mesh.services.order.model import (
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
    # Every per-field rule (ids, 1-100 lines, quantities, Money, one currency, the token) is the proto's,
    # checked before any handler. A sum is beyond a rule: the total must itself be a valid Money, or
    # PaymentService would refuse the authorization after the order was stored.
    items = tuple(LineItem(i.sku, i.quantity, money_from_proto(i.unit_price)) for i in request.line_items)
    if order_total(items).units > MONEY_MAX_UNITS:
        raise InvalidArgument(
            [FieldViolation("line_items", f"the order total must be at most {MONEY_MAX_UNITS} units")]
        )
    return NewOrder(request.request_id, request.user_id, items, request.payment_method_token)


def cancel_from_proto(request: order_pb2.CancelOrderRequest) -> tuple[str, str, str]:
    return request.request_id, request.order_id, request.reason


def list_from_proto(request: order_pb2.ListOrdersRequest) -> tuple[str | None, PageRequest, str]:
    """(user filter, page, filter key the page tokens are bound to)."""
    filter_key = f"user_id={request.user_id}"
    return (
        request.user_id or None,
        page_request(request.page_size, request.page_token, filter_key),
        filter_key,
    )


def watch_from_proto(request: order_pb2.WatchOrderRequest) -> tuple[str, int]:
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


def list_to_proto(page: Page[Order], filter_key: str) -> order_pb2.ListOrdersResponse:
    return order_pb2.ListOrdersResponse(
        orders=[order_to_proto(o) for o in page.items], next_page_token=next_page_token(page, filter_key)
    )
