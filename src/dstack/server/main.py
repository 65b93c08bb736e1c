"""`dstack server`: start the control plane on the embedded defaults."""

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from dstack.server.app import DataPlaneFirst, create_app
from dstack.server.settings import ServerSettings


def run_server(host: str = "127.0.0.1", port: int = 3000, log_level: str = "info") -> None:
    settings = ServerSettings(host=host, port=port)
    app = create_app(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per agent call (several per job per second) would drown what the server itself says.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    _announce_on_start(app, settings)
    config = uvicorn.Config(
        DataPlaneFirst(app),
        host=host,
        port=port,
        log_level=log_level if log_level != "info" else "warning",
        loop="uvloop",
        http="httptools",
        timeout_keep_alive=75,
        access_log=False,
    )
    server = uvicorn.Server(config)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:  # asyncio.run() would ignore `loop`
        runner.run(server.serve())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _announce_on_start(app: Any, settings: ServerSettings) -> None:
    async def announce(app: Any) -> None:
        token = app.state.admin_token
        url = settings.url
        print(f"The dstack server {url} is running (data in {settings.server_dir})", flush=True)
        if token:
            from dstack.api.config import add_project

            add_project("main", url, token, default=True)
            print(f"The admin token is {token}", flush=True)
            print("The client config is written to ~/.dstack/config.yml (project 'main')", flush=True)
        else:
            print(
                "Admin already exists; its token is in ~/.dstack/config.yml "
                "(set DSTACK_SERVER_ADMIN_TOKEN to choose it)",
                flush=True,
            )

    app.state.startup_hooks.append(announce)


if __name__ == "__main__":
    port = int(os.environ.get("DSTACK_SERVER_PORT", "3000"))
    run_server(port=port)
    sys.exit(0)
