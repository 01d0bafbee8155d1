"""The rules declared in the protos, as a client of the real in-process services meets them: refused
before anything is written, with INVALID_ARGUMENT naming the field, short even for huge values, and
visible through reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2
from shop.payment.v1 import payment_pb2
from shop.user.v1 import user_pb2
from sqlalchemy import MetaData, Table, func, select

from shop_mesh.services.common.db import Database
from shop_mesh.services.common.status import MAX_MESSAGE
from shop_mesh.services.order.repository import metadata as order_tables
from shop_mesh.services.order.repository import orders
from shop_mesh.services.payment.repository import metadata as payment_tables
from shop_mesh.services.payment.repository import payments
from tests.integration.order_stack import Stack, create_request, running_stack
from tests.support import GRPCURL, error_details, run_grpcurl

TIMEOUT = 10
HUGE = "X" * 100_000
TERMINAL_OR_SETTLING = {
    order_pb2.ORDER_STATE_PAID,
    order_pb2.ORDER_STATE_REJECTED,
    order_pb2.ORDER_STATE_AWAITING_SETTLEMENT,
}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(lambda name: f"sqlite:///{tmp_path / name}.db") as s:
        yield s


async def _count(url: str, metadata: MetaData, table: Table) -> int:
    db = Database(url, metadata)
    query = select(func.count()).select_from(table)
    try:
        count: int | None = await db.read(lambda session: session.scalar(query))
        return int(count or 0)
    finally:
        await db.dispose()


async def _rejected(call: object) -> tuple[str | None, dict[str, str], grpc.aio.AioRpcError]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    reason, fields = error_details(err.value)
    return reason, fields, err.value


async def test_token_payment_would_refuse_is_refused_by_order_before_anything_is_written(
    stack: Stack, tmp_path: Path
) -> None:
    """The bug: order accepted 129-256 characters, payment refused them, the order stayed PENDING."""
    user = await stack.create_user()
    reason, fields, _ = await _rejected(
        stack.order.CreateOrder(create_request(user, token="t" * 129), timeout=TIMEOUT)
    )
    assert reason == "INVALID_ARGUMENT"
    assert set(fields) == {"payment_method_token"}
    assert await _count(stack.order_db_url, order_tables, orders) == 0
    payment_db = f"sqlite:///{tmp_path / 'payment'}.db"
    assert await _count(payment_db, payment_tables, payments) == 0

    # The longest token both accept goes through the whole saga.
    reply = await stack.order.CreateOrder(create_request(user, token="t" * 128), timeout=TIMEOUT)
    assert reply.order.state in TERMINAL_OR_SETTLING
    assert reply.order.payment_id


@pytest.mark.parametrize("suffix", ["\n", "\r\n", " "])
async def test_ids_and_request_ids_with_trailing_characters_are_invalid(stack: Stack, suffix: str) -> None:
    user = await stack.create_user()
    order = (await stack.order.CreateOrder(create_request(user), timeout=TIMEOUT)).order
    calls = [
        (stack.users.GetUser(user_pb2.GetUserRequest(user_id=user + suffix), timeout=TIMEOUT), "user_id"),
        (
            stack.order.GetOrder(
                order_pb2.GetOrderRequest(order_id=order.order_id + suffix), timeout=TIMEOUT
            ),
            "order_id",
        ),
        (
            stack.payments.GetPayment(
                payment_pb2.GetPaymentRequest(payment_id=order.payment_id + suffix), timeout=TIMEOUT
            ),
            "payment_id",
        ),
        (
            stack.order.CreateOrder(create_request(user, request_id="again" + suffix), timeout=TIMEOUT),
            "request_id",
        ),
        (
            stack.users.DeleteUser(
                user_pb2.DeleteUserRequest(request_id="d" + suffix, user_id=user), timeout=TIMEOUT
            ),
            "request_id",
        ),
    ]
    for call, field in calls:
        _, fields, _ = await _rejected(call)
        assert set(fields) == {field}
    assert (await stack.users.GetUser(user_pb2.GetUserRequest(user_id=user), timeout=TIMEOUT)).user.state == (
        user_pb2.USER_STATE_ACTIVE
    )


async def test_huge_values_are_refused_with_a_short_answer(stack: Stack) -> None:
    """100 KB echoed into the status blew the client's metadata limit (RESOURCE_EXHAUSTED)."""
    user = await stack.create_user()
    order = create_request(user)
    order.line_items[0].unit_price.currency_code = HUGE
    authorize = payment_pb2.AuthorizePaymentRequest(
        request_id="a1",
        order_id="ord_01JC" + "0" * 22,
        amount=money_pb2.Money(currency_code=HUGE, units=1),
        payment_method_token="tok_visa",
    )
    update = user_pb2.UpdateUserRequest(
        request_id="u1",
        user=user_pb2.User(user_id=user, display_name="Ada"),
        update_mask=FieldMask(paths=["display_name", HUGE]),
    )
    cases = [
        (stack.order.CreateOrder(order, timeout=TIMEOUT), "line_items[0].unit_price.currency_code"),
        (stack.payments.AuthorizePayment(authorize, timeout=TIMEOUT), "amount.currency_code"),
        (stack.users.UpdateUser(update, timeout=TIMEOUT), "update_mask"),
        (stack.users.GetUser(user_pb2.GetUserRequest(user_id=HUGE), timeout=TIMEOUT), "user_id"),
    ]
    for call, field in cases:
        _, fields, err = await _rejected(call)
        assert field in fields
        trailers = err.trailing_metadata() or ()
        assert sum(len(k) + len(v) for k, v in trailers) < 2_000
        assert len(err.details() or "") <= MAX_MESSAGE
        assert "XXXXXXXX" not in (err.details() or "") + "".join(fields.values())
    assert await _count(stack.order_db_url, order_tables, orders) == 0


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl binary not installed")
async def test_rules_are_visible_through_reflection(stack: Stack) -> None:
    result = await asyncio.to_thread(
        run_grpcurl, stack.order_addr, "describe", "shop.order.v1.CreateOrderRequest", max_time=20
    )
    assert result.returncode == 0, result.stderr
    assert "buf.validate.field)" in result.stdout  # grpcurl prints `[(.buf.validate.field) = {...}]`
    assert "shop.common.v1.payment_method_token" in result.stdout
    # The rule messages themselves resolve too: reflection serves buf/validate/validate.proto.
    rules = await asyncio.to_thread(run_grpcurl, stack.order_addr, "describe", "buf.validate.StringRules")
    assert rules.returncode == 0, rules.stderr
    assert "max_len" in rules.stdout
