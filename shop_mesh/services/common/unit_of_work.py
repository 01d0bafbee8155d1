"""The unit-of-work port: how use cases open a read or a write transaction without knowing the
database, and the stores that run inside a unit. No SQLAlchemy here; the adapter is `db.Database`
(with `db.db_session`), the stores' adapters are `idempotency_sql.IdempotencyStore` and
`outbox.SequenceAllocator`.

A unit yields what repositories hang off: an opaque `Session` (user, order: the use case passes it
to a repository factory it was given) or the repository itself (payment). Unit tests fake it in
memory.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

T_co = TypeVar("T_co", covariant=True)


class Session(Protocol):
    """A unit's handle, opaque to the domain: only the adapter's repositories look inside."""


class UnitOfWork(Protocol[T_co]):
    def read(self) -> AbstractAsyncContextManager[T_co]:
        """A read unit: one consistent snapshot; nothing is committed."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[T_co]:
        """A write transaction: committed when the block ends, rolled back if it raises. Not nested,
        and no remote calls inside (it holds the database's locks meanwhile)."""
        ...


class IdempotencyKeys(Protocol):
    """Request ids of mutations, claimed in the write transaction that performs their effect."""

    async def claim(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        """None if this request_id is new (now claimed); else the stored result of the first request.
        Raises AlreadyExists(REQUEST_ID_REUSED) if the id was used with a different payload."""
        ...

    async def complete(self, session: Session, scope: str, request_id: str, result: str) -> None: ...

    async def replay(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        """The stored result of request_id without claiming it (None if unused): for a use case that
        must know before its transaction whether it is a repeat. Raises as `claim` does."""
        ...


class SequenceNumbers(Protocol):
    """An event log's sequence numbers, allocated in the transaction that writes the event, last."""

    async def next(self, session: Session) -> int: ...
