"""A stand-in for dstack's runner `/logs_ws`, fed from our log store.

dstack's official client reads an attached run's output from the runner's HTTP port (10999 in
the job) through its SSH tunnel: `GET /logs_ws[?start_time=<RFC 3339>]` upgraded to a WebSocket,
then one binary message per stored log chunk (the raw bytes), and a close once the job has ended
and everything was sent. This module answers that on the stream of an SSH `direct-tcpip` channel,
for one job: a minimal RFC 6455 server (handshake, unmasked binary frames, close), no extensions.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from datetime import datetime
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import select

from dstack.server.db import Database
from dstack.server.models import JobModel, RunModel
from dstack.server.services.logs import LogNotifier, poll_logs
from dstack.server.ssh_entry.access import JobTarget

logger = logging.getLogger(__name__)
#: the runner's HTTP port in dstack's jobs, where its client expects `/logs_ws`
RUNNER_HTTP_PORT = 10999
MAX_REQUEST_BYTES = 8192
HANDSHAKE_SECONDS = 15
PAGE = 1000
WAIT_SECONDS = 25
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One final, unmasked frame (servers never mask)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


class BadRequest(ValueError):
    pass


def parse_request(head: bytes) -> tuple[str, float | None]:
    """(Sec-WebSocket-Key, start time as unix seconds) of a `GET /logs_ws` upgrade request."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
    except ValueError:
        raise BadRequest("malformed request line") from None
    url = urlsplit(target)
    if method != "GET" or url.path != "/logs_ws":
        raise BadRequest(f"only GET /logs_ws is served here, not {method[:10]} {url.path[:50]}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    key = headers.get("sec-websocket-key", "")
    if headers.get("upgrade", "").lower() != "websocket" or not 16 <= len(key) <= 64:
        raise BadRequest("not a WebSocket upgrade")
    start: float | None = None
    values = parse_qs(url.query).get("start_time")
    if values:
        try:
            # dstack's runner keeps whole seconds of it
            start = float(int(datetime.fromisoformat(values[0].replace("Z", "+00:00")).timestamp()))
        except ValueError:
            raise BadRequest("failed to parse start_time value") from None
    return key, start


async def serve(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    db: Database,
    notifier: LogNotifier,
    target: JobTarget,
) -> None:
    """Answer one `/logs_ws` connection for `target`'s job, then close it."""
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDSHAKE_SECONDS)
            if len(head) > MAX_REQUEST_BYTES:
                raise BadRequest("request too large")
            key, start = parse_request(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, BadRequest) as e:
            reason = str(e) if isinstance(e, BadRequest) else "incomplete request"
            body = reason.encode()
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
        )
        await writer.drain()
        # the client only pings and closes: read until it goes, and stop streaming then
        gone = asyncio.create_task(_drain(reader))
        stream = asyncio.create_task(_stream(writer, db, notifier, target, start))
        await asyncio.wait([gone, stream], return_when=asyncio.FIRST_COMPLETED)
        for task in (gone, stream):
            task.cancel()
        await asyncio.gather(gone, stream, return_exceptions=True)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(4096):
        pass


async def _stream(
    writer: asyncio.StreamWriter, db: Database, notifier: LogNotifier, target: JobTarget, start: float | None
) -> None:
    cursor = 0
    while True:
        async with db.session() as session:
            run = await session.get(RunModel, target.run_id)
            status = (
                await session.execute(select(JobModel.status).where(JobModel.id == target.job_id))
            ).scalar_one_or_none()
            if run is None or status is None:
                break
            # read after the job's state: its final state commits with its last lines
            ended = status.is_finished()
            page = await poll_logs(
                session,
                notifier,
                run,
                0,
                0,
                cursor,
                PAGE,
                0 if ended else WAIT_SECONDS,
                submission_id=target.job_id,
                after_time=start,
            )
        for log in page["logs"]:
            writer.write(frame(base64.b64decode(log["message"])))
        await writer.drain()
        cursor = page["next_token"]
        if ended and len(page["logs"]) < PAGE:
            break
    writer.write(frame((1000).to_bytes(2, "big"), opcode=0x8))
    await writer.drain()
