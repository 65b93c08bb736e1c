"""The SQLite executor on a real database file: batches share transactions, a failing operation
fails alone, and nothing is reported done before it is committed."""

import asyncio
import sqlite3

import pytest
from sqlalchemy import func, insert, select

import dstack.serverless.models  # noqa: F401  (tables)
from dstack.server.db import Database
from dstack.serverless.executor import SqliteExecutor
from dstack.serverless.models import ServerlessWorkerModel
from tests.serverless.helpers import seed_endpoint

WK = ServerlessWorkerModel.__table__


@pytest.fixture
async def db_url(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'q.db'}"
    db = Database(url)
    await seed_endpoint(db)
    await db.dispose()
    return url


def _add(worker_id: str):
    return lambda conn: conn.execute(insert(WK).values(worker_id=worker_id, endpoint_id="ep", state="ready",
                                                       created_at=0.0, jobs_in_flight=0))


async def test_concurrent_writes_share_batches_and_are_committed(db_url, tmp_path):
    ex = SqliteExecutor(db_url)
    batches = []
    real = ex._run_batch
    ex._run_batch = lambda conn, batch: (batches.append(len(batch)), real(conn, batch))[1]
    try:
        await asyncio.gather(*(ex.write(_add(f"w{i}")) for i in range(300)))
        assert sum(batches) == 300 and len(batches) < 300  # several writes per transaction
        # committed: another connection (not the executor's) sees every row
        with sqlite3.connect(tmp_path / "q.db") as other:
            assert other.execute("select count(*) from serverless_workers").fetchone()[0] == 300
        assert await ex.read(lambda c: c.execute(select(func.count()).select_from(WK)).scalar()) == 300
    finally:
        await ex.close()


async def test_a_failing_operation_fails_alone(db_url):
    ex = SqliteExecutor(db_url)

    def broken(conn):
        _add("dup")(conn)
        _add("dup")(conn)  # primary key violation after a first successful statement

    try:
        results = await asyncio.gather(ex.write(_add("a")), ex.write(broken), ex.write(_add("b")),
                                       return_exceptions=True)
        assert results[0] is not None and not isinstance(results[0], Exception)
        assert isinstance(results[1], Exception) and "UNIQUE" in str(results[1])
        assert not isinstance(results[2], Exception)
        ids = await ex.read(lambda c: sorted(r[0] for r in c.execute(select(WK.c.worker_id))))
        assert ids == ["a", "b"]  # nothing of the failed operation stayed, nothing else was lost
    finally:
        await ex.close()
