"""The order model's state machine, pure: no database, no ports, no event loop (milliseconds).

The rule that keeps the domain so (no SQLAlchemy, gRPC or protobuf, even transitively) is checked for
every service in test_domain_imports.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from shop_mesh.services.common.money import Money
from shop_mesh.services.order.model import (
    TERMINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    LineItem,
    NewOrder,
    Order,
    OrderState,
    Step,
    allowed,
    apply,
    change,
    new_order,
    transition,
)

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=3)
S = OrderState


def _order(state: OrderState = S.PENDING, **fields: object) -> Order:
    new = NewOrder("req-1", "usr_ada", (LineItem("A", 2, Money.of("EUR", 10)),), "tok_visa")
    return replace(new_order(new, "ord_1", T0), state=state, **fields)  # type: ignore[arg-type]


def test_a_new_order_is_pending_with_its_total_and_nothing_paid() -> None:
    order = _order()
    assert (order.state, order.total, order.payment_id, order.reason) == (
        S.PENDING,
        Money.of("EUR", 20),
        "",
        "",
    )
    assert order.create_time == order.update_time == T0 and not order.release_pending


# Every step from every state: where it ends, or that it is refused. One row per step.
EXPECTED: dict[Step, dict[OrderState, OrderState]] = {
    Step.AUTHORIZED: {S.PENDING: S.PAYMENT_AUTHORIZED},
    Step.DECLINED: {S.PENDING: S.REJECTED},
    Step.CAPTURED: {S.PAYMENT_AUTHORIZED: S.AWAITING_SETTLEMENT},
    Step.VOIDED: {S.PAYMENT_AUTHORIZED: S.CANCELLED},
    Step.SETTLED: {S.AWAITING_SETTLEMENT: S.PAID},
    Step.REFUNDED: {S.AWAITING_SETTLEMENT: S.CANCELLED},
    Step.ABANDONED: {s: S.REJECTED for s in (S.PENDING, S.PAYMENT_AUTHORIZED, S.AWAITING_SETTLEMENT)},
    Step.CANCELLED: {
        s: S.CANCELLED for s in (S.PENDING, S.PAYMENT_AUTHORIZED, S.AWAITING_SETTLEMENT, S.PAID)
    },
}


@pytest.mark.parametrize("step", list(Step))
@pytest.mark.parametrize("state", list(OrderState))
def test_every_step_from_every_state(step: Step, state: OrderState) -> None:
    target = EXPECTED[step].get(state)
    if target is None:
        assert not allowed(state, step)
        with pytest.raises(IllegalTransition):
            transition(_order(state), step, T1, reason="WHY")
        return
    after = transition(_order(state), step, T1, reason="WHY")
    assert (after.state, after.update_time, after.create_time) == (target, T1, T0)


def test_the_table_is_the_expected_one_and_nothing_more() -> None:
    assert set(TRANSITIONS) == set(EXPECTED)
    for step, moves in EXPECTED.items():
        assert TRANSITIONS[step].sources == set(moves)


def test_only_a_paid_order_leaves_a_final_state_and_only_by_cancel() -> None:
    leaving = {(state, step) for step, t in TRANSITIONS.items() for state in t.sources if state.terminal}
    assert leaving == {(S.PAID, Step.CANCELLED)}
    assert {S.REJECTED, S.CANCELLED} <= TERMINAL_STATES


def test_every_state_is_reachable_and_every_running_saga_can_end() -> None:
    edges = {(s, t.target) for t in TRANSITIONS.values() for s in t.sources}
    reached, frontier = {S.PENDING}, [S.PENDING]
    while frontier:
        state = frontier.pop()
        for source, target in edges:
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(OrderState)
    for state in set(OrderState) - TERMINAL_STATES:
        assert any(source is state and target.terminal for source, target in edges), state


def test_reasons_fixed_by_the_step_win_and_cancel_has_a_default() -> None:
    assert transition(_order(), Step.DECLINED, T1, reason="other").reason == "PAYMENT_DECLINED"
    assert transition(_order(S.PAYMENT_AUTHORIZED), Step.VOIDED, T1).reason == "PAYMENT_VOIDED"
    assert transition(_order(S.AWAITING_SETTLEMENT), Step.REFUNDED, T1).reason == "PAYMENT_REFUNDED"
    assert transition(_order(S.PAID), Step.CANCELLED, T1, reason="").reason == "CANCELLED"
    assert (
        transition(_order(S.PAID), Step.CANCELLED, T1, reason="changed my mind").reason == "changed my mind"
    )
    assert transition(_order(), Step.ABANDONED, T1, reason="SAGA_TIMEOUT").reason == "SAGA_TIMEOUT"
    # A step with no reason of its own keeps the order's.
    assert transition(_order(S.AWAITING_SETTLEMENT, reason="kept"), Step.SETTLED, T1).reason == "kept"
    with pytest.raises(ValueError, match="records why"):
        change(_order(), Step.ABANDONED)


def test_payment_id_is_recorded_by_the_authorization_outcome() -> None:
    assert transition(_order(), Step.AUTHORIZED, T1, payment_id="pay_1").payment_id == "pay_1"
    assert transition(_order(), Step.DECLINED, T1, payment_id="pay_2").payment_id == "pay_2"
    authorized = _order(S.PAYMENT_AUTHORIZED, payment_id="pay_1")
    assert transition(authorized, Step.CAPTURED, T1).payment_id == "pay_1"


@pytest.mark.parametrize(
    ("state", "step", "pending"),
    [
        (S.PENDING, Step.CANCELLED, True),  # an authorization may still land: the reconciler looks
        (S.PAYMENT_AUTHORIZED, Step.CANCELLED, False),  # the cancel released the known payment
        (S.PAID, Step.CANCELLED, False),
        (S.PENDING, Step.ABANDONED, True),
        (S.AWAITING_SETTLEMENT, Step.ABANDONED, True),
    ],
)
def test_release_pending_is_left_by_cancel_while_pending_and_by_every_abandon(
    state: OrderState, step: Step, pending: bool
) -> None:
    assert transition(_order(state), step, T1, reason="R").release_pending is pending


def test_steps_that_act_on_the_state_read_only_apply_to_that_state() -> None:
    """Cancel and abandon released the money of the state they read: if the order moved on
    meanwhile, the stored update must not apply (the use case retries or yields)."""
    read = _order(S.PAYMENT_AUTHORIZED)
    update = change(read, Step.CANCELLED, reason="")
    assert update.guard == {S.PAYMENT_AUTHORIZED}
    assert apply(replace(read, state=S.AWAITING_SETTLEMENT), update, T1) is None
    assert apply(read, update, T1) == transition(read, Step.CANCELLED, T1)
    with pytest.raises(IllegalTransition):
        change(_order(S.REJECTED), Step.CANCELLED)


def test_payment_facts_apply_to_any_source_state_even_from_a_stale_read() -> None:
    """The settlement consumer records CAPTURED then SETTLED on the order it read: on PostgreSQL
    a saga step may have moved the stored row meanwhile, and the guard, not the read, decides."""
    stale = _order(S.PAYMENT_AUTHORIZED, payment_id="pay_1")
    settled = change(stale, Step.SETTLED)
    assert settled.guard == {S.AWAITING_SETTLEMENT}
    stored_now = replace(stale, state=S.AWAITING_SETTLEMENT)
    paid = apply(stored_now, settled, T1)
    assert paid is not None and paid.state is S.PAID
    assert apply(stale, settled, T1) is None
