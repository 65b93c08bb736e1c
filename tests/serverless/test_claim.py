"""The queue's claim on both databases: a take for n jobs gets at most n, concurrent takes never
share a job, and every claimed job is one somebody received."""

import asyncio
import os

import pytest

import dstack.serverless.models  # noqa: F401  (tables)
from dstack.server.db import Database
from dstack.serverless.queue import Store
from tests.conftest import _database_url
from tests.serverless.helpers import seed_endpoint


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "postgres" and not os.environ.get("DSTACK_TEST_POSTGRES"):
        pytest.skip("needs PostgreSQL: set DSTACK_TEST_POSTGRES (.ci/run does)")
    url = _database_url(tmp_path, request.param)
    return (
        url.replace("postgresql://", "postgresql+asyncpg://", 1) if url else f"sqlite+aiosqlite:///{tmp_path / 'q.db'}"
    )


async def test_takes_claim_exactly_what_they_return(db_url):
    db = Database(db_url)
    try:
        await seed_endpoint(db)
        store = Store(db)
        ids = [await store.submit("ep", f'{{"i": {i}}}', None, 60_000, 600_000, False) for i in range(12)]
        # eight workers take one job each at once, then one takes a batch of three
        singles = await asyncio.gather(*(store.claim("ep", f"w{i}", 1) for i in range(8)))
        assert all(len(rows) == 1 for rows in singles), [len(r) for r in singles]
        batch = await store.claim("ep", "wb", 3)
        assert len(batch) == 3
        got = [r.id for rows in singles for r in rows] + [r.id for r in batch]
        assert len(set(got)) == 11 and set(got) <= set(ids)
        held = {}
        for i in range(8):
            held.update({r.id: f"w{i}" for r in await store.jobs_of_worker(f"w{i}")})
        assert sorted(held) == sorted(r.id for rows in singles for r in rows)  # nothing claimed unseen
        assert (await store.counts("ep"))["inQueue"] == 1
        await store.close()
    finally:
        await db.dispose()


async def test_unclaim_gives_a_job_back_as_if_never_taken(db_url):
    """A take whose worker was lost while its claim ran gives the jobs back (worker_protocol.take):
    queued again, the attempt not counted, and only the claiming worker's jobs are touched."""
    from sqlalchemy import select

    from dstack.serverless.models import ServerlessJobModel

    jobs = ServerlessJobModel.__table__
    db = Database(db_url)
    try:
        await seed_endpoint(db)
        store = Store(db)
        job_id = await store.submit("ep", '{"i": 1}', None, 60_000, 600_000, False)
        assert [r.id for r in await store.claim("ep", "lost", 1)] == [job_id]
        assert await store.unclaim("other", [job_id]) == []  # not its job
        assert await store.unclaim("lost", [job_id]) == [job_id]
        async with db.session() as s:
            row = (await s.execute(select(jobs.c.status, jobs.c.worker_id, jobs.c.attempts))).one()
        assert tuple(row) == ("IN_QUEUE", None, 0)
        assert [r.id for r in await store.claim("ep", "next", 1)] == [job_id]  # the next take gets it
        await store.close()
    finally:
        await db.dispose()
