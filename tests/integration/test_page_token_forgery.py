"""Forged page tokens on ListUsers / ListOrders / ListPayments, through real gRPC: INVALID_ARGUMENT
naming page_token (never INTERNAL), while the tokens the services hand out keep working."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from shop.order.v1 import order_pb2
from shop.payment.v1 import payment_pb2
from shop.user.v1 import user_pb2

from tests.integration.order_stack import Stack, create_request, running_stack
from tests.support import error_details


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _forgeries(valid: str) -> list[str]:
    raw = bytearray(base64.urlsafe_b64decode(valid + "=" * (-len(valid) % 4)))
    raw[-1] ^= 0x01
    return [
        _b64(b"[" * 1000),
        valid[:-3],  # truncated
        _b64(bytes(raw)),  # one bit flipped
        _b64(os.urandom(48)),
        "x" * 100_000,
        "not a token at all",
    ]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(lambda name: f"sqlite:///{tmp_path / name}.db") as s:
        yield s


async def _invalid_page_token(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    _, fields = error_details(err.value)
    assert set(fields) == {"page_token"}
    assert len(err.value.details() or "") < 200  # the token is not echoed


async def _check(
    list_call: Callable[[str, str], Awaitable[Any]], items: Callable[[Any], list[str]], other_filter: str
) -> None:
    """list_call(filter, token) -> reply; items(reply) -> ids of the page."""
    first = await list_call("", "")
    assert len(items(first)) == 1 and first.next_page_token
    second = await list_call("", first.next_page_token)
    assert len(items(second)) == 1 and items(second) != items(first)
    # A token is only good for the filter it was made for.
    await _invalid_page_token(list_call(other_filter, first.next_page_token))
    for forged in _forgeries(first.next_page_token):
        await _invalid_page_token(list_call("", forged))


async def test_forged_page_tokens_are_invalid_argument_on_every_list(stack: Stack) -> None:
    users = [await stack.create_user(), await stack.create_user()]
    for user in users:
        order = (await stack.order.CreateOrder(create_request(user), timeout=15)).order
        assert order.payment_id

    async def list_users(state: str, token: str) -> user_pb2.ListUsersResponse:
        request = user_pb2.ListUsersRequest(page_size=1, page_token=token)
        if state:
            request.state = user_pb2.USER_STATE_ACTIVE
        return await stack.users.ListUsers(request, timeout=10)

    async def list_orders(user_id: str, token: str) -> order_pb2.ListOrdersResponse:
        request = order_pb2.ListOrdersRequest(user_id=user_id, page_size=1, page_token=token)
        return await stack.order.ListOrders(request, timeout=10)

    async def list_payments(order_id: str, token: str) -> payment_pb2.ListPaymentsResponse:
        request = payment_pb2.ListPaymentsRequest(order_id=order_id, page_size=1, page_token=token)
        return await stack.payments.ListPayments(request, timeout=10)

    await _check(list_users, lambda r: [u.user_id for u in r.users], "active")
    await _check(list_orders, lambda r: [o.order_id for o in r.orders], users[0])
    orders = (await stack.order.ListOrders(order_pb2.ListOrdersRequest(), timeout=10)).orders
    await _check(list_payments, lambda r: [p.payment_id for p in r.payments], orders[0].order_id)
