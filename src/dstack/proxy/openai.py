"""The OpenAI-compatible model endpoint: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

`format: openai` services get the request as is (at `model.prefix`), streamed back untouched;
`format: tgi` services get it converted to TGI `/generate` or `/generate_stream` (see tgi.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dstack.proxy import tgi
from dstack.proxy.auth import FORBIDDEN, UNAUTHENTICATED, bearer_token
from dstack.proxy.forward import Proxy, fail_over
from dstack.proxy.http import Receive, Scope, Send, read_body, send_json
from dstack.proxy.registry import ReplicaState, ServiceState
from dstack.proxy.upstream import Connection, UpstreamClosed, UpstreamConnectError, UpstreamError

_MAX_BODY = 32 << 20
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def _error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: Any = None,
    param: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    body = tgi.error_object(message, type_, code, param)
    body["detail"] = message  # dstack clients read `detail`; OpenAI SDKs read `error`
    await send_json(send, status, body, headers)


async def _missing_token(send: Send) -> None:
    await _error(
        send,
        UNAUTHENTICATED,
        "Authentication required: send 'Authorization: Bearer <dstack user token>'",
        "authentication_error",
        "missing_token",
        headers=[(b"www-authenticate", b"Bearer")],
    )


class ModelEndpoint:
    """Serves `/v1/...` for one project (or every project when `project` is None, on a gateway)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def handle(self, scope: Scope, receive: Receive, send: Send, project: str | None, path: str) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        method = scope["method"]
        if path in ("/v1/models", "/models") and method == "GET":
            await self._list(scope, send, project)
            return
        if not path.startswith("/v1/") or method != "POST":
            await _error(send, 404, f"Unknown endpoint {method} {path}", "invalid_request_error", "not_found")
            return
        try:
            raw = await read_body(receive, _MAX_BODY)
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except (ValueError, ConnectionResetError) as e:
            await _error(send, 400, f"The request body must be a JSON object: {e}", "invalid_request_error")
            return
        name = req.get("model")
        if not isinstance(name, str) or not name:
            await _error(send, 400, "'model' is required", "invalid_request_error", "missing_model", "model")
            return
        state = self.proxy.registry.find_model(project, name)
        if state is None:
            if not await self._authorize_project(scope, send, project):  # no oracle of model names
                return
            await _error(
                send,
                404,
                f"The model '{name}' does not exist" + (f" in project '{project}'" if project else ""),
                "invalid_request_error",
                "model_not_found",
                "model",
            )
            return
        if not await self._authorize(scope, send, state):
            return
        model = state.info.model
        assert model is not None
        sub = path[len("/v1") :]
        if model.format == "openai":
            target = (model.prefix.rstrip("/") + sub).encode()
            qs = scope.get("query_string") or b""
            if qs:
                target += b"?" + qs
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}

            await self.proxy.forward(scope, replay, send, state, target)
            return
        if sub not in ("/chat/completions", "/completions"):
            await _error(
                send,
                404,
                f"Model '{name}' (format tgi) supports only /v1/chat/completions and /v1/completions",
                "invalid_request_error",
                "not_found",
            )
            return
        metrics = state.metrics
        started = metrics.start()
        status = 500
        try:
            status = await self._tgi(scope, receive, send, state, req, chat=sub == "/chat/completions")
        finally:
            metrics.finish(started, status)

    async def _authorize(self, scope: Scope, send: Send, state: ServiceState) -> bool:
        if not state.info.auth:
            return True
        return await self._authorize_project(scope, send, state.info.project)

    async def _authorize_project(self, scope: Scope, send: Send, project: str | None) -> bool:
        """Answers 401/403 and returns False unless the caller's token may reach `project`
        (with no project, on a gateway serving several: unless there is a token)."""
        token = bearer_token(scope["headers"])
        if token is None:
            await _missing_token(send)
            return False
        if project is not None and not await self.proxy.auth.allowed(project, token):
            await _error(
                send,
                FORBIDDEN,
                f"The token is not valid, or its user is not a member of project '{project}'",
                "permission_error",
                "forbidden",
            )
            return False
        return True

    async def _list(self, scope: Scope, send: Send, project: str | None) -> None:
        token = bearer_token(scope["headers"])
        states = self.proxy.registry.models(project)
        visible = []
        denied = 0
        for s in states:
            if not s.info.auth or (token is not None and await self.proxy.auth.allowed(s.info.project, token)):
                visible.append(s)
            else:
                denied += 1
        if not visible and denied:
            if token is None:
                await _missing_token(send)
            else:
                await _error(
                    send,
                    FORBIDDEN,
                    "The token is not valid, or its user is not a member of the project",
                    "permission_error",
                    "forbidden",
                )
            return
        data = [
            {"id": s.info.model.name, "object": "model", "created": s.created, "owned_by": s.info.project}  # type: ignore[union-attr]
            for s in visible
        ]
        await send_json(send, 200, {"object": "list", "data": data})

    async def _open(
        self, state: ServiceState, send: Send, path: str, payload: dict[str, Any]
    ) -> tuple[Connection, ReplicaState] | None:
        """POST JSON to a replica (retrying a refused connection once elsewhere); None after answering an error."""
        replica = await self.proxy.choose(state, send)
        if replica is None:
            return None
        body = json.dumps(payload).encode()
        pool = self.proxy.pool
        retried = False
        while True:
            target = (replica.base_path + path).encode()
            head = b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (
                target,
                replica.hostport,
                len(body),
            )
            replica.in_flight += 1
            conn = None
            try:
                conn, reused = await pool.acquire(replica.key)
                try:
                    conn.write(head + body)
                    await conn.read_head(pool.read_timeout)
                except UpstreamClosed:
                    conn.close()
                    if not (reused and not conn.got_bytes):
                        raise
                    conn = await pool.connect(replica.key)
                    conn.write(head + body)
                    await conn.read_head(pool.read_timeout)
                return conn, replica
            except UpstreamConnectError as e:
                replica.in_flight -= 1
                alt = fail_over(state, replica, retried)
                if alt is not None:
                    retried, replica = True, alt
                    continue
                await _error(send, 502, f"The model server is unreachable: {e}", "upstream_error", 502)
                return None
            except UpstreamError as e:
                replica.in_flight -= 1
                if conn is not None:
                    conn.close()
                await _error(send, e.status, f"The model server failed: {e}", "upstream_error", e.status)
                return None

    async def _tgi(
        self, scope: Scope, receive: Receive, send: Send, state: ServiceState, req: dict[str, Any], chat: bool
    ) -> int:
        model = state.info.model
        assert model is not None
        where = f" (service {state.info.project}/{state.info.run_name})"
        stream = bool(req.get("stream"))
        try:
            if chat:
                prompt = tgi.render_chat(model, req.get("messages"), where)  # type: ignore[arg-type]
            else:
                prompt = req.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise tgi.ConversionError("'prompt' must be a string (one prompt per request)", param="prompt")
            stops = tgi.stop_list(req, model)
            params = tgi.tgi_parameters(req, stops, stream)
        except tgi.ConversionError as e:
            await _error(send, 400, str(e), "invalid_request_error", e.code, e.param)
            return 400
        payload = {"inputs": prompt, "parameters": params}
        opened = await self._open(state, send, "/generate_stream" if stream else "/generate", payload)
        if opened is None:
            return 502
        conn, replica = opened
        pool = self.proxy.pool
        try:
            if conn.status >= 400 or not stream:
                body = await conn.read_all(pool.read_timeout)
                pool.release(conn)
                if conn.status >= 400:
                    await send_json(send, conn.status, tgi.tgi_error(conn.status, body))
                    return conn.status
                out = json.loads(body)
                if isinstance(out, list):
                    out = out[0]
                details = out.get("details") or {}
                reason = tgi.finish_reason(details.get("finish_reason"))
                text = out.get("generated_text", "")
                if reason == "stop":
                    text = tgi.trim_stop(text, stops)
                prompt_tokens = details.get("input_length")
                if prompt_tokens is None:
                    prompt_tokens = len(details.get("prefill") or []) or await self._count_tokens(state, prompt)
                resp = tgi.full_response(
                    chat, model.name, text, reason, tgi.usage(prompt_tokens, details.get("generated_tokens", 0))
                )
                await send_json(send, 200, resp)
                return 200
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            conv = tgi.StreamConverter(chat, model.name, stops, include_usage, None)
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            first = conv.start()
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            buf = b""
            done = False
            while not done:
                try:
                    data, eof = await conn.read_body(pool.read_timeout)
                except UpstreamError as e:
                    err = tgi.error_object(f"The model server failed mid-stream: {e}", "upstream_error", e.status)
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + json.dumps(err).encode() + b"\n\n",
                            "more_body": False,
                        }
                    )
                    return e.status
                buf += data
                out = b""
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    ev = json.loads(line[5:])
                    if "error" in ev and not ev.get("token"):
                        err = tgi.error_object(str(ev["error"]), str(ev.get("error_type") or "upstream_error"), 500)
                        out += b"data: " + json.dumps(err).encode() + b"\n\n"
                        done = True
                        break
                    piece, done = conv.event(ev)
                    out += piece
                    if done:
                        break
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if eof and not done:
                    err = tgi.error_object(
                        "The model server ended the stream without a final event", "upstream_error", 502
                    )
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + json.dumps(err).encode() + b"\n\n",
                            "more_body": True,
                        }
                    )
                    done = True
            if conn.complete:
                pool.release(conn)
            else:
                conn.close()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return 200
        finally:
            replica.in_flight -= 1
            if not conn.complete:
                conn.close()

    async def _count_tokens(self, state: ServiceState, prompt: str) -> int:
        """Prompt length via TGI `/tokenize`, else a rough estimate (4 characters a token)."""
        replica = state.pick()
        if replica is not None:
            pool = self.proxy.pool
            body = json.dumps({"inputs": prompt}).encode()
            try:
                conn, _ = await pool.acquire(replica.key)
                conn.write(
                    b"POST %s/tokenize HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (replica.base_path.encode(), replica.hostport, len(body), body)
                )
                await conn.read_head(10.0)
                data = await conn.read_all(10.0)
                pool.release(conn)
                if conn.status == 200:
                    toks = json.loads(data)
                    if isinstance(toks, list):
                        return len(toks)
            except (UpstreamError, ValueError):
                pass
        return max(1, len(prompt) // 4)
