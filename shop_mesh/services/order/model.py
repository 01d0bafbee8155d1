"""The order model: entities, values and the state machine. Pure: no I/O, no clock, no ports.

Every state change of an order after its creation is a `Step`, and `TRANSITIONS` is the one table
that says from which states a step may start, where it ends and what it records. The use cases
never write a state themselves: they ask `change()` for the conditional update a step stores, and
`transition()` is the same change applied in memory (the unit tests' reference; the repository's
conditional update returns the same order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from types import MappingProxyType

from shop_mesh.services.common.errors import NotFound
from shop_mesh.services.common.idempotency import fingerprint
from shop_mesh.services.common.money import Money


class OrderState(Enum):
    PENDING = "PENDING"
    PAYMENT_AUTHORIZED = "PAYMENT_AUTHORIZED"
    AWAITING_SETTLEMENT = "AWAITING_SETTLEMENT"
    PAID = "PAID"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({OrderState.PAID, OrderState.REJECTED, OrderState.CANCELLED})


@dataclass(frozen=True)
class LineItem:
    sku: str
    quantity: int
    unit_price: Money


@dataclass(frozen=True)
class Order:
    order_id: str
    user_id: str
    line_items: tuple[LineItem, ...]
    total: Money
    state: OrderState
    payment_id: str
    reason: str
    create_time: datetime
    update_time: datetime
    # Kept for the reconciler, which may have to re-run the authorization; never returned to clients.
    payment_method_token: str = ""
    # Cancelled before its payment was known: the reconciler checks for an authorization to release.
    release_pending: bool = False


@dataclass(frozen=True)
class OrderEvent:
    sequence: int
    order_id: str
    state: OrderState
    reason: str
    order: Order  # the order as it was right after the event
    create_time: datetime


@dataclass(frozen=True)
class NewOrder:
    """A validated CreateOrder request."""

    request_id: str
    user_id: str
    line_items: tuple[LineItem, ...]
    payment_method_token: str

    def fingerprint(self) -> str:
        return fingerprint(
            {
                "user_id": self.user_id,
                "items": [
                    [i.sku, i.quantity, i.unit_price.currency_code, i.unit_price.total_nanos]
                    for i in self.line_items
                ],
                "token": self.payment_method_token,
            }
        )


def order_total(items: Sequence[LineItem]) -> Money:
    total = Money.zero(items[0].unit_price.currency_code)
    for item in items:
        total = total + item.unit_price.times(item.quantity)
    return total


def new_order(new: NewOrder, order_id: str, now: datetime) -> Order:
    """The order a CreateOrder request creates: PENDING, nothing paid yet."""
    return Order(
        order_id=order_id,
        user_id=new.user_id,
        line_items=new.line_items,
        total=order_total(new.line_items),
        state=OrderState.PENDING,
        payment_id="",
        reason="",
        create_time=now,
        update_time=now,
        payment_method_token=new.payment_method_token,
    )


def order_not_found(order_id: str) -> NotFound:
    return NotFound(f"order {order_id} not found", reason="ORDER_NOT_FOUND")


# ---- the state machine ---------------------------------------------------------------------------


class Step(Enum):
    """What happened to an order (after its creation), named by the fact that moves it."""

    AUTHORIZED = "AUTHORIZED"  # payment authorized the total
    DECLINED = "DECLINED"  # payment declined it
    CAPTURED = "CAPTURED"  # the money was taken (our capture, or a settlement that overtook it)
    VOIDED = "VOIDED"  # found voided while capturing: a cancel voided it and did not get to commit
    SETTLED = "SETTLED"  # the captured money settled
    REFUNDED = "REFUNDED"  # found given back while awaiting settlement
    ABANDONED = "ABANDONED"  # cannot finish (refused upstream, past its bound): compensate, reject
    CANCELLED = "CANCELLED"  # the customer (or an admin) cancelled it


@dataclass(frozen=True)
class Transition:
    sources: frozenset[OrderState]
    target: OrderState
    # The reason it records: fixed by the step, else the caller's (`default_reason` if none given),
    # else the order's reason stays.
    reason: str | None = None
    default_reason: str | None = None
    # True: the caller acted on the state it read (it released that state's money), so the update
    # applies only if the order is still in that state. False: a payment fact that holds in any
    # source state, so it applies to whichever one the order is in by the time it is stored.
    as_read: bool = False
    # Leaving one of these states leaves a release pending (an authorization may exist or still
    # land); None: the step does not touch release_pending.
    release_from: frozenset[OrderState] | None = None


_S = OrderState
_RUNNING = frozenset({_S.PENDING, _S.PAYMENT_AUTHORIZED, _S.AWAITING_SETTLEMENT})

TRANSITIONS: Mapping[Step, Transition] = MappingProxyType(
    {
        Step.AUTHORIZED: Transition(frozenset({_S.PENDING}), _S.PAYMENT_AUTHORIZED),
        Step.DECLINED: Transition(frozenset({_S.PENDING}), _S.REJECTED, reason="PAYMENT_DECLINED"),
        Step.CAPTURED: Transition(frozenset({_S.PAYMENT_AUTHORIZED}), _S.AWAITING_SETTLEMENT),
        Step.VOIDED: Transition(frozenset({_S.PAYMENT_AUTHORIZED}), _S.CANCELLED, reason="PAYMENT_VOIDED"),
        Step.SETTLED: Transition(frozenset({_S.AWAITING_SETTLEMENT}), _S.PAID),
        Step.REFUNDED: Transition(
            frozenset({_S.AWAITING_SETTLEMENT}), _S.CANCELLED, reason="PAYMENT_REFUNDED"
        ),
        Step.ABANDONED: Transition(_RUNNING, _S.REJECTED, as_read=True, release_from=_RUNNING),
        # A PAID order may still be cancelled (refunded); a final REJECTED/CANCELLED one may not.
        Step.CANCELLED: Transition(
            _RUNNING | {_S.PAID},
            _S.CANCELLED,
            default_reason="CANCELLED",
            as_read=True,
            release_from=frozenset({_S.PENDING}),
        ),
    }
)


def allowed(state: OrderState, step: Step) -> bool:
    """Whether an order in `state` may take `step`."""
    return state in TRANSITIONS[step].sources


class IllegalTransition(Exception):
    """A use case asked for a step its order's state does not allow: a bug, not a client error."""

    def __init__(self, state: OrderState, step: Step):
        super().__init__(f"{step.value} is not a transition from {state.value}")
        self.state = state
        self.step = step


