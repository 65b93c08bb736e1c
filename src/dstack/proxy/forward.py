"""The hot path: pick a replica, stream the request to it, stream the answer back (raw ASGI)."""

from __future__ import annotations

import asyncio
import logging
import time

from dstack.proxy.auth import FORBIDDEN, UNAUTHENTICATED, AuthCache, Authorizer, bearer_token
from dstack.proxy.http import Receive, Scope, Send, send_detail
from dstack.proxy.registry import ReplicaState, ServiceRegistry, ServiceState
from dstack.proxy.upstream import (
    Connection,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
)

log = logging.getLogger(__name__)

#: hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, never forwarded either way
_HOP_RESP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: ...and on requests also what the proxy sets itself towards the replica
_HOP_REQ = _HOP_RESP | {
    b"host",
    b"expect",
    b"content-length",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-prefix",
}
_UNAUTHORIZED = [(b"www-authenticate", b"Bearer")]
#: how long a replica that refused or dropped a connection gets no new requests (its probe decides after)
DOWN_SECONDS = 2.0
#: methods RFC 9110 calls idempotent: a request that got no answer may be sent to another replica
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class Proxy:
    """Shared state of one proxy instance: registry, token cache, upstream connections, timeouts."""

    def __init__(
        self,
        registry: ServiceRegistry,
        authorizer: Authorizer | AuthCache | None,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        auth_ttl: float = 5.0,
    ) -> None:
        self.registry = registry
        # the server passes the cache it shares with `/v2`; a standalone proxy (a gateway) builds its own
        self.auth = authorizer if isinstance(authorizer, AuthCache) else AuthCache(authorizer, ttl=auth_ttl)
        self.pool = UpstreamPool(connect_timeout=connect_timeout, read_timeout=read_timeout)

    @property
    def read_timeout(self) -> float:
        return self.pool.read_timeout

    async def authorize(self, scope: Scope, send: Send, project: str, needed: bool) -> bool:
        """Answers 401/403 and returns False unless the request may reach `project`'s service."""
        if not needed:
            return True
        token = bearer_token(scope["headers"])
        if token is None:
            await send_detail(
                send,
                UNAUTHENTICATED,
                "Authentication required: send 'Authorization: Bearer <dstack user token>'",
                _UNAUTHORIZED,
            )
            return False
        if await self.auth.allowed(project, token):
            return True
        await send_detail(
            send, FORBIDDEN, f"The token is not valid, or its user is not a member of project '{project}'"
        )
        return False

    async def choose(self, state: ServiceState, send: Send) -> ReplicaState | None:
        """A ready replica; holds the request while a scaled-to-zero service wakes up."""
        r = state.pick()
        if r is not None:
            return r
        info = state.info
        name = f"{info.project}/{info.run_name}"
        if not self.registry.maybe_wake(state):
            why = f" (last replica failure: {info.last_error})" if info.last_error else ""
            await send_detail(
                send, 503, f"Service '{name}' has no ready replica{why}; try again later", [(b"retry-after", b"5")]
            )
            return None
        deadline = time.monotonic() + info.hold_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await send_detail(
                    send,
                    503,
                    f"Service '{name}' is scaled to zero and no replica became ready within {info.hold_timeout:g} s; try again later",
                    [(b"retry-after", b"10")],
                )
                return None
            try:
                async with asyncio.timeout(remaining):
                    await state.ready_event.wait()
            except TimeoutError:
                continue
            if self.registry.get(info.project, info.run_name) is not state:
                await send_detail(send, 404, f"Service '{name}' was removed")
                return None
            r = state.pick()
            if r is not None:
                return r
            await asyncio.sleep(0.05)

    def request_head(
        self, scope: Scope, state: ServiceState, target: bytes, prefix: str, extra: list[tuple[bytes, bytes]]
    ) -> bytes:
        """Request line and headers except `host` (added per replica) and body framing."""
        drop_auth = state.info.auth
        out = [scope["method"].encode(), b" ", target, b" HTTP/1.1\r\n"]
        hdrs = scope["headers"]
        conn_tokens: set[bytes] | None = None
        xff = b""
        host = b""
        for name, value in hdrs:
            if name == b"connection":
                conn_tokens = {t.strip().lower() for t in value.split(b",")}
        for name, value in hdrs:
            if name in _HOP_REQ:
                if name == b"host":
                    host = value
                continue
            if conn_tokens and name in conn_tokens:
                continue
            if name == b"authorization" and drop_auth:
                continue
            if name == b"x-forwarded-for":
                xff = value + b", "
                continue
            out += (name, b": ", value, b"\r\n")
        client = scope.get("client")
        if client:
            out += (b"x-forwarded-for: ", xff, client[0].encode(), b"\r\n")
        out += (b"x-forwarded-proto: ", scope.get("scheme", "http").encode(), b"\r\n")
        if host:
            out += (b"x-forwarded-host: ", host, b"\r\n")
        if prefix:
            out += (b"x-forwarded-prefix: ", prefix.encode(), b"\r\n")
        for name, value in extra:
            out += (name, b": ", value, b"\r\n")
        return b"".join(out)

    async def forward(
        self, scope: Scope, receive: Receive, send: Send, state: ServiceState, target: bytes, prefix: str = ""
    ) -> None:
        """Proxy one HTTP request to a replica of `state` (auth already checked)."""
        metrics = state.metrics
        started = metrics.start()
        status = 500
        try:
            status = await self._forward(scope, receive, send, state, target, prefix)
        finally:
            metrics.finish(started, status)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, state: ServiceState, target: bytes, prefix: str
    ) -> int:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return 499
        body: bytes = msg.get("body", b"")
        more: bool = msg.get("more_body", False)
        replica = await self.choose(state, send)
        if replica is None:
            return 503
        extra: list[tuple[bytes, bytes]] = []
        if more:
            clen = None
            for name, value in scope["headers"]:
                if name == b"content-length":
                    clen = value
            extra.append((b"content-length", clen) if clen is not None else (b"transfer-encoding", b"chunked"))
        elif body or scope["method"] in ("POST", "PUT", "PATCH"):
            extra.append((b"content-length", str(len(body)).encode()))
        if replica.base_path:
            target = replica.base_path.encode() + target
        head = self.request_head(scope, state, target, prefix, extra)
        chunked = more and extra[0][0] == b"transfer-encoding"
        pool = self.pool
        retried = False
        fresh_retry = False
        while True:
            replica.in_flight += 1
            conn: Connection | None = None
            try:
                if more or fresh_retry:
                    conn, reused = await pool.connect(replica.key), False
                else:
                    conn, reused = await pool.acquire(replica.key)
                conn.write(head + b"host: " + replica.hostport + b"\r\n\r\n" + (b"" if chunked else body))
                if more:
                    await self._stream_body(conn, receive, body, chunked)
                await conn.read_head(pool.read_timeout)
            except UpstreamConnectError as e:
                replica.in_flight -= 1
                alt = fail_over(state, replica, retried)
                if alt is not None:
                    retried, replica = True, alt
                    continue
                await send_detail(
                    send, 502, f"Replica '{replica.id}' of service '{state.info.run_name}' is unreachable: {e}"
                )
                return 502
            except UpstreamClosed as e:
                replica.in_flight -= 1
                assert conn is not None
                conn.close()
                if reused and not conn.got_bytes and not more and not fresh_retry:
                    fresh_retry = True  # a kept-alive connection went stale: the request is replayable
                    continue
                if not conn.got_bytes and not more and not retried and scope["method"] in _IDEMPOTENT:
                    # A fresh connection closed unanswered: through an SSH forward that is what a
                    # replica whose app stopped listening looks like. Like nginx's default
                    # `proxy_next_upstream error`, only a request that is safe to repeat goes to
                    # another replica; the probes take this one out meanwhile.
                    alt = fail_over(state, replica, retried)
                    if alt is not None:
                        retried, fresh_retry, replica = True, False, alt
                        continue
                await send_detail(send, 502, f"Replica '{replica.id}' of service '{state.info.run_name}' failed: {e}")
                return 502
            except UpstreamError as e:
                replica.in_flight -= 1
                if conn is not None:
                    conn.close()
                await send_detail(
                    send, e.status, f"Replica '{replica.id}' of service '{state.info.run_name}' failed: {e}"
                )
                return e.status
            except BaseException:
                replica.in_flight -= 1
                if conn is not None:
                    conn.close()
                raise
            break
        try:
            return await self._relay(scope, receive, send, conn)
        finally:
            replica.in_flight -= 1

    async def _stream_body(self, conn: Connection, receive: Receive, first: bytes, chunked: bool) -> None:
        """Write the client's body to the replica as it arrives (no buffering of uploads)."""
        chunk, more = first, True
        while True:
            if chunk:
                conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drain()
            if not more:
                break
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise UpstreamClosed("the client disconnected while sending the body")
            chunk, more = msg.get("body", b""), msg.get("more_body", False)
        if chunked:
            conn.write(b"0\r\n\r\n")

    async def _relay(self, scope: Scope, receive: Receive, send: Send, conn: Connection) -> int:
        status = conn.status
        headers = [(n, v) for n, v in conn.headers if n not in _HOP_RESP]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if scope["method"] == "HEAD":
            conn.close()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return status
        timeout = self.pool.read_timeout
        data, done = await conn.read_body(timeout) if conn.chunks or conn.complete else (b"", False)
        if done:
            self.pool.release(conn)
            await send({"type": "http.response.body", "body": data, "more_body": False})
            return status
        # A streamed answer (SSE, long download): stop the replica's work if the client goes away.
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, conn))
        released = False
        try:
            while True:
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                if done:
                    break
                try:
                    data, done = await conn.read_body(timeout)
                except UpstreamError as e:
                    log.warning("replica failed mid-response: %s", e)
                    conn.close()
                    return 502 if status < 500 else status
            released = True
            self.pool.release(conn)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return status
        finally:
            watcher.cancel()
            if not released:
                conn.close()


def fail_over(state: ServiceState, replica: ReplicaState, retried: bool) -> ReplicaState | None:
    """Keep new requests off `replica` for `DOWN_SECONDS`; the replica this request tries next,
    none once it has moved already (a request goes to two replicas at most)."""
    replica.down_until = time.monotonic() + DOWN_SECONDS
    return None if retried else state.pick(exclude=replica)


async def _watch_disconnect(receive: Receive, conn: Connection) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            conn.close()
            return
