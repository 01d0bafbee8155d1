"""What order-service forwards to user- and payment-service, the callee must accept: the caller's rules
are at least as strict as the callee's. Derived from the descriptors, not from a list of numbers, and
checked twice: by comparing the declared rules, and by running both sides' rules on boundary values.
"""

from __future__ import annotations

from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2
from shop.payment.v1 import payment_pb2
from shop.user.v1 import user_pb2

from shop_mesh.services.common.convert import money_to_proto
from shop_mesh.services.common.errors import InvalidArgument
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.validation import _validator, field_rules
from shop_mesh.services.order import mapping
from shop_mesh.services.order.model import order_total
from tests.integration.request_strategies import _string

CreateOrder = order_pb2.CreateOrderRequest.DESCRIPTOR
Authorize = payment_pb2.AuthorizePaymentRequest.DESCRIPTOR

# (caller's field, callee's field): every value order-service passes on unchanged.
FORWARDED: list[tuple[FieldDescriptor, FieldDescriptor]] = [
    (CreateOrder.fields_by_name["payment_method_token"], Authorize.fields_by_name["payment_method_token"]),
    (CreateOrder.fields_by_name["user_id"], user_pb2.GetUserRequest.DESCRIPTOR.fields_by_name["user_id"]),
    (
        order_pb2.CancelOrderRequest.DESCRIPTOR.fields_by_name["reason"],
        payment_pb2.RefundPaymentRequest.DESCRIPTOR.fields_by_name["reason"],
    ),
]


def _string_constraints(field: FieldDescriptor) -> dict[str, object]:
    """Every string rule a field declares, standard and predefined, by name."""
    rules = field_rules(field).string
    found: dict[str, object] = {d.name: v for d, v in rules.ListFields()}
    return found


def test_forwarded_strings_declare_rules_at_least_as_strict_as_the_callee() -> None:
    for caller, callee in FORWARDED:
        mine, theirs = _string_constraints(caller), _string_constraints(callee)
        assert theirs, f"{callee.full_name} declares no rule: nothing to compare"
        for name, value in theirs.items():
            if name == "max_len":
                assert int(mine.get(name, 1 << 62)) <= int(value), (caller.full_name, name)  # type: ignore[call-overload]
            elif name == "min_len":
                assert int(mine.get(name, 0)) >= int(value), (caller.full_name, name)  # type: ignore[call-overload]
            else:  # a predefined rule (the shared declaration) or an exact-match rule: the same one
                assert mine.get(name) == value, (caller.full_name, callee.full_name, name)


def _field_level(field: FieldDescriptor) -> set[str]:
    rules = field_rules(field)
    found = {f"cel:{rule.expression}" for rule in rules.cel}
    return found | ({"required"} if rules.required else set())


def test_forwarded_money_is_the_same_message_with_the_same_field_rules() -> None:
    unit_price = order_pb2.LineItem.DESCRIPTOR.fields_by_name["unit_price"]
    amount = Authorize.fields_by_name["amount"]
    # One Money message: its own rules (currencies, bounds, signs) are the same declaration on both sides.
    assert unit_price.message_type is amount.message_type is money_pb2.Money.DESCRIPTOR
    # Every rule payment puts on the amount (required, positive), order puts on each price.
    assert _field_level(amount) and _field_level(amount) <= _field_level(unit_price)


def _field_violations(message: Message, field: str) -> list[str]:
    return [v.proto.message for v in _validator.collect_violations(message) if _top(v) == field]


def _top(violation: object) -> str:
    path = violation.proto.field  # type: ignore[attr-defined]
    return path.elements[0].field_name if path is not None and path.elements else ""


def _message_with(field: FieldDescriptor, value: str) -> Message:
    assert field.containing_type is not None
    message = message_factory.GetMessageClass(field.containing_type)()
    setattr(message, field.name, value)
    return message


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_forwarded_value_the_caller_accepts_the_callee_accepts(data: st.DataObject) -> None:
    for caller, callee in FORWARDED:
        # Values drawn from both sides' rules: boundaries of each, ids, text, 100 KB.
        value = data.draw(st.one_of(_string(caller, {"usr": [new_id("usr")]}), _string(callee, {})))
        if not _field_violations(_message_with(caller, value), caller.name):
            assert not _field_violations(_message_with(callee, value), callee.name), (caller.full_name, value)


def test_the_request_ids_order_derives_pass_payments_rule() -> None:
    order_id = new_id("ord")
    for step in ("authorize", "capture", "void", "refund"):
        request = payment_pb2.CapturePaymentRequest(request_id=f"{order_id}:{step}", payment_id=new_id("pay"))
        assert not _validator.collect_violations(request)


money = st.builds(
    money_pb2.Money,
    currency_code=st.sampled_from(["EUR", "EUR", "JPY", "XYZ", ""]),
    units=st.one_of(st.integers(-2, 3), st.integers(10**9 - 2, 10**9 + 1), st.integers(0, 10**9)),
    nanos=st.one_of(st.sampled_from([0, 1, -1, 999_999_999, 10**9]), st.integers(0, 999_999_999)),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    prices=st.lists(st.tuples(money, st.integers(0, 1001)), min_size=1, max_size=4),
)
def test_an_order_total_order_accepts_is_an_amount_payment_accepts(
    prices: list[tuple[money_pb2.Money, int]],
) -> None:
    request = order_pb2.CreateOrderRequest(
        request_id="r",
        user_id=new_id("usr"),
        payment_method_token="tok_visa",
        line_items=[order_pb2.LineItem(sku="S", quantity=q, unit_price=p) for p, q in prices],
    )
    if _validator.collect_violations(request):
        return  # refused before the saga: nothing reaches payment
    try:
        new = mapping.new_order_from_proto(request)
    except InvalidArgument:
        return  # the total is over the bound: refused too
    authorize = payment_pb2.AuthorizePaymentRequest(
        request_id=f"{new_id('ord')}:authorize",
        order_id=new_id("ord"),
        amount=money_to_proto(order_total(new.line_items)),
        payment_method_token=new.payment_method_token,
    )
    assert not _validator.collect_violations(authorize), authorize
