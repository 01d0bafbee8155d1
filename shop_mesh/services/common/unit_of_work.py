"""The unit-of-work port: how use cases run a read or a write transaction without knowing the
database, and the stores that run inside a unit. No SQLAlchemy here; the adapter is `db.Database`
(with `db.db_session`), the stores' adapters are `idempotency_sql.IdempotencyStore` and
`outbox.SequenceAllocator`.

A unit is a synchronous function: the use case keeps its async orchestration (remote calls, notifying
streams after the commit) and hands the body of each transaction to `read(fn)` / `write(fn)`, which
call `fn` with what repositories hang off: an opaque `Session` (user, order: the use case passes it
to a repository factory it was given) or the repository itself (payment). Where `fn` runs (the
event-loop thread or a worker) is the adapter's execution policy; a unit has no await in it, so it
cannot make a remote call while it holds the database's locks. Unit tests fake it in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

T_co = TypeVar("T_co", covariant=True)
R = TypeVar("R")


class Session(Protocol):
    """A unit's handle, opaque to the domain: only the adapter's repositories look inside."""


class UnitOfWork(Protocol[T_co]):
    async def read(self, fn: Callable[[T_co], R]) -> R:
        """`fn` in a read unit (one consistent snapshot); nothing is committed. Returns fn's result."""
        ...

    async def write(self, fn: Callable[[T_co], R]) -> R:
        """`fn` in a write transaction: committed when it returns, rolled back if it raises."""
        ...


class IdempotencyKeys(Protocol):
    """Request ids of mutations, claimed in the write transaction that performs their effect."""

    def claim(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        """None if this request_id is new (now claimed); else the stored result of the first request.
        Raises AlreadyExists(REQUEST_ID_REUSED) if the id was used with a different payload."""
        ...

    def complete(self, session: Session, scope: str, request_id: str, result: str) -> None: ...

    def replay(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        """The stored result of request_id without claiming it (None if unused): for a use case that
        must know before its transaction whether it is a repeat. Raises as `claim` does."""
        ...


class SequenceNumbers(Protocol):
    """An event log's sequence numbers, allocated in the transaction that writes the event, last."""

    def next(self, session: Session) -> int: ...
