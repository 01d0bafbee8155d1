"""One AsyncEngine per process; a session per RPC. SQLite by default, PostgreSQL when configured.

Write transactions on SQLite start with BEGIN IMMEDIATE: a deferred transaction that reads and
then writes fails at once with SQLITE_BUSY when another writer committed in between, whereas an
immediate one waits for the lock (busy_timeout) and then sees the latest data.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


class Database:
    def __init__(self, url: str, metadata: MetaData, *, echo: bool = False):
        self.url = make_url(url)
        self.metadata = metadata
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine: AsyncEngine = self._create_engine(echo)
        self._reader = async_sessionmaker(self.engine, expire_on_commit=False)
        writer_bind = self.engine.execution_options(begin_immediate=True) if self.is_sqlite else self.engine
        self._writer = async_sessionmaker(writer_bind, expire_on_commit=False)

    def _create_engine(self, echo: bool) -> AsyncEngine:
        if not self.is_sqlite:
            return create_async_engine(
                self.url, echo=echo, pool_size=10, max_overflow=10, pool_pre_ping=True, pool_timeout=5
            )
        database = self.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self.url, echo=echo, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _: Any) -> None:
            # Let SQLAlchemy, not the driver, emit BEGIN (the documented pysqlite recipe).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            immediate = conn.get_execution_options().get("begin_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    async def create_schema(self) -> None:
        """Create missing tables (additive only; see docs/decisions.md on migrations)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads; nothing is committed."""
        async with self._reader() as session:
            yield session

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        async with self._writer() as session, session.begin():
            yield session

    async def ping(self, timeout: float = 2.0) -> bool:
        try:
            async with asyncio.timeout(timeout), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()
