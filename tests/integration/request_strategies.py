"""Hypothesis strategies that build any request message from its descriptor.

Nothing here is written per message: the walk reads each field's type and the protovalidate rules it
declares (lengths, ranges, `in` lists, repeated bounds, the shop's predefined id/token/email rules) and
draws values on both sides of every boundary, random text, 100 KB strings and omitted fields. Ids come
from a pool of real ones (so some requests reach the handlers) mixed with malformed and unknown ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import field_mask_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from shop.common.v1 import rules_pb2

from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.validation import field_rules

HUGE = "X" * 100_000  # far beyond any limit: must be refused without echoing it back
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}
_ID_RULES = {"usr": rules_pb2.user_id, "ord": rules_pb2.order_id, "pay": rules_pb2.payment_id}


def _around(value: str) -> list[str]:
    """A valid value and near misses of it."""
    return [value, value + "\n", " " + value, value[:-1], value.lower()]


def _string(field: FieldDescriptor, pools: Mapping[str, Sequence[str]]) -> st.SearchStrategy[str]:
    rules = field_rules(field).string
    choices: list[st.SearchStrategy[str]] = [
        st.text(max_size=12),
        st.just(""),
        st.just(HUGE),
    ]
    for prefix, extension in _ID_RULES.items():
        if rules.Extensions[extension]:
            known = list(pools.get(prefix, ()))
            choices += [st.sampled_from(known)] * 4 if known else []
            choices += [st.builds(new_id, st.just(prefix)), st.sampled_from(_around(new_id(prefix)))]
    if rules.Extensions[rules_pb2.request_id]:
        valid = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,15}", fullmatch=True)
        choices += [valid] * 4 + [st.sampled_from(["r" * 128, "r" * 129, "r1\n", "-r"])]
    if rules.Extensions[rules_pb2.payment_method_token]:
        choices += [st.sampled_from(["tok_visa", "tok_visa", "tok_decline", "t" * 128, "t" * 129, " "])]
    if rules.Extensions[rules_pb2.email_address]:
        local = st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True)
        choices += [st.builds("{}@example.com".format, local)] * 3
        choices += [st.sampled_from(["a@b", "x" * 65 + "@example.com", " A@B.co ", "a@" + "b" * 64 + ".com"])]
    if rules.Extensions[rules_pb2.display_name]:
        choices += [st.sampled_from(["Ada", "Ada", " Ada ", "é" * 200, "é" * 201, "a\x07b", " "])]
    allowed = list(getattr(rules, "in"))
    if allowed:
        choices += [st.sampled_from(allowed)] * 4 + [st.sampled_from([allowed[0].lower(), "XYZ"])]
    for bound in ("max_len", "min_len"):
        if rules.HasField(bound):
            n = getattr(rules, bound)
            choices += [st.sampled_from(["s" * n, "s" * (n + 1), "s" * max(n - 1, 0)])]
    return st.one_of(choices)


def _integer(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field.type]
    rules = field_rules(field)
    typed = rules.int32 if field.type == FieldDescriptor.TYPE_INT32 else rules.int64
    edges = {0, 1, -1, low, high}
    for bound in ("gte", "lte", "gt", "lt"):
        if typed.HasField(bound):
            b = getattr(typed, bound)
            edges |= {b - 1, b, b + 1}
    edges = {e for e in edges if low <= e <= high}
    return st.one_of(st.sampled_from(sorted(edges)), st.integers(low, high), st.integers(0, 20))


def _reachable_field_names(descriptor: Descriptor, seen: set[str] | None = None) -> list[str]:
    """Names of the fields of every message reachable from `descriptor`: FieldMask path candidates."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen or descriptor.full_name.startswith("google.protobuf."):
        return []
    seen.add(descriptor.full_name)
    names: list[str] = []
    for field in descriptor.fields:
        names.append(field.name)
        if field.message_type is not None:
            names += _reachable_field_names(field.message_type, seen)
    return names


def _valid_string(field: FieldDescriptor, pools: Mapping[str, Sequence[str]]) -> st.SearchStrategy[str]:
    """A value the field's declared rules accept (as far as they can be read without CEL)."""
    rules = field_rules(field).string
    for prefix, extension in _ID_RULES.items():
        if rules.Extensions[extension]:
            known = list(pools.get(prefix, ()))
            return st.sampled_from(known) if known else st.builds(new_id, st.just(prefix))
    if rules.Extensions[rules_pb2.request_id]:
        return st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,15}", fullmatch=True)
    if rules.Extensions[rules_pb2.payment_method_token]:
        return st.sampled_from(["tok_visa", "tok_visa", "tok_visa", "tok_decline"])
    if rules.Extensions[rules_pb2.email_address]:
        return st.builds("{}@example.com".format, st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True))
    if rules.Extensions[rules_pb2.display_name]:
        return st.sampled_from(["Ada", "Grace Hopper"])
    allowed = list(getattr(rules, "in"))
    if allowed:  # the first: values that must agree (one currency per order) do; wild draws mix them
        return st.just(allowed[0])
    if rules.Extensions[rules_pb2.reason]:
        return st.sampled_from(["", "changed my mind"])
    low = max(rules.min_len, 1)
    high = rules.max_len if rules.HasField("max_len") else 12
    return st.from_regex(rf"[A-Z0-9][A-Z0-9-]{{{low - 1},{min(high, 12) - 1}}}", fullmatch=True)


