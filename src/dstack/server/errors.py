"""Errors services raise; the app turns them into 4xx bodies that say what was wrong."""


class ServerClientError(Exception):
    status_code = 400
    code = "error"

    def __init__(self, msg: str, fields: list[str] | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.fields = fields or []


class ResourceNotFound(ServerClientError):
    status_code = 404
    code = "not_found"


class ResourceExists(ServerClientError):
    status_code = 409
    code = "exists"


class Forbidden(ServerClientError):
    status_code = 403
    code = "forbidden"
