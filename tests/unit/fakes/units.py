"""The unit-of-work port in memory: committed tables, and units that run on a copy of them.

A write unit works on a copy of the committed tables, published only if its function returns (so a
unit that raises leaves nothing behind, as a rollback does); a read unit sees the committed state
and may not write (the SQL adapter's read connections are `query_only`). Table values are immutable
(frozen dataclasses, tuples), so a shallow copy of each table isolates a unit.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Self, TypeVar

from shop_mesh.services.common.idempotency import replayed_result
from shop_mesh.services.common.unit_of_work import Session

KeyTable = dict[tuple[str, str], tuple[str, str | None]]


@dataclass
class Tables:
    """What every service stores besides its own tables: request ids and event-log counters."""

    keys: KeyTable = field(default_factory=dict)  # (scope, request_id) -> (fingerprint, result)
    sequences: dict[str, int] = field(default_factory=dict)

    def copy(self) -> Self:
        return dataclasses.replace(
            self, **{f.name: copy.copy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


T = TypeVar("T", bound=Tables)
U = TypeVar("U")
R = TypeVar("R")


@dataclass(frozen=True)
class FakeSession(Generic[T]):
    """The opaque `Session` of a fake unit: the tables it works on."""

    tables: T
    writable: bool


class ReadOnlyUnit(Exception):
    """A write in a read unit: a bug in the use case (the SQL adapter refuses it too)."""


def tables_of(session: Session, kind: type[T], *, write: bool = False) -> T:
    """The tables of a fake unit's session (a fake repository narrows the opaque session here, as
    the SQL ones do with `db_session`); `write=True` for a statement that changes them."""
    if not isinstance(session, FakeSession) or not isinstance(session.tables, kind):
        raise TypeError(f"expected a FakeSession of {kind.__name__}, got {type(session).__name__}")
    if write and not session.writable:
        raise ReadOnlyUnit("a write in a read unit")
    return session.tables


def _session(session: FakeSession[T]) -> Session:
    return session


class InMemoryUnits(Generic[T, U]):
    """The `UnitOfWork[U]` port. `open_` makes what a unit hands its function from the unit's session:
    the session itself (user, order) or a repository on it (payment)."""

    def __init__(self, tables: T, open_: Callable[[FakeSession[T]], U]):
        self.committed = tables
        self._open = open_
        self.commits = 0

    async def read(self, fn: Callable[[U], R]) -> R:
        return fn(self._open(FakeSession(self.committed.copy(), writable=False)))

    async def write(self, fn: Callable[[U], R]) -> R:
        staged = self.committed.copy()
        result = fn(self._open(FakeSession(staged, writable=True)))
        self.committed = staged  # only now: a unit that raised published nothing
        self.commits += 1
        return result


def session_units(tables: T) -> InMemoryUnits[T, Session]:
    """Units that hand their function the session (user's and order's use cases take repositories
    from a factory they were given)."""
    return InMemoryUnits(tables, _session)


class InMemoryKeys:
    """The `IdempotencyKeys` port: the keys live in the unit's tables, so they commit and roll back
    with its effect."""

    def claim(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        keys = tables_of(session, Tables, write=True).keys
        stored = keys.get((scope, request_id))
        if stored is None:
            keys[(scope, request_id)] = (print_, None)
            return None
        return replayed_result(scope, request_id, print_, stored)

    def complete(self, session: Session, scope: str, request_id: str, result: str) -> None:
        keys = tables_of(session, Tables, write=True).keys
        keys[(scope, request_id)] = (keys[(scope, request_id)][0], result)

    def replay(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        stored = tables_of(session, Tables).keys.get((scope, request_id))
        return None if stored is None else replayed_result(scope, request_id, print_, stored)


def next_sequence(tables: Tables, name: str) -> int:
    """The SQL counter row's `value = value + 1 RETURNING value`: 1, 2, 3 … per name."""
    tables.sequences[name] = tables.sequences.get(name, 0) + 1
    return tables.sequences[name]


class InMemorySequences:
    """The `SequenceNumbers` port for one event log."""

    def __init__(self, name: str):
        self.name = name

    def next(self, session: Session) -> int:
        return next_sequence(tables_of(session, Tables, write=True), self.name)
