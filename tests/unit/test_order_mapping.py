"""CreateOrder/CancelOrder/ListOrders/WatchOrder request rules (order.proto, checked by
shop_mesh.services.common.validation, plus the order total in the mapping) and proto conversion."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2

from shop_mesh.services.common.errors import InvalidArgument
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.validation import check_request
from shop_mesh.services.order import mapping
from shop_mesh.services.order.model import LineItem, Order, OrderState

USER = new_id("usr")


def _item(sku: str = "SKU-1", qty: int = 1, currency: str = "EUR", units: int = 10) -> order_pb2.LineItem:
    return order_pb2.LineItem(
        sku=sku, quantity=qty, unit_price=money_pb2.Money(currency_code=currency, units=units)
    )


def _create(**overrides: object) -> order_pb2.CreateOrderRequest:
    fields: dict[str, object] = {
        "request_id": "req-1",
        "user_id": USER,
        "line_items": [_item(), _item("SKU-2", 2, units=5)],
        "payment_method_token": "tok_visa",
    }
    fields.update(overrides)
    return order_pb2.CreateOrderRequest(**fields)  # type: ignore[arg-type]


def _violations(request: order_pb2.CreateOrderRequest) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as err:
        check_request(request)  # what the server does first
        mapping.new_order_from_proto(request)
    return {v.field: v.description for v in err.value.violations}


def test_valid_request_becomes_a_new_order_with_exact_total() -> None:
    new = mapping.new_order_from_proto(_create())
    assert new.user_id == USER
    assert [i.sku for i in new.line_items] == ["SKU-1", "SKU-2"]
    assert sum(i.unit_price.times(i.quantity).total_nanos for i in new.line_items) == 20 * 10**9


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"request_id": ""}, "request_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "usr_nope"}, "user_id"),
        ({"user_id": new_id("ord")}, "user_id"),
        ({"line_items": []}, "line_items"),
        ({"line_items": [_item()] * 101}, "line_items"),
        ({"line_items": [_item(sku="")]}, "line_items[0].sku"),
        ({"line_items": [_item(sku="x" * 65)]}, "line_items[0].sku"),
        ({"line_items": [_item(qty=0)]}, "line_items[0].quantity"),
        ({"line_items": [_item(qty=1001)]}, "line_items[0].quantity"),
        ({"line_items": [order_pb2.LineItem(sku="a", quantity=1)]}, "line_items[0].unit_price"),
        ({"line_items": [_item(units=0)]}, "line_items[0].unit_price"),
        ({"line_items": [_item(units=-1)]}, "line_items[0].unit_price"),
        ({"line_items": [_item(currency="XYZ")]}, "line_items[0].unit_price.currency_code"),
        ({"line_items": [_item(), _item(), _item(currency="USD")]}, "line_items"),
        ({"line_items": [_item(currency="EUR" * 40_000)]}, "line_items[0].unit_price.currency_code"),
        ({"line_items": [_item(units=10**9, qty=2)]}, "line_items"),
        ({"payment_method_token": ""}, "payment_method_token"),
        ({"payment_method_token": "t" * 129}, "payment_method_token"),  # payment's limit, not 256
        ({"payment_method_token": " "}, "payment_method_token"),
        ({"request_id": "req-1\n"}, "request_id"),
        ({"user_id": USER + "\n"}, "user_id"),
    ],
)
def test_each_bad_field_is_named(overrides: dict[str, object], field: str) -> None:
    assert field in _violations(_create(**overrides))


def test_all_violations_are_reported_at_once() -> None:
    fields = _violations(_create(request_id="", user_id="x", payment_method_token=""))
    assert {"request_id", "user_id", "payment_method_token"} <= fields.keys()


def test_cancel_list_and_watch_validation() -> None:
    with pytest.raises(InvalidArgument) as err:
        check_request(order_pb2.CancelOrderRequest(request_id="r", order_id="ord_x", reason="y" * 501))
    assert {v.field for v in err.value.violations} == {"order_id", "reason"}
    with pytest.raises(InvalidArgument) as err:
        check_request(order_pb2.ListOrdersRequest(page_size=-1, user_id="bad"))
    assert {v.field for v in err.value.violations} == {"page_size", "user_id"}
    with pytest.raises(InvalidArgument) as err:
        check_request(order_pb2.WatchOrderRequest(order_id="", after_sequence=-1))
    assert {v.field for v in err.value.violations} == {"order_id", "after_sequence"}
    user_filter, page, _ = mapping.list_from_proto(order_pb2.ListOrdersRequest())
    assert (user_filter, page.size, page.after_key) == (None, 50, None)


def test_order_to_proto_round_trips_values() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    order = Order(
        order_id=new_id("ord"),
        user_id=USER,
        line_items=(LineItem("A", 3, Money.of("EUR", 1, 500_000_000)),),
        total=Money.of("EUR", 4, 500_000_000),
        state=OrderState.AWAITING_SETTLEMENT,
        payment_id="pay_1",
        reason="",
        create_time=now,
        update_time=now,
        payment_method_token="secret",
    )
    proto = mapping.order_to_proto(order)
    assert proto.state == order_pb2.ORDER_STATE_AWAITING_SETTLEMENT
    assert (proto.total.units, proto.total.nanos, proto.total.currency_code) == (4, 500_000_000, "EUR")
    assert proto.line_items[0].unit_price.nanos == 500_000_000
    assert proto.create_time.ToDatetime(tzinfo=UTC) == now
    assert "secret" not in str(proto)  # the payment token never leaves the service
