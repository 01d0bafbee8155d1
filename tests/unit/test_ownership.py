"""Who may see and change what: the ownership rules of the three domains, without gRPC.

A customer reads and changes only their own user record, orders, payments and streams; another
customer's resource is NOT_FOUND (the same answer as a missing id); admin-only operations are
PERMISSION_DENIED for customers; admins and in-mesh services (no identity) may do everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shop_mesh.services.common import principal as principals
from shop_mesh.services.common.context import acting_for, current_principal, principal_var
from shop_mesh.services.common.db import Database
from shop_mesh.services.common.errors import NotFound, PermissionDenied
from shop_mesh.services.common.idempotency_sql import IdempotencyStore
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.pagination import PageRequest
from shop_mesh.services.common.principal import SERVICE, Kind, admin, customer, from_headers, to_headers
from shop_mesh.services.order.model import OrderState
from shop_mesh.services.payment.domain import AuthorizeCommand, PaymentProcessor
from shop_mesh.services.payment.repository import PaymentUnitsOnDatabase
from shop_mesh.services.payment.repository import idempotency_keys as payment_keys
from shop_mesh.services.payment.repository import metadata as payment_metadata
from shop_mesh.services.user.domain import NewUser, UserChanges, UserService, UserState
from shop_mesh.services.user.repository import SqlUserRepository, idempotency_keys
from shop_mesh.services.user.repository import metadata as user_metadata
from tests.unit.test_order_domain import _new, world  # noqa: F401 - the order fixture

# --- the principal ------------------------------------------------------------------------------


def test_no_identity_headers_is_the_mesh_service() -> None:
    assert from_headers(None, None) is SERVICE
    assert SERVICE.privileged and SERVICE.owns("usr_anyone")


def test_identity_headers_make_a_customer_or_an_admin() -> None:
    ada = from_headers("usr_ada", "customer")
    assert (ada.kind, ada.user_id) == (Kind.CUSTOMER, "usr_ada")
    assert ada.owns("usr_ada") and not ada.owns("usr_bob") and not ada.privileged
    assert from_headers("ops", "customer,admin").kind is Kind.ADMIN
    # As the edge copies the token's roles claim (a JSON list).
    assert from_headers("ops", '["customer","admin"]') == principals.Principal(
        Kind.ADMIN, "ops", frozenset({"customer", "admin"})
    )


@pytest.mark.parametrize(("user_id", "roles"), [("", "customer"), (None, "customer"), ("", ""), ("", None)])
def test_any_identity_header_without_a_user_owns_nothing(user_id: str | None, roles: str | None) -> None:
    """A token that names nobody never becomes a service call with every right."""
    nobody = from_headers(user_id, roles)
    assert nobody.kind is Kind.CUSTOMER and not nobody.privileged
    assert not nobody.owns("") and not nobody.owns("usr_ada")


def test_identity_round_trips_through_headers() -> None:
    for who in (customer("usr_ada"), admin("ops")):
        headers = dict(to_headers(who))
        assert from_headers(headers[principals.USER_ID_HEADER], headers[principals.ROLES_HEADER]) == who
    assert to_headers(SERVICE) == []


async def test_acting_for_sets_and_restores_the_principal() -> None:
    assert current_principal() is SERVICE
    with acting_for(customer("usr_ada")):
        assert current_principal() == customer("usr_ada")
        # Tasks started inside inherit it (the saga's upstream calls).
        assert await asyncio.create_task(_principal()) == customer("usr_ada")
    assert principal_var.get() is SERVICE


async def _principal() -> principals.Principal:
    return current_principal()


# --- users --------------------------------------------------------------------------------------


@pytest.fixture
async def users(tmp_path: Path) -> AsyncIterator[UserService]:
    db = Database(f"sqlite:///{tmp_path / 'user.db'}", user_metadata)
    await db.create_schema()
    try:
        yield UserService(db, SqlUserRepository, IdempotencyStore(idempotency_keys))
    finally:
        await db.dispose()


async def test_customer_reads_and_changes_only_their_own_user(users: UserService) -> None:
    ada = await users.create_user("u-ada", NewUser("ada@example.com", "Ada"))
    bob = await users.create_user("u-bob", NewUser("bob@example.com", "Bob"))
    as_ada = customer(ada.user_id)
    assert await users.get_user(ada.user_id, principal=as_ada) == ada
    missing = new_id("usr")
    for user_id in (bob.user_id, missing):  # another's record and a missing one: the same answer
        with pytest.raises(NotFound) as err:
            await users.get_user(user_id, principal=as_ada)
        assert err.value.reason == "USER_NOT_FOUND"
        with pytest.raises(NotFound):
            await users.update_user("x1", UserChanges(user_id, email="evil@example.com"), principal=as_ada)
        with pytest.raises(NotFound):
            await users.delete_user("x2", user_id, principal=as_ada)
    renamed = await users.update_user("r1", UserChanges(ada.user_id, display_name="Ada L."), principal=as_ada)
    assert renamed.display_name == "Ada L."
    assert (await users.get_user(bob.user_id)).email == "bob@example.com"  # untouched


async def test_only_admins_list_users_and_change_a_state(users: UserService) -> None:
    ada = await users.create_user("u-ada", NewUser("ada@example.com", "Ada"))
    as_ada = customer(ada.user_id)
    with pytest.raises(PermissionDenied) as err:
        await users.list_users(None, PageRequest(10, None), principal=as_ada)
    assert err.value.reason == "ADMIN_ONLY"
    suspended = await users.update_user(
        "s1", UserChanges(ada.user_id, state=UserState.SUSPENDED), principal=admin()
    )
    assert suspended.state is UserState.SUSPENDED
    # The customer cannot lift their own suspension.
    with pytest.raises(PermissionDenied):
        await users.update_user("s2", UserChanges(ada.user_id, state=UserState.ACTIVE), principal=as_ada)
    assert (await users.get_user(ada.user_id)).state is UserState.SUSPENDED
    assert [
        u.user_id for u in (await users.list_users(None, PageRequest(10, None), principal=admin())).items
    ] == [ada.user_id]


# --- orders -------------------------------------------------------------------------------------


async def test_customer_sees_and_cancels_only_their_own_orders(world) -> None:  # noqa: F811
    service, _, _, _ = world
    order = await service.saga.create_order(_new())
    owner, other = customer(order.user_id), customer(new_id("usr"))
    assert (await service.queries.get_order(order.order_id, principal=owner)).order_id == order.order_id
    missing = new_id("ord")
    for order_id in (order.order_id, missing):
        with pytest.raises(NotFound) as err:
            await service.queries.get_order(order_id, principal=other)
        assert err.value.reason == "ORDER_NOT_FOUND"
        with pytest.raises(NotFound):
            await service.cancellation.cancel_order("c-evil", order_id, "mine now", principal=other)
        with pytest.raises(NotFound):
            async for _ in service.queries.watch_order(order_id, 0, asyncio.Event(), principal=other):
                pass
    assert (await service.queries.get_order(order.order_id)).state is OrderState.AWAITING_SETTLEMENT
    # Lists: the customer's own, whatever user_id they name; another user's id is NOT_FOUND.
    mine = await service.queries.list_orders(None, PageRequest(10, None), principal=owner)
    assert [o.order_id for o in mine.items] == [order.order_id]
    assert (await service.queries.list_orders(None, PageRequest(10, None), principal=other)).items == []
    with pytest.raises(NotFound):
        await service.queries.list_orders(order.user_id, PageRequest(10, None), principal=other)
    cancelled = await service.cancellation.cancel_order(
        "c-1", order.order_id, "changed my mind", principal=owner
    )
    assert cancelled.state is OrderState.CANCELLED


async def test_customer_cannot_order_on_another_account(world) -> None:  # noqa: F811
    service, _, payments, _ = world
    new = _new()
    with pytest.raises(PermissionDenied) as err:
        await service.saga.create_order(new, principal=customer(new_id("usr")))
    assert err.value.reason == "NOT_YOUR_ACCOUNT"
    assert payments.calls == []
    # The owner may; an admin may order for a customer too.
    assert (await service.saga.create_order(new, principal=customer(new.user_id))).user_id == new.user_id
    assert (await service.saga.create_order(_new("req-2"), principal=admin())).user_id == new.user_id


async def test_admin_and_service_see_every_order(world) -> None:  # noqa: F811
    service, _, _, _ = world
    order = await service.saga.create_order(_new())
    for who in (admin(), SERVICE):
        assert (await service.queries.get_order(order.order_id, principal=who)).order_id == order.order_id
        assert len((await service.queries.list_orders(None, PageRequest(10, None), principal=who)).items) == 1


async def test_the_saga_acts_for_the_orders_customer(world) -> None:  # noqa: F811
    """Whoever drives it (here an admin), the payment calls assert the order's customer."""
    service, _, payments, _ = world
    seen: list[principals.Principal] = []
    authorize = payments.authorize

    async def spy(*args: object) -> object:
        seen.append(current_principal())
        return await authorize(*args)

    payments.authorize = spy
    order = await service.saga.create_order(_new(), principal=admin())
    assert seen == [customer(order.user_id)]
    assert current_principal() is SERVICE


