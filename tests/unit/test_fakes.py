"""The in-memory fakes keep the promises the use cases rely on (the SQL adapters' semantics), and the
tests on them touch no database: neither they nor the fakes load SQLAlchemy or a SQL adapter."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from shop_mesh.services.common.errors import AlreadyExists
from shop_mesh.services.common.money import Money
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import LineItem, NewOrder, OrderState, Step, change, new_order
from shop_mesh.services.payment.domain import AuthorizeCommand, PaymentState, capture, decide_authorization
from shop_mesh.services.user.domain import User, UserState
from tests.unit.fakes.clock import START
from tests.unit.fakes.order import InMemoryOrderRepository, order_units
from tests.unit.fakes.payment import payment_units
from tests.unit.fakes.units import InMemorySequences, ReadOnlyUnit
from tests.unit.fakes.user import InMemoryUserRepository, user_units

ROOT = Path(__file__).resolve().parents[2]
NO_DATABASE = (
    "tests.unit.fakes.units",
    "tests.unit.fakes.user",
    "tests.unit.fakes.payment",
    "tests.unit.fakes.order",
    "tests.unit.fakes.upstreams",
    "tests.unit.test_user_domain_in_memory",
    "tests.unit.test_payment_use_cases",
    "tests.unit.test_order_use_cases",
)
FORBIDDEN = ("sqlalchemy", "shop_mesh.services.common.db", "shop_mesh.services.common.idempotency_sql")


def test_the_fakes_and_the_tests_on_them_load_no_database() -> None:
    # A fresh interpreter: what this pytest process already imported would hide it.
    code = (
        "import importlib, sys\n"
        f"for m in {NO_DATABASE!r}: importlib.import_module(m)\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == []


# ---- the unit of work -----------------------------------------------------------------------------


def _user(user_id: str, email: str, state: UserState = UserState.ACTIVE) -> User:
    return User(user_id, email, "N", state, START, START)


async def test_a_write_publishes_only_if_it_returns() -> None:
    units = user_units()

    def add_then_fail(session: Session) -> None:
        InMemoryUserRepository(session).insert(_user("usr_1", "a@b.co"))
        raise RuntimeError("after the insert")

    with pytest.raises(RuntimeError):
        await units.write(add_then_fail)
    assert units.committed.users == {} and units.commits == 0
    await units.write(lambda session: InMemoryUserRepository(session).insert(_user("usr_1", "a@b.co")))
    assert list(units.committed.users) == ["usr_1"] and units.commits == 1


async def test_a_read_unit_sees_the_committed_state_and_may_not_write() -> None:
    units = user_units()
    await units.write(lambda session: InMemoryUserRepository(session).insert(_user("usr_1", "a@b.co")))
    assert await units.read(lambda session: InMemoryUserRepository(session).get("usr_1")) is not None
    with pytest.raises(ReadOnlyUnit):
        await units.read(lambda session: InMemoryUserRepository(session).save(_user("usr_1", "x@b.co")))
    assert units.committed.users["usr_1"].email == "a@b.co"


async def test_sequences_count_per_log_within_the_unit_that_writes() -> None:
    units = order_units()
    orders, other = InMemorySequences("order_events"), InMemorySequences("other")
    assert await units.write(lambda s: [orders.next(s), orders.next(s), other.next(s)]) == [1, 2, 1]

    def allocate_then_fail(session: Session) -> None:
        orders.next(session)
        raise RuntimeError

    with pytest.raises(RuntimeError):
        await units.write(allocate_then_fail)
    assert await units.write(orders.next) == 3  # a rolled-back allocation is not used up


# ---- the repositories' rules ----------------------------------------------------------------------


async def test_an_email_is_unique_among_live_users() -> None:
    units = user_units()
    await units.write(lambda s: InMemoryUserRepository(s).insert(_user("usr_1", "a@b.co", UserState.DELETED)))
    await units.write(lambda s: InMemoryUserRepository(s).insert(_user("usr_2", "a@b.co")))
    with pytest.raises(AlreadyExists) as taken:
        await units.write(lambda s: InMemoryUserRepository(s).insert(_user("usr_3", "a@b.co")))
    assert taken.value.reason == "EMAIL_TAKEN"


async def test_a_payment_save_is_conditional_on_the_state_read() -> None:
    units = payment_units()
    payment, _ = decide_authorization(
        AuthorizeCommand("r", "ord_1", Money.of("EUR", 1), "tok"), 100, START, "pay_1"
    )
    await units.write(lambda repo: repo.add(payment))
    captured = capture(payment, START + timedelta(seconds=1))
    assert not await units.write(lambda repo: repo.save(captured, expected_state=PaymentState.CAPTURED))
    assert await units.write(lambda repo: repo.save(captured, expected_state=PaymentState.AUTHORIZED))
    stored = await units.read(lambda repo: repo.get("pay_1"))
    assert stored == captured


async def test_order_rows_keep_the_sql_rules() -> None:
    units = order_units()
    items = (LineItem("A", 1, Money.of("EUR", 1)),)
    order = new_order(NewOrder("req-1", "usr_1", items, "tok"), "ord_1", START)
    twin = new_order(NewOrder("req-1", "usr_1", items, "tok"), "ord_2", START)
    assert await units.write(lambda s: InMemoryOrderRepository(s).insert(order, "req-1", "fp"))
    assert not await units.write(lambda s: InMemoryOrderRepository(s).insert(twin, "req-1", "fp"))
    # A transition applies only from a state of its guard.
    settle = change(order, Step.SETTLED)
    assert await units.write(lambda s: InMemoryOrderRepository(s).transition_to(order, settle, START)) is None
    authorize = change(order, Step.AUTHORIZED, payment_id="pay_1")
    moved = await units.write(lambda s: InMemoryOrderRepository(s).transition_to(order, authorize, START))
    assert moved is not None and (moved.state, moved.payment_id) == (OrderState.PAYMENT_AUTHORIZED, "pay_1")
    # A reconciler attempt is counted once per `seen`: a second reconciler that read the same loses.
    later = START + timedelta(seconds=5)
    assert await units.write(lambda s: InMemoryOrderRepository(s).claim_attempt("ord_1", 0, later))
    assert not await units.write(lambda s: InMemoryOrderRepository(s).claim_attempt("ord_1", 0, later))
    assert await units.write(lambda s: InMemoryOrderRepository(s).claim_attempt("ord_1", 1, later))
    # The consumer cursor only moves forward.
    assert await units.write(lambda s: InMemoryOrderRepository(s).advance_cursor("payment-events", 4))
    assert not await units.write(lambda s: InMemoryOrderRepository(s).advance_cursor("payment-events", 4))
