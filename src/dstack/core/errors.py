"""Exceptions shared by every part of dstack.

They live in `core` so the CLI, the Python API and the server can catch the same types
without importing each other.
"""

from __future__ import annotations

from typing import Any


class DstackError(Exception):
    """Base of every error dstack raises on purpose (as opposed to bugs)."""


class ConfigurationError(DstackError):
    """A configuration (YAML file, dict or Python object) is invalid.

    `path`, `line` (1-based), `column` (1-based) and `field` (dotted path such as
    `resources.gpu` or `env[0]`) are set when known, so callers can point at the mistake.
    `str(err)` is the full, human-readable message including that location.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.field = field
        self.column = column

    def __str__(self) -> str:
        return self.message


class ClientError(DstackError):
    """The server could not be reached or answered something that is not the API."""


class ServerClientError(DstackError):
    """The server understood the request and refused it (HTTP 4xx).

    `code` is the machine-readable error code from the response body (e.g. `resource_not_exists`),
    `fields` the offending fields when the server names them.
    """

    def __init__(
        self,
        msg: str = "",
        code: str = "error",
        fields: list[Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = code
        self.fields: list[Any] = list(fields or [])
        self.status = status

    def __str__(self) -> str:
        return self.msg or self.code
