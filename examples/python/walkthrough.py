"""The shop walk-through from Python through the edge, using only the `shop-mesh-api` client package.

    pip install 'shop-mesh-api[typing]'        # or: pip install -e <repo>/generated
    python walkthrough.py --edge localhost:8080

Signs up a user, orders, watches the order to PAID (server streaming), shows a rejected order's
INVALID_ARGUMENT with its google.rpc.BadRequest field violations, then cancels (the payment is refunded).

Authentication (when the edge verifies JWTs): SHOP_TOKEN is sent as `authorization: Bearer …` on every
call; SHOP_TOKEN_COMMAND, if set, is run after sign-up with the new user id as its last argument and
must print a token for that user (e.g. `python -m shop_mesh.mesh token --user`), used from then on.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

TIMEOUT_S = 10.0
WATCH_TIMEOUT_S = 60.0


def bad_request(error: grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The field violations of a failed call: google.rpc.Status in the `grpc-status-details-bin` trailer."""
    if not isinstance(error, grpc.Call):
        return []
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            found = error_details_pb2.BadRequest()
            if detail.Unpack(found):
                violations.extend(found.field_violations)
    return violations


def money(amount: money_pb2.Money) -> str:
    return f"{amount.units + amount.nanos / 1e9:.2f} {amount.currency_code}"


class Walkthrough:
    def __init__(self, channel: grpc.Channel, token: str | None) -> None:
        self.users = user_pb2_grpc.UserServiceStub(channel)
        self.orders = order_pb2_grpc.OrderServiceStub(channel)
        self.token = token
        self.run_id = uuid.uuid4().hex[:12]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def sign_up(self) -> user_pb2.User:
        reply = self.users.CreateUser(
            user_pb2.CreateUserRequest(
                request_id=f"signup-{self.run_id}",
                email=f"ada-{self.run_id}@example.com",
                display_name="Ada",
            ),
            timeout=TIMEOUT_S,
            metadata=self.metadata(),
        )
        print(f"signed up: {reply.user.user_id} {reply.user.email}", flush=True)
        return reply.user

    def order(self, user_id: str, quantity: int = 2, suffix: str = "") -> order_pb2.Order:
        book = order_pb2.LineItem(
            sku="book-42",
            quantity=quantity,
            unit_price=money_pb2.Money(currency_code="EUR", units=12, nanos=500_000_000),
        )
        reply = self.orders.CreateOrder(
            order_pb2.CreateOrderRequest(
                request_id=f"order-{self.run_id}{suffix}",
                user_id=user_id,
                line_items=[book],
                payment_method_token="tok_visa",
            ),
            timeout=TIMEOUT_S,
            metadata=self.metadata(),
        )
        state = order_pb2.OrderState.Name(reply.order.state)
        print(f"ordered: {reply.order.order_id} {state} total {money(reply.order.total)}", flush=True)
        return reply.order

    def watch(self, order_id: str) -> order_pb2.OrderState.ValueType:
        """Every state change until the server ends the stream (the order is final)."""
        last: order_pb2.OrderState.ValueType = order_pb2.ORDER_STATE_UNSPECIFIED
        stream = self.orders.WatchOrder(
            order_pb2.WatchOrderRequest(order_id=order_id), timeout=WATCH_TIMEOUT_S, metadata=self.metadata()
        )
        for reply in stream:
            last = reply.event.state
            print(f"event {reply.event.sequence}: {order_pb2.OrderState.Name(last)}", flush=True)
        return last

    def invalid_order(self, user_id: str) -> list[error_details_pb2.BadRequest.FieldViolation]:
        try:
            self.order(user_id, quantity=0, suffix="-invalid")
        except grpc.RpcError as error:
            assert isinstance(error, grpc.Call)
            violations = bad_request(error)
            print(f"rejected: {error.code().name} {error.details()}", flush=True)
            for v in violations:
                print(f"  field {v.field}: {v.description}", flush=True)
            return violations
        raise SystemExit("an order of 0 books was accepted")

    def cancel(self, order_id: str) -> order_pb2.Order:
        reply = self.orders.CancelOrder(
            order_pb2.CancelOrderRequest(
                request_id=f"cancel-{self.run_id}", order_id=order_id, reason="changed my mind"
            ),
            timeout=TIMEOUT_S,
            metadata=self.metadata(),
        )
        print(f"cancelled: {reply.order.order_id} {order_pb2.OrderState.Name(reply.order.state)}", flush=True)
        return reply.order


def user_token(user_id: str) -> str | None:
    command = os.environ.get("SHOP_TOKEN_COMMAND")
    if not command:
        return os.environ.get("SHOP_TOKEN") or None
    out = subprocess.run([*shlex.split(command), user_id], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--edge", default=os.environ.get("SHOP_EDGE", "localhost:8080"), help="host:port")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.edge) as channel:
        shop = Walkthrough(channel, os.environ.get("SHOP_TOKEN") or None)
        try:
            user = shop.sign_up()
            shop.token = user_token(user.user_id)
            order = shop.order(user.user_id)
            final = shop.watch(order.order_id)
            if final != order_pb2.ORDER_STATE_PAID:
                print(f"the order ended {order_pb2.OrderState.Name(final)}, not PAID", file=sys.stderr)
                return 1
            shop.invalid_order(user.user_id)
            shop.cancel(order.order_id)
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call):
                raise
            hint = (
                " (the edge wants a token: set SHOP_TOKEN)"
                if error.code() == grpc.StatusCode.UNAUTHENTICATED
                else ""
            )
            print(f"error: {error.code().name} {error.details()}{hint}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
