"""End users through the real edge (`python -m shop_mesh.mesh run`): JWT verification by Envoy's jwt_authn,
identity headers set only from verified claims, ownership enforced by the services, and sidecars
that refuse identity headers from mesh identities not allowed to assert them.

Every attack of issue #12 is replayed here as the anonymous or the wrong customer would try it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.common.v1 import money_pb2
from shop.order.v1 import order_pb2, order_pb2_grpc
from shop.payment.v1 import payment_pb2, payment_pb2_grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.mesh import pki, tokens
from shop_mesh.mesh.topology import load
from tests.mesh.conftest import MeshProcess, running_mesh
from tests.support import REPO, bearer, run_grpcurl

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mesh-auth")]

TIMEOUT = 15


class Client:
    """Typed stubs through the edge; each call presents `token` (None: anonymous)."""

    def __init__(self, channel: grpc.Channel, token: str | None, extra: tuple[tuple[str, str], ...] = ()):
        self.token = token
        self.metadata = (bearer(token) if token else ()) + extra
        self.users = user_pb2_grpc.UserServiceStub(channel)
        self.orders = order_pb2_grpc.OrderServiceStub(channel)
        self.payments = payment_pb2_grpc.PaymentServiceStub(channel)

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, timeout=TIMEOUT, metadata=self.metadata)

    def code(self, method: Callable[..., Any], request: Any) -> grpc.StatusCode:
        """The status of a unary call, or of a stream's first message."""
        try:
            reply = method(request, timeout=TIMEOUT, metadata=self.metadata)
            if hasattr(reply, "__next__"):
                next(reply)
                reply.cancel()
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    root = tmp_path_factory.mktemp("auth-mesh")
    # Settlement at once: the walk-through watches its order to PAID.
    with running_mesh(root / "run", env=["payment:SETTLEMENT_DELAY_SECONDS=0"]) as running:
        yield running