@dataclass(frozen=True)
class Change:
    """One step as the conditional update that stores it: applied only while the order is in
    `guard`; None fields are left as they are."""

    step: Step
    guard: frozenset[OrderState]
    target: OrderState
    reason: str | None
    payment_id: str | None
    release_pending: bool | None


def change(order: Order, step: Step, *, reason: str | None = None, payment_id: str | None = None) -> Change:
    """The update that records `step` for `order` (as read). A step that acts on the state as read
    requires that state to be one of its sources (IllegalTransition); a payment fact does not, since
    the order read may be stale and the guard decides."""
    t = TRANSITIONS[step]
    if t.as_read:
        if order.state not in t.sources:
            raise IllegalTransition(order.state, step)
        guard = frozenset({order.state})
    else:
        guard = t.sources
    if step is Step.ABANDONED and not reason:
        raise ValueError("an abandoned saga records why")
    return Change(
        step=step,
        guard=guard,
        target=t.target,
        reason=t.reason or reason or t.default_reason,
        payment_id=payment_id,
        release_pending=None if t.release_from is None else order.state in t.release_from,
    )


def apply(order: Order, update: Change, now: datetime) -> Order | None:
    """`update` applied to `order` in memory: the order after it, or None where the guard refuses
    (what the repository's conditional update does with the stored row)."""
    if order.state not in update.guard:
        return None
    return replace(
        order,
        state=update.target,
        update_time=now,
        reason=order.reason if update.reason is None else update.reason,
        payment_id=order.payment_id if update.payment_id is None else update.payment_id,
        release_pending=order.release_pending if update.release_pending is None else update.release_pending,
    )


def transition(
    order: Order, step: Step, now: datetime, *, reason: str | None = None, payment_id: str | None = None
) -> Order:
    """The order after `step`; IllegalTransition if its state is not one of the step's sources."""
    if not allowed(order.state, step):
        raise IllegalTransition(order.state, step)
    updated = apply(order, change(order, step, reason=reason, payment_id=payment_id), now)
    assert updated is not None  # the state is a source, hence in the guard
    return updated
