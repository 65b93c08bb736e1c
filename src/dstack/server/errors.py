"""Refusals the server's services raise. They carry a kind and a code, not an HTTP status: the app
turns them into 4xx answers through `dstack.core.http_errors`.

(`dstack.core.errors.ServerClientError` is the other side: what the Python API raises when the
server refuses a request.)"""

from dstack.core.domain_errors import DomainError, ErrorKind


class InvalidRequest(DomainError):
    kind = ErrorKind.INVALID
    code = "error"


class NotAuthenticated(DomainError):
    kind = ErrorKind.NOT_AUTHENTICATED
    code = "not_authenticated"


class ResourceNotFound(DomainError):
    kind = ErrorKind.NOT_FOUND
    code = "not_found"


class ResourceExists(DomainError):
    kind = ErrorKind.EXISTS
    code = "exists"


class Forbidden(DomainError):
    kind = ErrorKind.FORBIDDEN
    code = "forbidden"
