"""The order saga: CreateOrder, and driving an order through payment (authorize, capture), giving up
on it (abandon) and giving its money back (release).

Saga policy (see docs/decisions.md): every step is a conditional state transition committed with its
event, and every upstream call carries a request_id derived from the order (`<order_id>:authorize`,
`:capture`, `:void`, `:refund`). Any number of drivers (the CreateOrder call, a duplicate of it, the
reconciler, another replica) may therefore run the same saga concurrently or again after a crash: the
payment service deduplicates the money movements and the conditional updates let one transition win.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from shop_mesh.services.common.context import acting_for
from shop_mesh.services.common.errors import (
    DomainError,
    FailedPrecondition,
    PermissionDenied,
    Unavailable,
)
from shop_mesh.services.common.idempotency import check_same_payload
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.logging import get_logger
from shop_mesh.services.common.principal import SERVICE, Principal, customer
from shop_mesh.services.common.unit_of_work import Session
from shop_mesh.services.order.model import NewOrder, Order, OrderState, Step, new_order
from shop_mesh.services.order.ports import (
    CAPTURED_STATES,
    OrderLookup,
    Payment,
    PaymentConflict,
    PaymentGateway,
    PaymentState,
    UpstreamRefused,
    UserDirectory,
    UserStatus,
)
from shop_mesh.services.order.store import OrderStore

log = get_logger("order")

# Runs after each saga step is stored, with the step's name; tests inject faults through it.
StepHook = Callable[[str], Awaitable[None]]


async def _no_hook(step: str) -> None:
    return None


async def release(payments: PaymentGateway, order_id: str, payment: Payment, reason: str) -> None:
    """Give back whatever the payment holds: void an authorization, refund a capture."""
    if payment.state is PaymentState.AUTHORIZED:
        try:
            await payments.void(f"{order_id}:void", payment.payment_id)
            return
        except PaymentConflict:
            payment = await payments.get(payment.payment_id)  # captured meanwhile
    if payment.state in CAPTURED_STATES:
        try:
            await payments.refund(f"{order_id}:refund", payment.payment_id, reason)
        except PaymentConflict:
            if (await payments.get(payment.payment_id)).state is not PaymentState.REFUNDED:
                raise  # refunded by someone else is fine; anything else is not


class OrderSaga:
    def __init__(
        self,
        store: OrderStore,
        users: UserDirectory,
        payments: PaymentGateway,
        *,
        step_hook: StepHook = _no_hook,
        lookup: OrderLookup | None = None,
    ):
        """`lookup`, when given, serves CreateOrder's duplicate check; otherwise a read unit and
        the repository do."""
        self.store = store
        self.db = store.db
        self.repo = store.repo
        self._lookup = lookup
        self.users = users
        self.payments = payments
        self.step_hook = step_hook

    # ---- CreateOrder -------------------------------------------------------------------------------

    async def create_order(self, new: NewOrder, *, principal: Principal = SERVICE) -> Order:
        if not principal.owns(new.user_id):
            # The same answer whether that account exists or not.
            raise PermissionDenied("a customer orders on their own account only", reason="NOT_YOUR_ACCOUNT")
        print_ = new.fingerprint()
        found = await self._by_request_id(new.request_id)
        if found is None:
            # Check the user before writing: an unknown or blocked user leaves no order row behind.
            await self._check_user(new.user_id)
            order = await self._insert(new, print_)
        else:
            order = self._same_request(found, print_, new.request_id)
        # A duplicate drives the saga too: harmless (derived payment request ids, conditional updates)
        # and it finishes a saga whose first driver died.
        return await self.advance_for_owner(order)

    async def advance_for_owner(self, order: Order) -> Order:
        """The saga acts for the order's customer (whoever drives it: the customer, an admin, the
        reconciler): payment records them as the owner of the order's payments."""
        with acting_for(customer(order.user_id)):
            return await self.advance(order)

    async def _by_request_id(self, request_id: str) -> tuple[Order, str] | None:
        if self._lookup is not None:
            return await self._lookup.by_request_id(request_id)
        return await self.db.read(lambda session: self.repo(session).get_by_request_id(request_id))

    @staticmethod
    def _same_request(found: tuple[Order, str], print_: str, request_id: str) -> Order:
        # CreateOrder's key is the order row's own (see _insert); the rule is the common one.
        order, stored_print = found
        check_same_payload("CreateOrder", request_id, print_, stored_print)
        return order

    async def _check_user(self, user_id: str) -> None:
        status = await self.users.user_status(user_id)
        if status is None:
            raise FailedPrecondition(
                f"user {user_id} does not exist", reason="USER_NOT_FOUND", metadata={"user_id": user_id}
            )
        if status is not UserStatus.ACTIVE:
            raise FailedPrecondition(
                f"user {user_id} may not place orders",
                reason="USER_NOT_ACTIVE",
                metadata={"user_id": user_id},
            )

    async def _insert(self, new: NewOrder, print_: str) -> Order:
        now = self.store.clock()
        order = new_order(new, new_id("ord"), now)
        # The insert is the claim (the orders' unique request_id), not IdempotentCommands: a key row
        # of its own would add two statements to the hot path (docs/decisions.md).

        def insert(session: Session) -> tuple[Order, str] | None:
            repo = self.repo(session)
            if not repo.insert(order, new.request_id, print_):
                found = repo.get_by_request_id(new.request_id)
                if found is None:  # pragma: no cover - the unique key guarantees a row
                    raise Unavailable("concurrent request with the same request_id; retry")
                return found
            repo.add_event(order, self.store.sequences.next(session), now)
            return None

        found = await self.db.write(insert)
        if found is not None:  # a concurrent duplicate inserted first
            return self._same_request(found, print_, new.request_id)
        self.store.remember(order)
        self.store.events.notify()
        await self.step_hook("created")
        return order

    # ---- the steps -------------------------------------------------------------------------------

    async def advance(self, order: Order) -> Order:
        """Drive the saga as far as it goes synchronously: to AWAITING_SETTLEMENT or a terminal state."""
        for _ in range(8):
            if order.state is OrderState.PENDING:
                order = await self._authorize(order)
            elif order.state is OrderState.PAYMENT_AUTHORIZED:
                order = await self._capture(order)
            else:
                return order
        return order

    async def _authorize(self, order: Order) -> Order:
        try:
            payment = await self.payments.authorize(
                f"{order.order_id}:authorize", order.order_id, order.total, order.payment_method_token
            )
        except UpstreamRefused as exc:
            # Retrying the same authorization can never succeed: end the saga now.
            log.warning("payment_refused", order_id=order.order_id, step="authorize", upstream_code=exc.code)
            return await self.abandon(order, "PAYMENT_REFUSED")
        if payment.state is PaymentState.DECLINED:
            return await self.store.record(order, Step.DECLINED, payment_id=payment.payment_id)
        updated = await self.store.record(order, Step.AUTHORIZED, payment_id=payment.payment_id)
        if updated.state is OrderState.PAYMENT_AUTHORIZED and updated.payment_id == payment.payment_id:
            await self.step_hook("authorize")
        elif updated.state in (OrderState.CANCELLED, OrderState.REJECTED):
            # Cancelled or given up while we were authorizing: this authorization must not be left behind.
            await release(self.payments, updated.order_id, payment, updated.reason or "order cancelled")
            await self.db.write(
                lambda session: self.repo(session).set_release_done(updated.order_id, payment.payment_id)
            )
        return updated

    async def _capture(self, order: Order) -> Order:
        try:
            payment = await self.payments.capture(f"{order.order_id}:capture", order.payment_id)
        except PaymentConflict:
            payment = await self.payments.get(order.payment_id)
        except UpstreamRefused as exc:
            log.warning("payment_refused", order_id=order.order_id, step="capture", upstream_code=exc.code)
            return await self.abandon(order, "PAYMENT_REFUSED")
        if payment.state in CAPTURED_STATES or payment.state is PaymentState.REFUNDED:
            updated = await self.store.record(order, Step.CAPTURED)
            await self.step_hook("capture")
            return updated
        if payment.state is PaymentState.VOIDED:
            # Voided by a cancel that did not get to commit: record the outcome it intended.
            return await self.store.record(order, Step.VOIDED)
        raise Unavailable(f"payment {payment.payment_id} is {payment.state.value}; retry later")

    async def check_settlement(self, order: Order) -> Order:
        """Captured, but no settlement event applied yet: ask the payment itself (the event may have
        been missed). SETTLED -> PAID; given back by someone else -> CANCELLED; else unchanged."""
        payment = await self.payments.get(order.payment_id)
        if payment.state is PaymentState.SETTLED:
            return await self.store.record(order, Step.SETTLED)
        if payment.state in (PaymentState.REFUNDED, PaymentState.VOIDED):
            return await self.store.record(order, Step.REFUNDED)
        return order

    # ---- compensation ----------------------------------------------------------------------------

    async def abandon(self, order: Order, reason: str) -> Order:
        """End a saga that cannot finish: REJECTED with `reason` first (so no driver moves it on), then
        release whatever its payments hold. The order is final either way; what is not released here
        stays release_pending for the reconciler: a release that failed, and for an order given up
        while PENDING, an authorization that may still land (another driver's call in flight) —
        the sweep after RECONCILE_STUCK_AFTER_SECONDS finds it, as for a cancel while PENDING."""
        # The release gets an attempt budget of its own. Reset first: a crash right after the
        # transition must not leave a used-up budget that would give the release up untried.
        await self.db.write(lambda session: self.repo(session).reset_attempts(order.order_id))
        updated = await self.store.record(order, Step.ABANDONED, reason=reason)
        if updated.state is not OrderState.REJECTED or not updated.release_pending:
            return updated  # another driver moved it first; it decides
        log.warning("saga_abandoned", order_id=order.order_id, reason=reason, state=order.state.value)
        if order.state is OrderState.PENDING:
            return updated
        try:
            await self.release_order_payments(updated)
        except DomainError as exc:
            log.warning("release_deferred", order_id=order.order_id, error=exc.reason)
            return updated
        return replace(updated, release_pending=False)

    async def release_order_payments(self, order: Order) -> None:
        """Cancelled while PENDING, or given up: an authorization may exist (or land late); release it."""
        payment_id: str | None = None
        for payment in await self.payments.payments_of_order(order.order_id):
            await release(self.payments, order.order_id, payment, order.reason or "order cancelled")
            payment_id = payment.payment_id
        released = payment_id
        await self.db.write(lambda session: self.repo(session).set_release_done(order.order_id, released))
