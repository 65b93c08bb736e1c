"""The one map from domain errors to HTTP: a status per `ErrorKind`, and the body every JSON answer
of the control-plane API and `/v2` uses (`{"detail": [{"msg", "code", "fields"?}]}`). The proxy
takes its statuses from here too (its bodies follow the protocols it speaks: TGI, OpenAI)."""

from __future__ import annotations

from typing import Any

from dstack.core.domain_errors import DomainError, ErrorKind

STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 400,
    ErrorKind.NOT_AUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.METHOD_NOT_ALLOWED: 405,
    ErrorKind.EXISTS: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.QUOTA_EXCEEDED: 429,
    ErrorKind.UNAVAILABLE: 503,
}
SERVER_ERROR_STATUS = 500


def status_for(kind: ErrorKind) -> int:
    return STATUS[kind]


def error_body(msg: str, code: str, fields: list[str] | None = None) -> dict[str, Any]:
    """The JSON body of a refusal (and, with code `server_error`, of a bug)."""
    item: dict[str, Any] = {"msg": msg, "code": code}
    if fields:
        item["fields"] = fields
    return {"detail": [item]}


def to_http(exc: DomainError) -> tuple[int, dict[str, Any]]:
    """Status and body for a domain error."""
    return status_for(exc.kind), error_body(exc.msg, exc.code, exc.fields)


def server_error() -> tuple[int, dict[str, Any]]:
    """A bug: the client gets JSON without the traceback."""
    return SERVER_ERROR_STATUS, error_body("internal server error", "server_error")
