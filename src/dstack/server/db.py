"""Database engine and sessions: SQLite by default, PostgreSQL when DSTACK_DATABASE_URL says so."""

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm.exc import StaleDataError

from dstack.core.tables import Base, sqlite_pragmas
from dstack.server.db_errors import is_transient_conflict

__all__ = ["Base", "Database", "get_database", "get_session", "retry_on_conflict", "set_database", "sqlite_pragmas"]

T = TypeVar("T")
CONFLICT_ATTEMPTS = 20


class Database:
    """Owns the engine; one per server process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=20, max_overflow=20, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", sqlite_pragmas)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> AsyncSession:
        return self.sessionmaker()

    async def dispose(self) -> None:
        await self.engine.dispose()


async def retry_on_conflict(session: AsyncSession, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` (reads, decisions, commit) again on fresh rows when another writer got there first.

    Runs and jobs carry a version column: an UPDATE built from rows someone else has changed
    since they were read matches nothing and raises StaleDataError instead of silently
    overwriting, say, a user's stop with the pipeline's older view of the run. PostgreSQL may
    also abort the transaction itself (a deadlock with a concurrent writer, a serialization
    failure): that is the same conflict, found by the database. Rolling back expires every
    loaded row, so the next attempt decides again from what is committed now.
    """
    for attempt in range(CONFLICT_ATTEMPTS):
        try:
            return await work()
        except (StaleDataError, DBAPIError) as e:
            if isinstance(e, DBAPIError) and not is_transient_conflict(e):
                raise
            await session.rollback()
            if attempt == CONFLICT_ATTEMPTS - 1:
                raise
            await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
    raise AssertionError("unreachable")


_db: Database | None = None


def set_database(db: Database) -> None:
    global _db
    _db = db


def get_database() -> Database:
    if _db is None:
        raise RuntimeError("database is not initialised")
    return _db


async def get_session() -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: one session per request."""
    async with get_database().session() as session:
        yield session
