"""The queue's executors on real databases (SQLite file; PostgreSQL when DSTACK_TEST_POSTGRES is
set): calls that arrive together share transactions, a failing call fails alone, and nothing is
reported done before it is committed."""

import asyncio
import os

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

import dstack.serverless.models  # noqa: F401  (tables)
from dstack.server.db import Database
from dstack.serverless.executor import executor_for
from dstack.serverless.models import ServerlessWorkerModel
from tests.conftest import _database_url
from tests.serverless.helpers import seed_endpoint

WK = ServerlessWorkerModel.__table__


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request, tmp_path):
    if request.param == "postgres" and not os.environ.get("DSTACK_TEST_POSTGRES"):
        pytest.skip("needs PostgreSQL: set DSTACK_TEST_POSTGRES (.ci/run does)")
    url = await asyncio.to_thread(_database_url, tmp_path, request.param)
    url = (
        url.replace("postgresql://", "postgresql+asyncpg://", 1) if url else f"sqlite+aiosqlite:///{tmp_path / 'q.db'}"
    )
    database = Database(url)
    await seed_endpoint(database)
    yield database
    await database.dispose()


def _add(worker_id: str):
    return lambda conn: conn.execute(
        insert(WK).values(worker_id=worker_id, endpoint_id="ep", state="ready", created_at=0.0, jobs_in_flight=0)
    )


async def _count_elsewhere(db: Database) -> int:
    """Rows as another connection (the ORM's pool, not the executor's) sees them: committed ones."""
    async with db.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(WK))).scalar()


async def test_concurrent_writes_share_transactions_and_are_committed(db):
    ex = executor_for(db)
    try:
        await asyncio.gather(*(ex.write(_add(f"w{i}")) for i in range(300)))
        assert 0 < ex.batches < 300  # several writes per transaction
        assert await _count_elsewhere(db) == 300
        assert await ex.read(lambda c: c.execute(select(func.count()).select_from(WK)).scalar()) == 300
    finally:
        await ex.close()


async def test_a_failing_call_fails_alone(db):
    ex = executor_for(db)

    def broken(conn):
        _add("dup")(conn)
        _add("dup")(conn)  # a primary key violation after a first statement that succeeded

    try:
        results = await asyncio.gather(
            ex.write(_add("a")), ex.write(broken), ex.write(_add("b")), return_exceptions=True
        )
        assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
        assert isinstance(results[1], IntegrityError)
        ids = await ex.read(lambda c: sorted(r[0] for r in c.execute(select(WK.c.worker_id))))
        assert ids == ["a", "b"]  # nothing of the failed call stayed, nothing of the others was lost
    finally:
        await ex.close()
