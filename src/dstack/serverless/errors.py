"""The queue's refusals: a kind and a code (`dstack.core.domain_errors`), never an HTTP status;
`dstack.core.http_errors` maps them for `/v2` as it does for the control-plane API."""

from __future__ import annotations

from dstack.core.domain_errors import DomainError, ErrorKind

__all__ = ["ErrorKind", "ServerlessError"]


class ServerlessError(DomainError):
    def __init__(self, kind: ErrorKind, msg: str, code: str) -> None:
        super().__init__(msg, kind=kind, code=code)