def _valid_integer(field: FieldDescriptor) -> st.SearchStrategy[int]:
    rules = field_rules(field)
    typed = rules.int32 if field.type == FieldDescriptor.TYPE_INT32 else rules.int64
    # Positive and small: Money's units and nanos then share a sign, and sums stay in bounds.
    low = max(typed.gte if typed.HasField("gte") else 1, 1)
    high = min(typed.lte if typed.HasField("lte") else 1000, 1000)
    return st.integers(low, max(low, high))


class _Walk:
    def __init__(self, request: Descriptor, pools: Mapping[str, Sequence[str]], valid_share: int):
        self.pools = pools
        self.valid_share = valid_share  # out of 10: how often a field gets a value its rules accept
        self.mask_paths = [*sorted(set(_reachable_field_names(request))), "*", "user.email", HUGE]

    def _mix(self, valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of([valid] * self.valid_share + [wild] * (10 - self.valid_share))

    def scalar(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.type == FieldDescriptor.TYPE_STRING:
            return self._mix(_valid_string(field, self.pools), _string(field, self.pools))
        if field.type in _INT_RANGES:
            return self._mix(_valid_integer(field), _integer(field))
        if field.type == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if field.enum_type is not None:
            numbers = [v.number for v in field.enum_type.values]
            return self._mix(st.sampled_from(numbers[1:]), st.sampled_from([*numbers, max(numbers) + 1, 99]))
        if field.message_type is not None:
            if field.message_type.full_name == "google.protobuf.FieldMask":
                allowed = list(getattr(field_rules(field).field_mask, "in")) or self.mask_paths
                valid_paths = st.lists(st.sampled_from(allowed), min_size=1, max_size=3, unique=True)
                wild_paths = st.lists(
                    st.one_of(st.sampled_from(self.mask_paths), st.text(max_size=8)), max_size=4
                )
                return self._mix(valid_paths, wild_paths).map(lambda p: field_mask_pb2.FieldMask(paths=p))
            return self.message(field.message_type, depth + 1)
        raise NotImplementedError(f"no strategy for {field.full_name} (type {field.type})")

    def field(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        one = self.scalar(field, depth)
        if not field.is_repeated:
            return one
        rules = field_rules(field).repeated
        low = rules.min_items
        valid = st.lists(one, min_size=low, max_size=max(low, 3))
        wild: st.SearchStrategy[list[Any]] = st.lists(one, max_size=3)
        if rules.HasField("max_items"):
            top = rules.max_items
            # The bound and one beyond it, cheaply: the same element repeated.
            wild = st.one_of(
                wild, st.builds(lambda x: [x] * (top + 1), one), st.builds(lambda x: [x] * top, one)
            )
        return self._mix(valid, wild)

    def message(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        """Messages of `descriptor`'s type; each field drawn, or (mostly when wild) left out."""
        cls = message_factory.GetMessageClass(descriptor)
        if depth > 3 or descriptor.full_name.startswith("google.protobuf."):
            return st.just(cls())  # timestamps are output-only here
        present = {f.name: self.field(f, depth) for f in descriptor.fields if self._keep(f)}
        optional = {f.name: self.field(f, depth) for f in descriptor.fields if not self._keep(f)}
        return st.fixed_dictionaries(present, optional=optional).map(lambda kwargs: cls(**kwargs))

    def _keep(self, field: FieldDescriptor) -> bool:
        """In the mostly-valid walks a field with rules is always set (omission is the wild walk's)."""
        return self.valid_share >= 8 and field_rules(field).ByteSize() > 0


def requests(descriptor: Descriptor, pools: Mapping[str, Sequence[str]]) -> st.SearchStrategy[Message]:
    """Requests of one RPC's input type; `pools` maps an id prefix ("usr") to ids that exist.

    A third each: every field valid, most fields valid (one or two wild), and everything wild.
    """
    walks = [_Walk(descriptor, pools, share).message(descriptor, 0) for share in (10, 8, 3)]
    return st.one_of(*walks)