# --- payments -----------------------------------------------------------------------------------


@pytest.fixture
async def processor(tmp_path: Path) -> AsyncIterator[PaymentProcessor]:
    db = Database(f"sqlite:///{tmp_path / 'payment.db'}", payment_metadata)
    await db.create_schema()
    units = PaymentUnitsOnDatabase(db)
    await units.write(lambda repo: repo.ensure_sequence())
    try:
        yield PaymentProcessor(
            units,
            IdempotencyStore(payment_keys),
            decline_limit_units=10_000,
            settlement_delay=0,
            settlement_poll_interval=1,
            event_poll_interval=0.05,
        )
    finally:
        await db.dispose()


def _authorize(order_id: str) -> AuthorizeCommand:
    return AuthorizeCommand(f"{order_id}:authorize", order_id, Money.of("EUR", 12), "tok_visa")


async def test_payments_belong_to_the_customer_order_asserted(processor: PaymentProcessor) -> None:
    ada, bob = customer(new_id("usr")), customer(new_id("usr"))
    ada_order, bob_order = new_id("ord"), new_id("ord")
    paid = await processor.authorize(_authorize(ada_order), principal=ada)
    await processor.authorize(_authorize(bob_order), principal=bob)
    assert await processor.get(paid.payment_id, principal=ada) == paid
    with pytest.raises(NotFound) as err:
        await processor.get(paid.payment_id, principal=bob)
    assert err.value.reason == "PAYMENT_NOT_FOUND"
    # Listing: a customer's own payments, of one of their orders; another's order is NOT_FOUND.
    page = PageRequest(size=10, after_key=None)
    assert [p.payment_id for p in (await processor.list_payments(None, page, principal=ada)).items] == [
        paid.payment_id
    ]
    assert len((await processor.list_payments(ada_order, page, principal=ada)).items) == 1
    with pytest.raises(NotFound):
        await processor.list_payments(ada_order, page, principal=bob)
    for who in (admin(), SERVICE):
        assert len((await processor.list_payments(None, page, principal=who)).items) == 2
        assert await processor.get(paid.payment_id, principal=who) == paid


async def test_every_orders_payment_events_are_for_admins_and_services(processor: PaymentProcessor) -> None:
    ada, bob = customer(new_id("usr")), customer(new_id("usr"))
    ada_order = new_id("ord")
    await processor.authorize(_authorize(ada_order), principal=ada)
    with pytest.raises(PermissionDenied) as err:
        async for _ in processor.watch(0, None, asyncio.Event(), principal=ada):
            pass
    assert err.value.reason == "ADMIN_ONLY"
    with pytest.raises(NotFound):
        async for _ in processor.watch(0, ada_order, asyncio.Event(), principal=bob):
            pass
    stopping = asyncio.Event()
    for who in (ada, admin(), SERVICE):
        order_id = None if who.privileged else ada_order
        async for event in processor.watch(0, order_id, stopping, principal=who):
            assert event.order_id == ada_order
            break