@pytest.fixture(scope="module")
def channel(mesh: MeshProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(mesh.edge) as ch:
        yield ch


def _new_user(client: Client, name: str) -> user_pb2.User:
    user: user_pb2.User = client.call(
        client.users.CreateUser,
        user_pb2.CreateUserRequest(
            request_id=f"u-{uuid.uuid4()}",
            email=f"{name}-{uuid.uuid4().hex[:8]}@example.com",
            display_name=name,
        ),
    ).user
    return user


def _order_request(user_id: str) -> order_pb2.CreateOrderRequest:
    return order_pb2.CreateOrderRequest(
        request_id=f"o-{uuid.uuid4()}",
        user_id=user_id,
        line_items=[
            order_pb2.LineItem(
                sku="book", quantity=1, unit_price=money_pb2.Money(currency_code="EUR", units=12)
            )
        ],
        payment_method_token="tok_visa",
    )


class World:
    """Two customers (A with an order and its payment, B) and an operator."""

    def __init__(self, mesh: MeshProcess, channel: grpc.Channel):
        anonymous = Client(channel, None)
        self.a_user = _new_user(anonymous, "ada")  # sign-up is public
        self.b_user = _new_user(anonymous, "bob")
        self.a = Client(channel, mesh.token(self.a_user.user_id))
        self.b = Client(channel, mesh.token(self.b_user.user_id))
        self.admin = Client(channel, mesh.admin_token)
        self.anonymous = anonymous
        self.order = self.a.call(self.a.orders.CreateOrder, _order_request(self.a_user.user_id)).order
        self.payment_id = self.order.payment_id

    def orders_of_a(self) -> list[str]:
        reply = self.admin.call(
            self.admin.orders.ListOrders, order_pb2.ListOrdersRequest(user_id=self.a_user.user_id)
        )
        return [o.order_id for o in reply.orders]


@pytest.fixture(scope="module")
def world(mesh: MeshProcess, channel: grpc.Channel) -> World:
    return World(mesh, channel)


def _reads_of(w: World) -> dict[str, tuple[Callable[[Client], Any], Any]]:
    """Every read of A's data, as `name: (stub method of a client, request)`."""
    a_id, order_id = w.a_user.user_id, w.order.order_id
    return {
        "GetUser": (lambda c: c.users.GetUser, user_pb2.GetUserRequest(user_id=a_id)),
        "GetOrder": (lambda c: c.orders.GetOrder, order_pb2.GetOrderRequest(order_id=order_id)),
        "ListOrders": (lambda c: c.orders.ListOrders, order_pb2.ListOrdersRequest(user_id=a_id)),
        "WatchOrder": (lambda c: c.orders.WatchOrder, order_pb2.WatchOrderRequest(order_id=order_id)),
        "GetPayment": (
            lambda c: c.payments.GetPayment,
            payment_pb2.GetPaymentRequest(payment_id=w.payment_id),
        ),
        "ListPayments": (
            lambda c: c.payments.ListPayments,
            payment_pb2.ListPaymentsRequest(order_id=order_id),
        ),
        "WatchPaymentEvents(order)": (
            lambda c: c.payments.WatchPaymentEvents,
            payment_pb2.WatchPaymentEventsRequest(order_id=order_id),
        ),
    }


# ---- anonymous -------------------------------------------------------------------------------------
def test_anonymous_gets_unauthenticated_on_every_shop_rpc_but_sign_up(world: World) -> None:
    anon, a_id = world.anonymous, world.a_user.user_id
    calls: list[tuple[Callable[..., Any], Any]] = [
        (anon.users.ListUsers, user_pb2.ListUsersRequest()),
        (
            anon.users.UpdateUser,
            user_pb2.UpdateUserRequest(
                request_id=f"x-{uuid.uuid4()}",
                user=user_pb2.User(user_id=a_id, email="evil@example.com"),
                update_mask=field_mask_pb2.FieldMask(paths=["email"]),
            ),
        ),
        (anon.users.DeleteUser, user_pb2.DeleteUserRequest(request_id=f"x-{uuid.uuid4()}", user_id=a_id)),
        (anon.orders.CreateOrder, _order_request(a_id)),
        (
            anon.orders.CancelOrder,
            order_pb2.CancelOrderRequest(request_id=f"x-{uuid.uuid4()}", order_id=world.order.order_id),
        ),
        (anon.payments.WatchPaymentEvents, payment_pb2.WatchPaymentEventsRequest()),
        *((make(anon), request) for make, request in _reads_of(world).values()),
    ]
    codes = {getattr(m, "_method", m): anon.code(m, r) for m, r in calls}
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    # Nothing was written: A's record, orders and order are as they were.
    assert (
        world.admin.call(world.admin.users.GetUser, user_pb2.GetUserRequest(user_id=a_id)).user
        == world.a_user
    )
    assert world.orders_of_a() == [world.order.order_id]
    got = world.admin.call(
        world.admin.orders.GetOrder, order_pb2.GetOrderRequest(order_id=world.order.order_id)
    )
    assert got.order.state != order_pb2.ORDER_STATE_CANCELLED


def test_health_reflection_and_sign_up_stay_public(mesh: MeshProcess, world: World) -> None:
    assert world.a_user.user_id.startswith("usr_")  # CreateUser without a token
    listed = run_grpcurl(mesh.edge, "list")
    assert listed.returncode == 0 and "shop.order.v1.OrderService" in listed.stdout, listed.stderr
    with grpc.insecure_channel(mesh.edge) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="shop.user.v1.UserService"),
            timeout=TIMEOUT,
            metadata=(("x-shop-service", "user"),),
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- forged and broken tokens ------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forgeries(mesh: MeshProcess, victim: str) -> dict[str, str]:
    settings = load(mesh.topology).auth.local
    key = tokens.ensure_signing_key(mesh.run.jwt)
    kid = tokens.public_jwk(key)["kid"]
    now = time.time()

    def good(**changes: Any) -> dict[str, Any]:
        return {**tokens.claims(settings, victim, ["customer", "admin"]), **changes}

    valid = tokens.sign(key, good())
    head, _, sig = valid.split(".")
    tampered_body = _b64(json.dumps(good(sub="usr_someone_else")).encode())
    # The verification key is public: an attacker may use it as an HMAC secret.
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    hs_header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    hs_body = _b64(json.dumps(good()).encode())
    hs_sig = _b64(hmac.new(public_pem, f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest())
    none_header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return {
        "expired": tokens.sign(key, good(iat=int(now) - 7200, nbf=int(now) - 7200, exp=int(now) - 3600)),
        "not yet valid": tokens.sign(key, good(nbf=int(now) + 3600, exp=int(now) + 7200)),
        "wrong issuer": tokens.sign(key, good(iss="https://evil.example.com")),
        "wrong audience": tokens.sign(key, good(aud="another-api")),
        "tampered payload": f"{head}.{tampered_body}.{sig}",
        "wrong key": jwt.encode(
            good(), ec.generate_private_key(ec.SECP256R1()), "ES256", headers={"kid": kid}
        ),
        "alg none": f"{none_header}.{hs_body}.",
        "HS256 with the public key": f"{hs_header}.{hs_body}.{hs_sig}",
        "garbage": "not-a-jwt",
    }


def test_forged_tokens_are_unauthenticated_and_write_nothing(
    mesh: MeshProcess, channel: grpc.Channel, world: World
) -> None:
    victim = world.a_user.user_id
    results = {}
    for name, token in _forgeries(mesh, victim).items():
        client = Client(channel, token)
        results[name] = (
            client.code(client.orders.CreateOrder, _order_request(victim)),
            client.code(client.users.ListUsers, user_pb2.ListUsersRequest()),
            client.code(client.users.GetUser, user_pb2.GetUserRequest(user_id=victim)),
        )
    assert {
        name: codes for name, codes in results.items() if set(codes) != {grpc.StatusCode.UNAUTHENTICATED}
    } == {}
    assert world.orders_of_a() == [world.order.order_id]  # no order charged to the victim


def test_a_valid_token_that_names_nobody_is_refused(
    mesh: MeshProcess, channel: grpc.Channel, world: World
) -> None:
    """Without `sub` the call would carry no identity headers, like an in-mesh service: refused."""
    key = tokens.ensure_signing_key(mesh.run.jwt)
    payload = tokens.claims(load(mesh.topology).auth.local, "x", ["customer", "admin"])
    del payload["sub"]
    client = Client(channel, tokens.sign(key, payload))
    assert (
        client.code(client.users.ListUsers, user_pb2.ListUsersRequest()) == grpc.StatusCode.PERMISSION_DENIED
    )
    assert client.code(client.orders.CreateOrder, _order_request(world.a_user.user_id)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert world.orders_of_a() == [world.order.order_id]


# ---- another customer ---------------------------------------------------------------------------------
def test_another_customer_finds_nothing_of_a_and_owner_and_admin_do(world: World) -> None:
    for name, (make, request) in _reads_of(world).items():
        assert world.b.code(make(world.b), request) == grpc.StatusCode.NOT_FOUND, name
        assert world.a.code(make(world.a), request) == grpc.StatusCode.OK, name
        assert world.admin.code(make(world.admin), request) == grpc.StatusCode.OK, name
    # A missing id answers the same as another's (ids cannot be probed).
    assert (
        world.b.code(
            world.b.orders.GetOrder, order_pb2.GetOrderRequest(order_id="ord_01M00000000000000000000000")
        )
        == grpc.StatusCode.NOT_FOUND
    )
    # B's own lists do not show A's data.
    assert world.b.call(world.b.orders.ListOrders, order_pb2.ListOrdersRequest()).orders == []
    assert world.b.call(world.b.payments.ListPayments, payment_pb2.ListPaymentsRequest()).payments == []
    assert [
        o.order_id for o in world.a.call(world.a.orders.ListOrders, order_pb2.ListOrdersRequest()).orders
    ] == [world.order.order_id]


def test_another_customer_changes_nothing_of_a(world: World) -> None:
    b, a_id = world.b, world.a_user.user_id
    assert b.code(b.orders.CreateOrder, _order_request(a_id)) == grpc.StatusCode.PERMISSION_DENIED
    cancel = order_pb2.CancelOrderRequest(request_id=f"c-{uuid.uuid4()}", order_id=world.order.order_id)
    assert b.code(b.orders.CancelOrder, cancel) == grpc.StatusCode.NOT_FOUND
    update = user_pb2.UpdateUserRequest(
        request_id=f"x-{uuid.uuid4()}",
        user=user_pb2.User(user_id=a_id, email="evil@example.com", state=user_pb2.USER_STATE_SUSPENDED),
        update_mask=field_mask_pb2.FieldMask(paths=["email", "state"]),
    )
    assert b.code(b.users.UpdateUser, update) == grpc.StatusCode.NOT_FOUND
    delete = user_pb2.DeleteUserRequest(request_id=f"x-{uuid.uuid4()}", user_id=a_id)
    assert b.code(b.users.DeleteUser, delete) == grpc.StatusCode.NOT_FOUND
    # Nothing changed.
    assert (
        world.admin.call(world.admin.users.GetUser, user_pb2.GetUserRequest(user_id=a_id)).user
        == world.a_user
    )
    assert world.orders_of_a() == [world.order.order_id]
    order = world.admin.call(
        world.admin.orders.GetOrder, order_pb2.GetOrderRequest(order_id=world.order.order_id)
    )
    assert order.order.state != order_pb2.ORDER_STATE_CANCELLED


def test_operator_only_operations(world: World) -> None:
    b = world.b
    # Denied at the edge by role, and by the services.
    assert b.code(b.users.ListUsers, user_pb2.ListUsersRequest()) == grpc.StatusCode.PERMISSION_DENIED
    all_events = payment_pb2.WatchPaymentEventsRequest()
    assert b.code(b.payments.WatchPaymentEvents, all_events) == grpc.StatusCode.PERMISSION_DENIED
    assert world.admin.code(world.admin.payments.WatchPaymentEvents, all_events) == grpc.StatusCode.OK
    users = world.admin.call(world.admin.users.ListUsers, user_pb2.ListUsersRequest(page_size=1000)).users
    assert {world.a_user.user_id, world.b_user.user_id} <= {u.user_id for u in users}
    # The operator suspends B; B cannot lift their own suspension.
    b_id = world.b_user.user_id

    def set_state(client: Client, state: Any) -> grpc.StatusCode:
        return client.code(
            client.users.UpdateUser,
            user_pb2.UpdateUserRequest(
                request_id=f"s-{uuid.uuid4()}",
                user=user_pb2.User(user_id=b_id, state=state),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            ),
        )

    assert set_state(world.admin, user_pb2.USER_STATE_SUSPENDED) == grpc.StatusCode.OK
    assert set_state(b, user_pb2.USER_STATE_ACTIVE) == grpc.StatusCode.PERMISSION_DENIED
    got = b.call(b.users.GetUser, user_pb2.GetUserRequest(user_id=b_id)).user
    assert got.state == user_pb2.USER_STATE_SUSPENDED
    assert set_state(world.admin, user_pb2.USER_STATE_ACTIVE) == grpc.StatusCode.OK


# ---- identity headers ------------------------------------------------------------------------------
def test_identity_headers_sent_by_a_client_gain_nothing(channel: grpc.Channel, world: World) -> None:
    a_id = world.a_user.user_id
    forged = (("x-shop-user-id", a_id), ("x-shop-roles", "admin"))
    anonymous = Client(channel, None, forged)
    assert anonymous.code(anonymous.users.GetUser, user_pb2.GetUserRequest(user_id=a_id)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    b_as_a = Client(channel, world.b.token, forged)
    assert (
        b_as_a.code(b_as_a.users.GetUser, user_pb2.GetUserRequest(user_id=a_id)) == grpc.StatusCode.NOT_FOUND
    )
    assert (
        b_as_a.code(b_as_a.users.ListUsers, user_pb2.ListUsersRequest()) == grpc.StatusCode.PERMISSION_DENIED
    )
    # Their own record they still see: the edge set the headers from B's token.
    own = b_as_a.call(b_as_a.users.GetUser, user_pb2.GetUserRequest(user_id=world.b_user.user_id))
    assert own.user.user_id == world.b_user.user_id


def _sidecar_call(
    mesh: MeshProcess, instance: str, identity: str, call: Callable[[grpc.Channel], Any]
) -> Any:
    """A call straight to a sidecar's inbound mTLS port with a mesh certificate of `identity`."""
    inst = mesh.instance(instance)
    ca = pki.load_or_create_ca(mesh.run.pki / "ca")
    leaf = pki.issue(ca, load(mesh.topology).spiffe_id(identity))
    creds = grpc.ssl_channel_credentials(ca.cert_pem, leaf.key_pem, leaf.cert_pem)
    options = [("grpc.ssl_target_name_override", f"{inst['service']}.mesh.local")]
    with grpc.secure_channel(f"127.0.0.1:{inst['inbound_port']}", creds, options=options) as ch:
        try:
            return call(ch)
        except grpc.RpcError as exc:
            return exc.code()


def test_sidecars_refuse_identity_headers_from_identities_that_may_not_assert_them(
    mesh: MeshProcess, world: World
) -> None:
    forged = (("x-shop-user-id", world.a_user.user_id), ("x-shop-roles", "admin"))

    def health(metadata: tuple[tuple[str, str], ...]) -> Callable[[grpc.Channel], Any]:
        def call(ch: grpc.Channel) -> Any:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT, metadata=metadata).status

        return call

    serving = health_pb2.HealthCheckResponse.SERVING
    for instance in ("user-0", "payment-0"):
        # `order` may call health and may assert a customer; `payment`/`user` may call health only.
        other = "payment" if instance == "user-0" else "user"
        assert _sidecar_call(mesh, instance, other, health(())) == serving
        assert _sidecar_call(mesh, instance, other, health(forged)) == grpc.StatusCode.PERMISSION_DENIED
        assert _sidecar_call(mesh, instance, "order", health(forged)) == serving

    # What an allowed asserter passes on reaches the domain: order asserting B gets no A payment.
    def get_payment(ch: grpc.Channel) -> Any:
        stub = payment_pb2_grpc.PaymentServiceStub(ch)
        metadata = (("x-shop-user-id", world.b_user.user_id), ("x-shop-roles", '["customer"]'))
        return stub.GetPayment(
            payment_pb2.GetPaymentRequest(payment_id=world.payment_id), timeout=TIMEOUT, metadata=metadata
        )

    assert _sidecar_call(mesh, "payment-0", "order", get_payment) == grpc.StatusCode.NOT_FOUND


# ---- the README walk-through, with grpcurl ------------------------------------------------------------
def _grpcurl(mesh: MeshProcess, method: str, data: dict[str, Any], token: str | None = None) -> list[Any]:
    headers = [f"authorization: Bearer {token}"] if token else []
    proc = run_grpcurl(mesh.edge, method, data=data, headers=headers, max_time=60)
    assert proc.returncode == 0, f"{method}: {proc.stderr}"
    decoder, text, out, i = json.JSONDecoder(), proc.stdout.strip(), [], 0
    while i < len(text):
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def test_walkthrough_sign_up_token_order_watch_to_paid_cancel_refund(mesh: MeshProcess) -> None:
    email = f"walk-{uuid.uuid4().hex[:8]}@example.com"
    user = _grpcurl(
        mesh,
        "shop.user.v1.UserService/CreateUser",
        {"request_id": f"u-{uuid.uuid4()}", "email": email, "display_name": "Ada"},
    )[0]["user"]
    # The token command as the README shows it.
    minted = subprocess.run(
        [
            sys.executable,
            "-m",
            "shop_mesh.mesh",
            "--run-dir",
            str(mesh.run.root),
            "token",
            "--user",
            user["user_id"],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = minted.stdout.strip()
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == user["user_id"]
    denied = run_grpcurl(mesh.edge, "shop.user.v1.UserService/GetUser", data={"user_id": user["user_id"]})
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    order = _grpcurl(
        mesh,
        "shop.order.v1.OrderService/CreateOrder",
        {
            "request_id": f"o-{uuid.uuid4()}",
            "user_id": user["user_id"],
            "line_items": [
                {"sku": "book", "quantity": 1, "unit_price": {"currency_code": "EUR", "units": 12}}
            ],
            "payment_method_token": "tok_visa",
        },
        token,
    )[0]["order"]
    events = _grpcurl(mesh, "shop.order.v1.OrderService/WatchOrder", {"order_id": order["order_id"]}, token)
    assert events[-1]["event"]["state"] == "ORDER_STATE_PAID"  # the stream ended OK at PAID
    cancelled = _grpcurl(
        mesh,
        "shop.order.v1.OrderService/CancelOrder",
        {"request_id": f"c-{uuid.uuid4()}", "order_id": order["order_id"], "reason": "changed my mind"},
        token,
    )[0]["order"]
    assert cancelled["state"] == "ORDER_STATE_CANCELLED"
    payments = _grpcurl(
        mesh, "shop.payment.v1.PaymentService/ListPayments", {"order_id": order["order_id"]}, token
    )[0]["payments"]
    assert [p["state"] for p in payments] == ["PAYMENT_STATE_REFUNDED"]
    assert Path(mesh.run.jwt / tokens.KEY_FILE).stat().st_mode & 0o077 == 0  # the key stays private
