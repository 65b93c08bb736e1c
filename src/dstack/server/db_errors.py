"""Telling the database's "this value does not fit" and "try again" apart from its other errors.

SQLAlchemy's asyncpg adapter reports PostgreSQL's data exceptions (SQLSTATE class 22: a string
too long for its column, a NUL character, a number out of range) as plain `DBAPIError`s, not as
`DataError`; asyncpg refuses out-of-range integers itself, before sending them.
"""

from __future__ import annotations

from sqlalchemy.exc import DataError, DBAPIError


def _sqlstate(exc: DBAPIError) -> str:
    orig = exc.orig
    return str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")


#: PostgreSQL rolled the transaction back so that another could go on: deadlock_detected,
#: serialization_failure. Running it again is the documented remedy.
TRANSIENT_SQLSTATES = ("40P01", "40001")


def is_transient_conflict(exc: DBAPIError) -> bool:
    """Whether the database aborted this transaction only because of a concurrent one."""
    return _sqlstate(exc) in TRANSIENT_SQLSTATES


def is_data_error(exc: DBAPIError) -> bool:
    """Whether the database refused a value the request carried (a client error, not a bug)."""
    if isinstance(exc, DataError):
        return True
    if _sqlstate(exc).startswith("22"):
        return True
    cause = getattr(exc.orig, "__cause__", None)
    return type(cause).__name__ == "DataError" and isinstance(cause, ValueError)
