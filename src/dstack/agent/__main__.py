"""``DSTACK_AGENT_TOKEN=T python -m dstack.agent --host H --port P --home DIR``: serve the agent API.

The token comes from the environment (or ``--token-file``, a file only its owner reads; ``--token``
still works but shows the token to every user in ``ps``), and is removed from the environment
the agent's jobs inherit.

Binds the socket itself so ``--port 0`` works, and writes ``DIR/agent.json`` only once the
server is listening, so whoever spawned the agent can read the real port from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
from pathlib import Path

import uvicorn

from dstack.agent.app import create_app
from dstack.core.private import private_dir


def write_agent_json(home: Path, port: int, token: str) -> None:
    tmp = home / f".agent.json.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the token
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "port": port, "token": token}, f)
    os.replace(tmp, home / "agent.json")


class _Server(uvicorn.Server):
    """A uvicorn server that says when it listens (uvicorn only sets a flag)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


async def serve(host: str, port: int, token: str, home: Path) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on such sockets, and without it
    # every small response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    real_port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(home, token), log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    listening = asyncio.create_task(server.listening.wait())
    await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
    listening.cancel()
    if server.started:
        write_agent_json(home, real_port, token)
    await task


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    if args.token_file is not None:
        args.token = args.token_file.expanduser().read_text().strip()
    if not args.token:
        parser.error("DSTACK_AGENT_TOKEN (or --token-file) is required")
    home: Path = args.home.expanduser().resolve()
    private_dir(home)  # agent.json holds the token; jobs/ the jobs' files
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.host, args.port, args.token, home))


if __name__ == "__main__":
    main()
