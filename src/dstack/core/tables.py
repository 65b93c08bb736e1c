"""What every part that keeps tables shares: the declarative `Base` (one MetaData, so the server's
tables and the serverless queue's tables reference each other by name and Alembic sees them all)
and the pragmas of a SQLite connection. It lives here, below both, so `dstack.serverless` needs
nothing of `dstack.server` to declare its tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Run on every new SQLite connection (async engine and the queue's own sync engine alike)."""
    # WAL lets readers (ps, logs) proceed while the pipeline writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
