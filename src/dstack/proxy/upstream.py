"""A small HTTP/1.1 client with persistent connections, built for the proxy's hot path.

Why not httpx/aiohttp: the proxy forwards tiny requests at thousands per second on few cores;
a protocol on raw asyncio transports with the C `httptools` parser costs a fraction of a
general-purpose client (see bench/proxy). It does exactly what forwarding needs: write a
request head and a (streamed) body, read the response head, hand the body over chunk by chunk
with back-pressure, and keep the connection for the next request when HTTP allows.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections import deque

import httptools

Key = tuple[str, str, int]  # (scheme, host, port)

_HIGH_WATER = 1 << 20  # pause reading from the upstream when this much body is queued


class UpstreamError(Exception):
    """The upstream failed; `status` is what the proxy answers with."""

    status = 502


class UpstreamConnectError(UpstreamError):
    """Could not open a connection: nothing was sent, so another replica may take the request."""


class UpstreamClosed(UpstreamError):
    """The connection closed before a complete response arrived."""


class UpstreamTimeout(UpstreamError):
    status = 504


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Key) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.until_eof = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.read_paused = False
        self.got_bytes = False
        self.exc: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            self.exc = UpstreamError(f"invalid HTTP response from the replica: {e}")
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.exc is None:
            if self.head_done and self.until_eof:
                self.complete = True
            else:
                self.exc = UpstreamClosed("the replica closed the connection before the response was complete")
        self._wake()
        d = self._drain
        if d is not None and not d.done():
            d.set_exception(UpstreamClosed("the replica closed the connection while receiving the request"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 1xx interim response: wait for the final one
            self.headers = []
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        framed = status in (204, 304)
        for name, value in self.headers:
            if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
                framed = True
                break
        self.until_eof = not framed
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
            self._wake()

    # waiting
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _expire(self, fut: asyncio.Future[None], what: str) -> None:
        if not fut.done():
            fut.set_exception(UpstreamTimeout(f"the replica did not answer within the timeout ({what})"))

    async def _wait(self, timeout: float, what: str) -> None:
        fut = self.loop.create_future()
        self.waiter = fut
        handle = self.loop.call_later(timeout, self._expire, fut, what)
        try:
            await fut
        finally:
            handle.cancel()
            self.waiter = None

    # request side
    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamClosed("the connection to the replica is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None
        if self.closed and not self.head_done:
            raise self.exc or UpstreamClosed("the connection to the replica is closed")

    async def read_head(self, timeout: float) -> None:
        while not self.head_done:
            if self.exc is not None:
                raise self.exc
            await self._wait(timeout, "waiting for the response headers")

    async def read_body(self, timeout: float) -> tuple[bytes, bool]:
        """Next body bytes (all that is queued) and whether the body is complete."""
        while not self.chunks:
            if self.complete:
                return b"", True
            if self.exc is not None:
                raise self.exc
            await self._wait(timeout, "waiting for the response body")
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join([chunks.popleft() for _ in range(len(chunks))])
        self.buffered = 0
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
        return data, self.complete

    async def read_all(self, timeout: float) -> bytes:
        parts = []
        while True:
            data, done = await self.read_body(timeout)
            if data:
                parts.append(data)
            if done:
                return b"".join(parts)

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per (scheme, host, port)."""

    def __init__(
        self, connect_timeout: float = 10.0, read_timeout: float = 300.0, max_idle_per_host: int = 256
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[Key, list[Connection]] = {}
        self._ssl: _ssl.SSLContext | None = None

    async def acquire(self, key: Key) -> tuple[Connection, bool]:
        """A connection to `key` and whether it was reused (a reused one may turn out stale)."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reset()
                return conn, True
        return await self.connect(key), False

    async def connect(self, key: Key) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        ssl_ctx = None
        if scheme in ("https", "wss"):
            if self._ssl is None:
                self._ssl = _ssl.create_default_context()
            ssl_ctx = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: Connection(loop, key), host, port, ssl=ssl_ctx)
        except TimeoutError as e:
            raise UpstreamConnectError(f"timed out connecting to the replica at {host}:{port}") from e
        except OSError as e:
            raise UpstreamConnectError(f"could not connect to the replica at {host}:{port}: {e.strerror or e}") from e
        return conn

    def release(self, conn: Connection) -> None:
        """Keep the connection for reuse if its response was read to the end and HTTP allows it."""
        if conn.complete and conn.keep_alive and not conn.closed and conn.exc is None and not conn.chunks:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.max_idle_per_host:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
