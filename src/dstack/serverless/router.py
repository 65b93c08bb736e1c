"""HTTP surface of serverless endpoints: a raw ASGI app the server mounts at `/v2`.

`/v2/{endpoint}/...`: the RunPod-style client API (Bearer user token of a project member), the
OpenAI passthrough, and the worker protocol (raw per-endpoint worker token, no `Bearer`).
Every answer carries CORS headers: browsers call endpoints straight from web pages.

These are the queue's hot paths (each job costs a `/run` and a `job-done`, workers long-poll
`job-take`), so they skip the FastAPI layer — request models, dependency injection — that the
control-plane API uses: a route here is a path split and a dict lookup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from dstack.core.http_errors import server_error, to_http
from dstack.core.tokens import bearer_token
from dstack.proxy.http import Receive, Scope, Send, header, read_body, route_path, send_bytes
from dstack.serverless.client_api import ClientApi
from dstack.serverless.errors import ErrorKind, ServerlessError
from dstack.serverless.models import TERMINAL
from dstack.serverless.service import ServerlessService
from dstack.serverless.worker_protocol import WorkerProtocol

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024 * 1024
_CORS_PREFLIGHT = [(b"access-control-allow-methods", b"GET, POST, OPTIONS"), (b"access-control-max-age", b"600")]
_JSON = b"application/json"

Handler = Callable[["Call"], Awaitable[None]]


class Call:
    """One request: its path parts, query, body and the way back."""

    __slots__ = ("scope", "receive", "send", "svc", "endpoint_id", "args", "_query", "_disconnected", "_watcher")

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, svc: ServerlessService, endpoint_id: str, args: list[str]
    ) -> None:
        self.scope, self.receive, self.send, self.svc = scope, receive, send, svc
        self.endpoint_id, self.args = endpoint_id, args
        self._query: dict[str, str] | None = None
        self._disconnected = False
        self._watcher: asyncio.Task | None = None

    @property
    def method(self) -> str:
        return self.scope["method"]

    def query(self, name: str) -> str | None:
        if self._query is None:
            self._query = dict(parse_qsl((self.scope.get("query_string") or b"").decode("latin-1")))
        return self._query.get(name)

    def int_query(self, name: str) -> int | None:
        raw = self.query(name)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise ServerlessError(
                ErrorKind.INVALID, f"query parameter '{name}' must be an integer, not {raw!r}", "invalid_request"
            ) from None

    def authorization(self) -> str | None:
        raw = header(self.scope, b"authorization")
        return raw.decode("latin-1") if raw is not None else None

    def bearer(self) -> str | None:
        """`Bearer <t>`, or a bare `<t>` (the client API has always taken both)."""
        return bearer_token(self.authorization(), bare=True)

    async def body(self) -> bytes:
        try:
            return await read_body(self.receive, MAX_BODY)
        except ValueError:
            raise ServerlessError(
                ErrorKind.TOO_LARGE, f"the body is larger than {MAX_BODY // (1024 * 1024)} MiB", "too_large"
            ) from None

    async def json_body(self) -> Any:
        raw = await self.body()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python recurses
            raise ServerlessError(ErrorKind.INVALID, "the body is not valid JSON", "invalid_request") from None

    async def is_disconnected(self) -> bool:
        """For long polls: has the client gone? (The body must have been read already.)"""
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())
        await asyncio.sleep(0)
        return self._disconnected

    async def _watch(self) -> None:
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                self._disconnected = True
                return

    def close(self) -> None:
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()

    def _cors(self, extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
        origin = header(self.scope, b"origin") or b"*"
        return [
            (b"access-control-allow-origin", origin),
            (b"vary", b"Origin"),
            (b"access-control-expose-headers", b"Content-Type"),
            *(extra or ()),
        ]

    async def reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes = _JSON,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        await send_bytes(self.send, status, body, content_type, self._cors(extra))

    async def json(self, obj: Any, status: int = 200) -> None:
        await self.reply(status, json.dumps(obj).encode())

    async def stream(self, chunks: AsyncIterator[bytes], content_type: bytes) -> None:
        """Send `chunks` as they come; a client that goes away closes the iterator (its
        `finally` runs), as it would under a streaming response."""
        await self.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type), *self._cors([(b"cache-control", b"no-cache")])],
            }
        )
        gone = asyncio.ensure_future(self._watch())

        async def pump() -> None:
            try:
                async for chunk in chunks:
                    await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            except Exception:  # the status line is out: all that is left is to end the body
                log.exception("serverless: a stream broke off")
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})

        sender = asyncio.ensure_future(pump())
        try:
            await asyncio.wait([sender, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sender, gone):
                if not t.done():
                    t.cancel()
            await asyncio.gather(sender, gone, return_exceptions=True)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()


class ServerlessApp:
    """The ASGI app; finds its `ServerlessService` through `get_service` at request time (the
    server creates the service in its lifespan, after the app is built)."""

    def __init__(self, get_service: Callable[[], ServerlessService | None]) -> None:
        self.get_service = get_service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        parts = route_path(scope).split("/")  # ['', endpoint, action, ...]
        svc = self.get_service()
        endpoint_id = parts[1] if len(parts) > 1 else ""
        action = parts[2] if len(parts) > 2 else ""
        call = Call(scope, receive, send, svc, endpoint_id, parts[3:])  # type: ignore[arg-type]
        try:
            if svc is None:
                raise ServerlessError(
                    ErrorKind.UNAVAILABLE,
                    "serverless endpoints are not available yet (the server is starting)",
                    "unavailable",
                )
            if scope["method"] == "OPTIONS":
                await _preflight(call)
                return
            route = ROUTES.get(action)
            if not endpoint_id or route is None or len(call.args) != route.nargs and not route.rest:
                raise ServerlessError(
                    ErrorKind.NOT_FOUND, f"no such route: {scope['method']} /v2{route_path(scope)}", "not_found"
                )
            if scope["method"] not in route.methods:
                raise ServerlessError(
                    ErrorKind.METHOD_NOT_ALLOWED,
                    f"{action} takes {' or '.join(sorted(route.methods))}, not {scope['method']}",
                    "method_not_allowed",
                )
            await route.handler(call)
        except ServerlessError as e:
            status, body = to_http(e)
            await call.json(body, status)
        except ConnectionResetError:
            pass  # the client went away mid-request
        except Exception:  # a bug: logged with its traceback; the client gets JSON without it
            log.exception("serverless: %s %s failed", scope["method"], route_path(scope))
            try:
                status, body = server_error()
                await call.json(body, status)
            except Exception:
                pass  # the answer had already begun: nothing more can be said
        finally:
            call.close()


class _Route:
    __slots__ = ("handler", "methods", "nargs", "rest")

    def __init__(self, handler: Handler, methods: tuple[str, ...], nargs: int, rest: bool = False) -> None:
        self.handler, self.methods, self.nargs, self.rest = handler, frozenset(methods), nargs, rest


async def _preflight(call: Call) -> None:
    allow = header(call.scope, b"access-control-request-headers") or b"Authorization, Content-Type"
    await call.reply(204, b"", extra=_CORS_PREFLIGHT + [(b"access-control-allow-headers", allow)])


# ---- client API ------------------------------------------------------------------------------


async def _client(call: Call) -> ClientApi:
    await call.svc.client.authorize(call.endpoint_id, call.bearer())
    return call.svc.client


async def run(call: Call) -> None:
    svc = await _client(call)
    job_id = await svc.submit(call.endpoint_id, await call.json_body())
    await call.reply(200, b'{"id":"' + job_id.encode() + b'","status":"IN_QUEUE"}')


async def runsync(call: Call) -> None:
    svc = await _client(call)
    wait = call.int_query("wait")
    await call.json(await svc.run_sync(call.endpoint_id, await call.json_body(), wait))


def _job_action(name: str) -> Handler:
    """`/{action}/{job_id}`: the client API's method of that name on the job, its answer as JSON."""

    async def handler(call: Call) -> None:
        svc = await _client(call)
        await call.json(await getattr(svc, name)(call.endpoint_id, call.args[0]))

    return handler


