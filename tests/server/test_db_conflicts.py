"""`retry_on_conflict` on a real PostgreSQL: a transaction the database aborts for a deadlock with a
concurrent writer runs again instead of failing the request (a user's `dstack stop` got a 500
this way, aborting a run the pipeline was processing)."""

from __future__ import annotations

import asyncio
import os

import pytest
from sqlalchemy import text

from dstack.server.db import Database, retry_on_conflict
from tests.pg import fresh_database

pytestmark = pytest.mark.skipif(
    not os.environ.get("DSTACK_TEST_POSTGRES"),
    reason="needs PostgreSQL: DSTACK_TEST_POSTGRES (a server URL); .ci/run starts one",
)


def test_a_deadlock_victim_runs_again_and_commits() -> None:
    url = fresh_database(os.environ["DSTACK_TEST_POSTGRES"])
    db = Database("postgresql+asyncpg://" + url.split("://", 1)[1])

    async def scenario() -> tuple[int, list[tuple[int, str]]]:
        async with db.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE rows (id int PRIMARY KEY, value text)"))
            await conn.execute(text("INSERT INTO rows VALUES (1, 'start'), (2, 'start')"))
        holds_2 = asyncio.Event()
        holds_1 = asyncio.Event()
        attempts = 0

        async def other_writer() -> None:  # locks row 2, then wants row 1
            async with db.session() as s:
                await s.execute(text("UPDATE rows SET value = 'other' WHERE id = 2"))
                holds_2.set()
                await holds_1.wait()
                await asyncio.sleep(0.3)  # the retried writer waits first: it is the deadlock's victim
                await s.execute(text("UPDATE rows SET value = 'other' WHERE id = 1"))
                await s.commit()

        async def retried_writer() -> None:  # locks row 1, then wants row 2
            await holds_2.wait()
            async with db.session() as s:

                async def work() -> None:
                    nonlocal attempts
                    attempts += 1
                    await s.execute(text("UPDATE rows SET value = 'mine' WHERE id = 1"))
                    holds_1.set()
                    await s.execute(text("UPDATE rows SET value = 'mine' WHERE id = 2"))
                    await s.commit()

                await retry_on_conflict(s, work)

        await asyncio.wait_for(asyncio.gather(other_writer(), retried_writer()), 30)
        async with db.session() as s:
            rows = [(r[0], r[1]) for r in (await s.execute(text("SELECT id, value FROM rows ORDER BY id")))]
        await db.dispose()
        return attempts, rows

    attempts, rows = asyncio.run(scenario())
    assert attempts == 2  # aborted once by PostgreSQL's deadlock detector, then committed
    assert rows == [(1, "mine"), (2, "mine")]
