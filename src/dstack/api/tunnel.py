"""The client end of the server's WebSocket tunnel to a job's port (server/routers/tunnel.py).

`bridge_stdio` is OpenSSH's `ProxyCommand` (`dstack tunnel RUN`): bytes from stdin go to the job's
SSH server and its answers to stdout. `TunnelForwarder` listens on local ports and opens one
tunnel per accepted connection (`dstack attach` on hosts the client cannot reach directly).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

CHUNK = 65536


class TunnelError(Exception):
    pass


def tunnel_url(base_url: str, project: str, run_name: str, port: int | None) -> str:
    parts = urlsplit(base_url.rstrip("/"))
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = f"port={port}" if port is not None else "ssh=1"
    path = f"{parts.path}/api/project/{quote(project, safe='')}/runs/{quote(run_name, safe='')}/tunnel"
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def open_tunnel(base_url: str, token: str, project: str, run_name: str, port: int | None) -> ClientConnection:
    """A connected tunnel; `TunnelError` says why not (the server's close reason)."""
    url = tunnel_url(base_url, project, run_name, port)
    try:
        return connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            max_size=None,
            open_timeout=30,
            proxy=None,
            compression=None,
        )
    except ConnectionClosed as e:
        reason = e.rcvd.reason if e.rcvd is not None else "closed"
        raise TunnelError(f"tunnel to {run_name} refused: {reason}") from e
    except Exception as e:  # handshake refused (HTTP status), connection refused, ...
        raise TunnelError(f"cannot open a tunnel to {run_name}: {e}") from e


def _pump_to_ws(read: Callable[[int], bytes], ws: ClientConnection) -> None:
    try:
        while data := read(CHUNK):
            ws.send(data)
    except (OSError, ConnectionClosed):
        pass
    finally:
        ws.close()


def refusal(e: ConnectionClosed) -> str | None:
    """The server's reason when it closed the tunnel as a refusal (codes 4xxx), else None."""
    if e.rcvd is not None and 4000 <= e.rcvd.code < 5000:
        return e.rcvd.reason or f"closed with code {e.rcvd.code}"
    return None


def bridge_stdio(ws: ClientConnection) -> str | None:
    """Relay stdin → tunnel and tunnel → stdout until either side ends; the server's refusal, if any."""
    try:
        first = ws.recv(timeout=0.05)
    except TimeoutError:
        first = b""
    except ConnectionClosed as e:
        return refusal(e)
    threading.Thread(target=_pump_to_ws, args=(lambda n: os.read(0, n), ws), daemon=True).start()
    try:
        if first:
            os.write(1, first if isinstance(first, bytes) else first.encode())
        for message in ws:
            os.write(1, message if isinstance(message, bytes) else message.encode())
    except ConnectionClosed as e:
        return refusal(e)
    except OSError:
        pass
    return None


class TunnelForwarder:
    """Local listeners whose connections each go through a tunnel to one job port."""

    def __init__(self, base_url: str, token: str, project: str, run_name: str) -> None:
        self.base_url, self.token, self.project, self.run_name = base_url, token, project, run_name
        self.mappings: list[tuple[int, int]] = []
        self._sockets: list[socket.socket] = []

    def start(self, requested: list[tuple[int, int]], bind_address: str = "127.0.0.1") -> None:
        for local, remote in requested:
            sock = socket.create_server((bind_address, local))
            self._sockets.append(sock)
            self.mappings.append((sock.getsockname()[1], remote))
            threading.Thread(target=self._accept, args=(sock, remote), daemon=True).start()

    def _accept(self, sock: socket.socket, remote: int) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, remote), daemon=True).start()

    def _serve(self, conn: socket.socket, remote: int) -> None:
        try:
            ws = open_tunnel(self.base_url, self.token, self.project, self.run_name, remote)
        except TunnelError:
            conn.close()
            return
        threading.Thread(target=_pump_to_ws, args=(conn.recv, ws), daemon=True).start()
        try:
            for message in ws:
                conn.sendall(message if isinstance(message, bytes) else message.encode())
        except (OSError, ConnectionClosed):
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        for sock in self._sockets:
            sock.close()
