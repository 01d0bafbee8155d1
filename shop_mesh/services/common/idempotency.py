"""request_id idempotency: the rules and the one helper every mutation runs through
(`IdempotentCommands`), without the storage (which is `idempotency_sql.IdempotencyStore`, behind the
`unit_of_work.IdempotencyKeys` port):

    done = await commands.run("CapturePayment", request_id, payload, PAYMENT_CODEC, body)
    done.result, done.replayed   # a repeat returns the first result, with no second effect

A concurrent duplicate blocks on the key's row (PostgreSQL) or on the write lock (SQLite) until the
first transaction commits, then finds the key and returns the stored result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from shop_mesh.services.common.errors import AlreadyExists, Unavailable, quote
from shop_mesh.services.common.unit_of_work import IdempotencyKeys, Session, UnitOfWork


def fingerprint(payload: Any) -> str:
    """A stable hash of a request's meaningful fields (JSON-able), to detect a reused request_id."""
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def check_same_payload(scope: str, request_id: str, print_: str, stored_print: str) -> None:
    """Raises AlreadyExists(REQUEST_ID_REUSED) unless a repeat carries the first request's payload."""
    if stored_print != print_:
        raise AlreadyExists(
            f"request_id {quote(request_id)} was already used for a different {scope} request",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": request_id},
        )


def replayed_result(scope: str, request_id: str, print_: str, stored: tuple[str, str | None]) -> str:
    """The first request's result for a repeat of `request_id` whose stored (fingerprint, result) is
    `stored`. Raises AlreadyExists(REQUEST_ID_REUSED) if the payload differs, Unavailable if the first
    request has not completed. Counting the replay is the adapters' business (no metrics here)."""
    stored_print, result = stored
    check_same_payload(scope, request_id, print_, stored_print)
    if result is None:
        # Claimed by a transaction that is still running, or committed without completing (a bug).
        raise Unavailable("the first request with this request_id has not finished; retry")
    return result


R = TypeVar("R")
U = TypeVar("U")


@dataclass(frozen=True)
class Codec(Generic[R]):
    """How a command's result is stored with its request id, and read back for a repeat."""

    encode: Callable[[R], str]
    decode: Callable[[str], R]


@dataclass(frozen=True)
class Outcome(Generic[R]):
    result: R
    replayed: bool  # the first request's stored result: nothing was written, nothing to announce


def _same(unit: Any) -> Session:
    return cast(Session, unit)


class IdempotentCommands(Generic[U]):
    """Every mutation of every service runs through `run`: in one write transaction, claim the
    request id with the payload's fingerprint, replay the stored result for a repeat (a different
    payload is REQUEST_ID_REUSED), else run the body and store its result with the key.

    `session_of` gives the `Session` the keys live on from what a unit yields (the unit itself for
    user and order; payment's units yield its repository).
    """

    def __init__(
        self,
        units: UnitOfWork[U],
        keys: IdempotencyKeys,
        session_of: Callable[[U], Session] = _same,
    ):
        self.units = units
        self.keys = keys
        self._session_of = session_of

    async def run(
        self,
        scope: str,
        request_id: str,
        payload: Any,
        codec: Codec[R],
        body: Callable[[U], R],
        *,
        last: Callable[[U, R], None] | None = None,
    ) -> Outcome[R]:
        """`body` is the synchronous body of the write unit. `last` runs after the result is stored,
        for what must come last in the transaction (an event's sequence number: its row lock is then
        held the shortest time)."""
        print_ = fingerprint(payload)

        def unit(u: U) -> Outcome[R]:
            session = self._session_of(u)
            stored = self.keys.claim(session, scope, request_id, print_)
            if stored is not None:
                return Outcome(codec.decode(stored), replayed=True)
            result = body(u)
            self.keys.complete(session, scope, request_id, codec.encode(result))
            if last is not None:
                last(u, result)
            return Outcome(result, replayed=False)

        return await self.units.write(unit)

    def replayed(self, unit: U, scope: str, request_id: str, payload: Any, codec: Codec[R]) -> R | None:
        """In a read unit: the stored result if request_id was used (checked like `run`), else None."""
        stored = self.keys.replay(self._session_of(unit), scope, request_id, fingerprint(payload))
        return None if stored is None else codec.decode(stored)
