"""An in-memory fake of the `IdempotencyKeys` port for domain unit tests: the keys live in whatever
the test's unit yields (found by `keys_of`), so they commit and roll back with it."""

from __future__ import annotations

from collections.abc import Callable

from shop_mesh.services.common.idempotency import replayed_result
from shop_mesh.services.common.unit_of_work import Session

KeyTable = dict[tuple[str, str], tuple[str, str | None]]


class InMemoryKeys:
    def __init__(self, keys_of: Callable[[Session], KeyTable]):
        self._keys_of = keys_of

    def claim(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        keys = self._keys_of(session)
        stored = keys.get((scope, request_id))
        if stored is None:
            keys[(scope, request_id)] = (print_, None)
            return None
        return replayed_result(scope, request_id, print_, stored)

    def complete(self, session: Session, scope: str, request_id: str, result: str) -> None:
        keys = self._keys_of(session)
        keys[(scope, request_id)] = (keys[(scope, request_id)][0], result)

    def replay(self, session: Session, scope: str, request_id: str, print_: str) -> str | None:
        stored = self._keys_of(session).get((scope, request_id))
        return None if stored is None else replayed_result(scope, request_id, print_, stored)
