"""WebSocket forwarding: accept the client once the replica accepted, then relay both ways."""

from __future__ import annotations

import asyncio
import logging

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from dstack.proxy.http import Receive, Scope, Send

log = logging.getLogger(__name__)

_SKIP = frozenset(
    {
        b"host",
        b"connection",
        b"upgrade",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"content-length",
        b"transfer-encoding",
        b"keep-alive",
        b"te",
    }
)


async def deny(scope: Scope, send: Send, status: int, body: bytes) -> None:
    """Refuse a WebSocket handshake with an HTTP status where the server supports it."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008 if status in (401, 403) else 1011})


async def relay(scope: Scope, receive: Receive, send: Send, url: str, drop_auth: bool) -> int:
    """Connect to `url` (ws://replica/path?query) and relay frames until either side closes."""
    msg = await receive()  # websocket.connect
    if msg["type"] != "websocket.connect":
        return 499
    headers = []
    for name, value in scope["headers"]:
        if name in _SKIP or (drop_auth and name == b"authorization"):
            continue
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    client = scope.get("client")
    if client:
        headers.append(("X-Forwarded-For", client[0]))
    subprotocols = scope.get("subprotocols") or None
    try:
        upstream = await connect(
            url,
            additional_headers=headers,
            subprotocols=subprotocols,
            proxy=None,
            compression=None,
            user_agent_header=None,
            open_timeout=10,
            max_size=None,
            ping_interval=None,
        )
    except InvalidStatus as e:
        await deny(scope, send, e.response.status_code, b'{"detail": "the replica refused the WebSocket"}')
        return e.response.status_code
    except (TimeoutError, OSError, Exception) as e:
        log.info("websocket upstream %s failed: %s", url, e)
        await deny(scope, send, 502, b'{"detail": "could not open a WebSocket to the replica"}')
        return 502
    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

    async def client_to_upstream() -> None:
        while True:
            m = await receive()
            if m["type"] == "websocket.receive":
                if m.get("text") is not None:
                    await upstream.send(m["text"])
                elif m.get("bytes") is not None:
                    await upstream.send(m["bytes"])
            elif m["type"] == "websocket.disconnect":
                await upstream.close(code=m.get("code", 1000) if m.get("code", 1000) not in (1005, 1006) else 1000)
                return

    async def upstream_to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
        except ConnectionClosed:
            pass
        rcvd = upstream.close_code or 1000
        code = rcvd if rcvd not in (1005, 1006) else 1000
        try:
            await send({"type": "websocket.close", "code": code})
        except Exception:
            pass

    tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await upstream.close()
    return 101
