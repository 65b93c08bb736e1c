"""What went wrong, in the domain's words: an error kind and a machine-readable code, never an HTTP
status. `dstack.core.http_errors` is the one place that turns a kind into a status and a body, for
the control-plane API, the serverless endpoints (`/v2`) and the proxy alike."""

from __future__ import annotations

import enum

from dstack.core.errors import DstackError


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the request is wrong: fix it and ask again
    NOT_AUTHENTICATED = "not_authenticated"  # no token, or one nobody holds
    FORBIDDEN = "forbidden"  # a known caller that may not do this
    NOT_FOUND = "not_found"  # no such thing (or one the caller may not see)
    METHOD_NOT_ALLOWED = "method_not_allowed"
    EXISTS = "exists"  # the name is taken
    TOO_LARGE = "too_large"  # a body or archive past its bound
    QUOTA_EXCEEDED = "quota_exceeded"  # a per-user or per-project limit
    UNAVAILABLE = "unavailable"  # not ready yet: try again later


class DomainError(DstackError):
    """A refusal the caller can act on. Subclasses fix `kind` and `code`; one-off raises may pass
    them (`code` is what clients match on, e.g. `invalid_state`)."""

    kind: ErrorKind = ErrorKind.INVALID
    code: str = "error"

    def __init__(
        self, msg: str, fields: list[str] | None = None, *, kind: ErrorKind | None = None, code: str | None = None
    ) -> None:
        super().__init__(msg)
        self.msg = msg
        self.fields = fields or []
        if kind is not None:
            self.kind = kind
        if code is not None:
            self.code = code
