"""Forwarding a job's ports to localhost, for `Run.attach()` and private endpoints."""

from __future__ import annotations

import asyncio
import threading

from dstack.core.models.runs import Run


def ports_to_forward(run: Run, overrides: list | None = None, address: str = "127.0.0.1") -> list[tuple[int, int]]:
    """(local port, job port) pairs. Same-number ports of a job on this host's own network need no forwarding."""
    conf = run.run_spec.configuration
    pairs: list[tuple[int, int]] = []
    for p in conf.get("ports") or []:
        local, remote = p.get("local_port"), p["container_port"]
        pairs.append((local if local is not None else 0, remote))
    extra = run.run_spec.configuration.get("_local_ports") or []
    pairs.extend((int(a), int(b)) for a, b in extra)
    for o in overrides or []:
        pairs.append((int(o[0]), int(o[1])))
    if address in ("127.0.0.1", "localhost"):
        return [(loc, rem) for loc, rem in pairs if loc != rem]
    return pairs


class PortForwarder:
    """A small TCP relay on its own event loop thread."""

    def __init__(self, host: str, mappings: list[tuple[int, int]], bind_address: str = "127.0.0.1") -> None:
        self.host = host
        self.requested = mappings
        self.bind_address = bind_address
        self.mappings: list[tuple[int, int]] = []
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="dstack-ports")
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(10)

    async def _open(self) -> None:
        for local, remote in self.requested:
            server = await asyncio.start_server(
                lambda r, w, remote=remote: self._relay(r, w, remote), self.bind_address, local
            )
            self._servers.append(server)
            self.mappings.append((server.sockets[0].getsockname()[1], remote))

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: int) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, remote)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                try:
                    dst.close()
                except RuntimeError:
                    pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def _close() -> None:
            for s in self._servers:
                s.close()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
