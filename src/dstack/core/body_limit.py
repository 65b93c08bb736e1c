"""Request body size limit for an ASGI app: the control-plane API and the built-in engine (413).

Pure ASGI so it sees the body as it arrives: a declared `Content-Length` over the limit is
refused before anything is read, and a chunked body is cut off at the first byte over it (the
endpoint's read raises `RequestTooLarge`, which the app answers with 413).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send


class RequestTooLarge(HTTPException):
    """Raised from `receive` when the body passes the limit (FastAPI passes HTTPExceptions on)."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, _message(limit, setting))
        self.limit = limit


def _message(limit: int, setting: str) -> str:
    where = f" ({setting})" if setting else ""
    return f"the request body is larger than this server's limit of {limit / (1024 * 1024):g} MiB{where}"


class BodySizeLimit:
    """Wraps an ASGI app; `limit_for(path)` is the most bytes a request body to `path` may have,
    and the name of the setting that says so ("" for a fixed limit)."""

    def __init__(
        self,
        app: Any,
        limit_for: Callable[[str], tuple[int, str]],
        error_body: Callable[[str], Any] | None = None,
    ) -> None:
        self.app, self.limit_for = app, limit_for
        self.error_body = error_body or (lambda message: {"detail": [{"msg": message, "code": "too_large"}]})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope.get("path", ""))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # Nothing of the body is read: the connection closes rather than drain it.
            refusal = JSONResponse(self.error_body(_message(limit, setting)), 413, {"connection": "close"})
            await refusal(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLarge(limit, setting)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
