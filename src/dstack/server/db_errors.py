"""Telling the database's "this value does not fit" apart from its other errors.

SQLAlchemy's asyncpg adapter reports PostgreSQL's data exceptions (SQLSTATE class 22: a string
too long for its column, a NUL character, a number out of range) as plain `DBAPIError`s, not as
`DataError`; asyncpg refuses out-of-range integers itself, before sending them.
"""

from __future__ import annotations

from sqlalchemy.exc import DataError, DBAPIError


def is_data_error(exc: DBAPIError) -> bool:
    """Whether the database refused a value the request carried (a client error, not a bug)."""
    if isinstance(exc, DataError):
        return True
    orig = exc.orig
    sqlstate = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
    if sqlstate.startswith("22"):
        return True
    cause = getattr(orig, "__cause__", None)
    return type(cause).__name__ == "DataError" and isinstance(cause, ValueError)
