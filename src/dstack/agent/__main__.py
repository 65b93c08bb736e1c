"""``DSTACK_AGENT_TOKEN=T python -m dstack.agent --host H --port P --home DIR``: serve the agent API.

The token comes from the environment (or ``--token-file``, a file only its owner reads; ``--token``
still works but shows the token to every user in ``ps``), and is removed from the environment
the agent's jobs inherit.

Binds the socket itself so ``--port 0`` works, and writes ``DIR/agent.json`` only once the
server is listening, so whoever spawned the agent can read the real port from it. With
``--announce-early`` it is written as soon as the socket listens, before the app is even imported:
the spawner's first requests wait in the socket's backlog and are answered once the app is up, so
whatever the spawner does meanwhile (the Slurm backend records the allocation and prepares the
job's submission) overlaps the agent's cold start instead of following it.

Only argparse, json, os and socket are imported before the socket listens; uvicorn, FastAPI and
the agent's modules (about half a second of a cold start) come after, with the garbage collector
off until the app serves (importing makes many objects that all live on; collecting them while
importing costs ~10% of the start).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
from pathlib import Path

#: the listening socket's backlog (uvicorn's default): connections made while the app loads wait here
BACKLOG = 2048


def write_agent_json(home: Path, port: int, token: str) -> None:
    tmp = home / f".agent.json.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the token
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "port": port, "token": token}, f)
    os.replace(tmp, home / "agent.json")


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on such sockets, and without it
    # every small response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


async def serve(sock: socket.socket, token: str, home: Path, announced: bool = False) -> None:
    """Serve the agent API on `sock`; write `agent.json` once it serves, unless `announced`."""
    import asyncio

    import uvicorn

    from dstack.agent.app import create_app

    class _Server(uvicorn.Server):
        """A uvicorn server that says when it listens (uvicorn only sets a flag)."""

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.listening = asyncio.Event()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                self.listening.set()

    config = uvicorn.Config(create_app(home, token), log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    listening = asyncio.create_task(server.listening.wait())
    await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
    listening.cancel()
    if server.started:
        if not announced:
            write_agent_json(home, sock.getsockname()[1], token)
        gc.freeze()  # what startup made lives as long as the agent: later collections skip it
        gc.enable()
    await task


def main(argv: list[str] | None = None) -> None:
    gc.disable()  # until the app serves (see the module's docstring)
    parser = argparse.ArgumentParser(prog="python -m dstack.agent", description="dstack per-host agent")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--token",
        default=os.environ.pop("DSTACK_AGENT_TOKEN", None),
        help="default: $DSTACK_AGENT_TOKEN (a command line is visible to every user)",
    )
    parser.add_argument("--token-file", type=Path, help="read the token from this file instead")
    parser.add_argument("--home", type=Path, default=Path.home() / ".dstack" / "agent")
    parser.add_argument(
        "--announce-early",
        action="store_true",
        help="write agent.json as soon as the socket listens (requests wait until the app serves)",
    )
    args = parser.parse_args(argv)
    if args.token_file is not None:
        args.token = args.token_file.expanduser().read_text().strip()
    if not args.token:
        parser.error("DSTACK_AGENT_TOKEN (or --token-file) is required")
    home: Path = args.home.expanduser().resolve()
    from dstack.core.private import private_dir

    private_dir(home)  # agent.json holds the token; jobs/ the jobs' files
    sock = listening_socket(args.host, args.port)
    if args.announce_early:
        write_agent_json(home, sock.getsockname()[1], args.token)
    import asyncio
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(sock, args.token, home, announced=args.announce_early))


if __name__ == "__main__":
    main()