def _endpoint_action(name: str) -> Handler:
    """`/{action}`: the client API's method of that name on the endpoint, its answer as JSON."""

    async def handler(call: Call) -> None:
        svc = await _client(call)
        await call.json(await getattr(svc, name)(call.endpoint_id))

    return handler


async def openai(call: Call) -> None:
    """OpenAI-compatible calls become jobs `{"openai_route", "openai_input"}`, as RunPod's vLLM
    worker expects; what the handler yields comes back as SSE (stream=true) or one JSON body."""
    svc = await _client(call)
    body = await call.json_body() if call.method == "POST" else None
    path = "/".join(call.args)
    job_input = {"openai_route": "/" + path.lstrip("/"), "openai_input": body if body is not None else {}}
    job_id = await svc.submit(call.endpoint_id, {"input": job_input})
    if isinstance(body, dict) and body.get("stream"):
        await call.stream(_sse(svc, call.endpoint_id, job_id), b"text/event-stream")
        return
    result = await _wait_final(svc, call.endpoint_id, job_id, call.svc.options.runsync_max_ms / 1000)
    if result["status"] != "COMPLETED":
        code = 504 if result["status"] not in TERMINAL else 500
        await call.json(
            {"error": {"message": result.get("error") or f"job {result['status']}", "type": result["status"]}}, code
        )
        return
    output = result.get("output")
    if isinstance(output, list) and len(output) == 1:
        output = output[0]
    await call.json(output)


