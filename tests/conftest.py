"""Fixtures shared by every tier. Tiers add their own conftest.py next to their tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import create_postgres_database, drop_postgres_database, postgres_reachable

_postgres_skip_reason: str | None = None
_postgres_checked = False


def _postgres_problem() -> str | None:
    global _postgres_checked, _postgres_skip_reason
    if not _postgres_checked:
        _postgres_skip_reason = postgres_reachable()
        _postgres_checked = True
    return _postgres_skip_reason


@contextmanager
def _postgres_databases() -> Iterator[Callable[[str], str]]:
    """Make fresh PostgreSQL databases (one per call), dropped afterwards. Skips if unreachable."""
    reason = _postgres_problem()
    if reason:
        pytest.skip(reason)
    created: list[str] = []

    def make(prefix: str = "shop") -> str:
        name, url = create_postgres_database(prefix)
        created.append(name)
        return url

    try:
        yield make
    finally:
        for name in created:
            drop_postgres_database(name)


@pytest.fixture
def postgres_url_factory() -> Iterator[Callable[[str], str]]:
    """Fresh PostgreSQL databases for this test."""
    with _postgres_databases() as make:
        yield make


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Persistence tests run once per backend: a fresh SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":

        def sqlite_url(name: str = "shop") -> str:
            return f"sqlite:///{tmp_path / name}.db"

        yield sqlite_url
        return
    with _postgres_databases() as make:
        yield make
