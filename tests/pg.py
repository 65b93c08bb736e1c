"""A fresh PostgreSQL database per server, so tests (and benchmark runs) never see each other's rows."""

import asyncio
import os
import time


def fresh_database(server_url: str, prefix: str = "dstack_test") -> str:
    """CREATE DATABASE on the server `server_url` names; returns the new database's URL."""
    import asyncpg

    name = f"{prefix}_{os.getpid()}_{int(time.time() * 1e6)}"

    async def create() -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return server_url.rsplit("/", 1)[0] + "/" + name
