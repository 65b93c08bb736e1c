"""The HTTP path of the generation routes, kept lean: it runs on the event loop thread, which on a
small CPU shares the cores with llama.cpp's threads, so its CPU time per token is taken from
decoding.

- `SSEResponse`: the one writer of every streamed route (TGI's and OpenAI's). Each item of its
  body iterator is all the server-sent events ready at that moment (often one token, several when
  the loop fell behind), written with one ASGI `send`; it sends nothing else per token, and watches
  for the client's disconnect with one task per request (which cancels the generation).
- `HotRoutes`: the generation routes (`/v1/completions`, `/v1/chat/completions`,
  `/generate_stream`) reached without FastAPI's per-request machinery. The body is validated
  straight from bytes (`model_validate_json`) and handed to the same endpoint function FastAPI
  would call; any request it would not handle exactly like FastAPI (a body that fails validation,
  a content type that is not JSON) goes to FastAPI with the body it read, so error bodies and
  bounds stay the ones FastAPI and the exception handlers give.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Endpoint = Callable[[Any, Request], Awaitable[Response]]

SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}

#: `json.dumps(..., ensure_ascii=False)` without building an encoder per call (it does, for any
#: non-default option).
to_json = json.JSONEncoder(ensure_ascii=False).encode


def sse_event(payload: Any, space: bool = True) -> str:
    """One server-sent event carrying `payload` as JSON (`data: ...` then a blank line)."""
    return ("data: " if space else "data:") + to_json(payload) + "\n\n"


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response whose body iterator yields ready-to-send bytes, one `send` each.

    When the client disconnects, the iteration is cancelled (closing the body iterator cancels
    its sequences) and the response ends quietly. `on_close` runs however it ends.
    """

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None] | None = None) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"writing": True, "gone": False}

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
            if state["writing"]:
                state["gone"] = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self._body:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            state["writing"] = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            task.uncancel()  # our own cancellation: the client went away
        except OSError:  # the connection broke under a send
            pass
        finally:
            state["writing"] = False
            watcher.cancel()
            await self._body.aclose()  # type: ignore[attr-defined]
            if self._on_close is not None:
                self._on_close()


def _json_content_type(scope: Scope) -> bool:
    """Whether FastAPI would parse this body as JSON (no content type, or application/json or */*+json)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = value.decode("latin-1").split(";", 1)[0].strip().lower()
            main, _, sub = kind.partition("/")
            return main == "application" and (sub == "json" or sub.endswith("+json"))
    return True


class HotRoutes:
    """Dispatches POSTs to the generation routes straight to their endpoints (see the module doc);
    every other request goes to `app`."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        routes: dict[str, tuple[type[BaseModel], Endpoint]],
        errors: Callable[[Exception], Response | None],
    ) -> None:
        self.app = app
        self.routes = routes
        self.errors = errors  # the response the app's exception handlers give, None for others

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except Exception as e:  # a bound on the body (core/body_limit.py) raises from receive
            refusal = self.errors(e)
            if refusal is None:
                raise
            return await refusal(scope, receive, send)
        raw = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        model, endpoint = route
        body = None
        if _json_content_type(scope):
            try:
                body = model.model_validate_json(raw)
            except ValidationError:
                pass
        if body is None:  # FastAPI gives the canonical 422 (or whatever else it would do)
            return await self.app(scope, replay, send)
        scope["app"] = self.app  # what Starlette sets: endpoints find the service in app.state
        try:
            response = await endpoint(body, Request(scope, receive))  # the body is read: only a disconnect comes
        except Exception as e:
            error = self.errors(e)
            if error is None:
                raise
            response = error
        await response(scope, receive, send)
