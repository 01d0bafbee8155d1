"""Request validation: the rules are declared in the protos (protovalidate, `buf.validate`) and enforced
here, once, for every RPC of every service (shop_mesh.services.common.interceptors calls `check_request`).

What stays in Python is what a rule cannot see: state (the user exists and is active), sums (an order's
total) and normalisation (trimming, lower-casing).
"""

from __future__ import annotations

from typing import Any

import protovalidate
from buf.validate import validate_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from shop.common.v1 import money_pb2

from shop_mesh.services.common.errors import FieldViolation, InvalidArgument

# One validator for the process: it compiles a message type's rules (CEL, regexes) on first use and
# caches them, so a request costs a few microseconds (docs/performance.md).
_validator = protovalidate.Validator()


def check_request(message: Message) -> None:
    """Raise InvalidArgument naming every field of `message` that breaks a rule of its proto."""
    violations = _validator.collect_violations(message)
    if violations:
        raise InvalidArgument([FieldViolation(_field(v.proto), v.proto.message) for v in violations])


def _field(violation: Any) -> str:
    """The field a violation names. A custom CEL rule across fields (a message rule) names the field it is
    about in its id, `<field path>-<what>` (e.g. `nanos-same_sign` on Money; field names have no '-'),
    so the client still learns which field to fix (`amount.nanos`)."""
    path = field_path(violation.field)
    rule = violation.rule  # None for a message rule; `cel[i]` for a field's own CEL rule
    custom = rule is None or (rule.elements and rule.elements[0].field_name == "cel")
    about, dash, _ = violation.rule_id.partition("-")
    if custom and dash and about:
        return f"{path}.{about}" if path else about
    return path


def field_path(path: Any) -> str:
    """Render a protovalidate FieldPath the way clients read it, e.g. `line_items[0].unit_price.nanos`."""
    if path is None:
        return ""
    out: list[str] = []
    for element in path.elements:
        if out:
            out.append(".")
        out.append(element.field_name)
        subscript = element.subscript
        if subscript is not None:
            value = subscript.value
            out.append(f'["{value}"]' if isinstance(value, str) else f"[{value}]")
    return "".join(out)


def field_rules(field: FieldDescriptor) -> validate_pb2.FieldRules:
    """The buf.validate rules a proto field declares (empty if none)."""
    rules: validate_pb2.FieldRules = field.GetOptions().Extensions[validate_pb2.field]
    return rules


# The largest amount, in whole units, any Money may carry: declared once, on shop.common.v1.Money.
MONEY_MAX_UNITS: int = field_rules(money_pb2.Money.DESCRIPTOR.fields_by_name["units"]).int64.lte
