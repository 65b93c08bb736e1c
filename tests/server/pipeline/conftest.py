"""A real database per test (SQLite, and PostgreSQL when DSTACK_TEST_POSTGRES is set) and fake
agents reached through `httpx.MockTransport`: the pipeline runs in-process, no process starts."""

from __future__ import annotations

import asyncio
import os

import pytest

from dstack.server.db import Base, Database
from tests.pg import fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'pipeline.db'}"
    else:
        pg = os.environ.get("DSTACK_TEST_POSTGRES")
        if not pg:
            pytest.skip("PostgreSQL tests need DSTACK_TEST_POSTGRES (a server URL); .ci/run starts one")
        fresh = await asyncio.to_thread(fresh_database, pg)  # it runs an event loop of its own
        url = "postgresql+asyncpg://" + fresh.split("://", 1)[1]
    database = Database(url)
    import dstack.server.models  # noqa: F401  (registers the tables)

    async with database.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield database
    await database.dispose()