async def _wait_final(svc: ClientApi, endpoint_id: str, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = await svc.status(endpoint_id, job_id)
        if body["status"] in TERMINAL or time.monotonic() >= deadline:
            return body
        await svc.wait_job(job_id, min(1.0, deadline - time.monotonic()))


async def _sse(svc: ClientApi, endpoint_id: str, job_id: str) -> AsyncIterator[bytes]:
    done_sent = False
    finished = False
    try:
        while True:
            got = await svc.stream(endpoint_id, job_id)
            for item in got["stream"]:
                chunk = item["output"]
                text = chunk if isinstance(chunk, str) else json.dumps(chunk)
                done_sent = done_sent or "[DONE]" in text
                if not text.startswith("data:"):
                    text = f"data: {text}"
                yield (text.rstrip("\n") + "\n\n").encode()
            if got["status"] in TERMINAL and not got["stream"]:
                finished = True
                if got.get("error"):
                    yield f"data: {json.dumps({'error': {'message': got['error'], 'type': got['status']}})}\n\n".encode()
                break
            if not got["stream"]:
                await svc.wait_job(job_id, 1.0)
        if not done_sent:
            yield b"data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away: don't leave the job running
            try:
                await svc.cancel(endpoint_id, job_id)
            except Exception:
                pass


# ---- worker protocol -------------------------------------------------------------------------


def _worker(call: Call) -> WorkerProtocol:
    call.svc.worker.check_worker(call.endpoint_id, call.authorization())
    return call.svc.worker


def _job_json(row: Any) -> str:
    parts = ['{"id":', json.dumps(row.id), ',"input":', row.input]
    if row.webhook:
        parts += [',"webhook":', json.dumps(row.webhook)]
    parts.append("}")
    return "".join(parts)


async def job_take(call: Call) -> None:
    svc = _worker(call)
    rows = await svc.take(call.endpoint_id, call.args[0], 1, call.is_disconnected)
    if not rows:
        await call.reply(204)
        return
    await call.reply(200, _job_json(rows[0]).encode())


async def job_take_batch(call: Call) -> None:
    svc = _worker(call)
    size = call.int_query("batch_size") or 1
    rows = await svc.take(call.endpoint_id, call.args[0], max(1, min(size, 1000)), call.is_disconnected)
    if not rows:
        await call.reply(204)
        return
    await call.reply(200, ("[" + ",".join(_job_json(r) for r in rows) + "]").encode())


_OK = b'{"ok":true}'


async def job_done(call: Call) -> None:
    svc = _worker(call)
    await svc.job_done(call.endpoint_id, call.args[0], call.args[1], await call.body())
    await call.reply(200, _OK)


async def job_stream(call: Call) -> None:
    svc = _worker(call)
    await svc.job_stream(call.endpoint_id, call.args[0], call.args[1], await call.body())
    await call.reply(200, _OK)


async def job_stop(call: Call) -> None:
    svc = _worker(call)
    ids = await svc.job_stop(call.endpoint_id, call.args[0])
    if not ids:
        await call.reply(204)
        return
    await call.json({"jobsToStop": ids})


async def ping(call: Call) -> None:
    svc = _worker(call)
    ids = [j for j in (call.query("job_id") or "").split(",") if j]
    unhealthy = (
        f"{call.query('check') or '?'}: {call.query('reason') or ''}" if call.query("status") == "unhealthy" else None
    )
    await svc.ping(call.endpoint_id, call.args[0], ids, call.query("runpod_version"), unhealthy)
    await call.reply(200, _OK)


_GET_POST = ("GET", "POST")
ROUTES: dict[str, _Route] = {
    "run": _Route(run, ("POST",), 0),
    "runsync": _Route(runsync, ("POST",), 0),
    "status": _Route(_job_action("status"), _GET_POST, 1),
    "stream": _Route(_job_action("stream"), _GET_POST, 1),
    "cancel": _Route(_job_action("cancel"), ("POST",), 1),
    "retry": _Route(_job_action("retry"), ("POST",), 1),
    "purge-queue": _Route(_endpoint_action("purge"), ("POST",), 0),
    "health": _Route(_endpoint_action("health"), ("GET",), 0),
    "openai": _Route(openai, _GET_POST, 0, rest=True),
    "job-take": _Route(job_take, ("GET",), 1),
    "job-take-batch": _Route(job_take_batch, ("GET",), 1),
    "job-done": _Route(job_done, ("POST",), 2),
    "job-stream": _Route(job_stream, ("POST",), 2),
    "job-stop": _Route(job_stop, ("GET",), 1),
    "ping": _Route(ping, ("GET",), 1),
}
