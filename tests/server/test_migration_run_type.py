"""Migration 0007 fills `runs.run_type` from each stored run_spec, on SQLite and PostgreSQL: a
database from before the column reads the same types the code used to derive from the JSON."""

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Connection

from dstack.core.models.runs import RunType
from dstack.server.db import Database
from dstack.server.migrate import alembic_config, upgrade
from dstack.server.models import RunModel
from tests.conftest import _database_url

BEFORE = "0006_gateway_token_encrypted"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres" and not os.environ.get("DSTACK_TEST_POSTGRES"):
        pytest.skip("needs PostgreSQL: set DSTACK_TEST_POSTGRES (.ci/run does)")
    url = _database_url(tmp_path, request.param)
    return (
        url.replace("postgresql://", "postgresql+asyncpg://", 1) if url else f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    )


def _spec(conf_type: str | None) -> str:
    conf: dict = {"commands": ["true"]} if conf_type is None else {"type": conf_type, "commands": ["true"]}
    return json.dumps({"run_name": "r", "configuration": conf})


#: run_spec as stored -> the run_type the migration must give it
ROWS = {
    "a-task": (_spec("task"), "task"),
    "a-service": (_spec("service"), "service"),
    "a-serverless": (_spec("serverless"), "serverless"),
    "a-dev": (_spec("dev-environment"), "dev-environment"),
    "no-type": (_spec(None), "task"),
    "unknown-type": (_spec("fleet"), "task"),
    "not-json": ("{not json", "task"),
    "no-configuration": ("{}", "task"),
}


async def test_backfill_from_run_spec(db_url: str) -> None:
    db = Database(db_url)
    try:

        def to_before(conn: Connection) -> None:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, BEFORE)

        async with db.engine.begin() as conn:
            await conn.run_sync(to_before)
            now = datetime.now(UTC)
            await conn.execute(
                sa.text(
                    "INSERT INTO users (id, name, token_hash, global_role, active, created_at)"
                    " VALUES ('u', 'admin', 'h', 'admin', true, :now)"
                ),
                {"now": now},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO projects (id, name, owner_id, created_at, deleted) VALUES ('p', 'main', 'u', :now, false)"
                ),
                {"now": now},
            )
            # more rows than one page of the backfill: the paging must reach them all
            names = list(ROWS) + [f"svc-{i:04d}" for i in range(600)]
            await conn.execute(
                sa.text(
                    "INSERT INTO runs (id, project_id, user_id, run_name, submitted_at, last_processed_at, status,"
                    " run_spec, desired_replica_count, resubmission_attempt, deleted)"
                    " VALUES (:id, 'p', 'u', :name, :now, :now, 'done', :spec, 1, 0, false)"
                ),
                [
                    {"id": name, "name": name, "now": now, "spec": ROWS[name][0] if name in ROWS else _spec("service")}
                    for name in names
                ],
            )
        await upgrade(db)
        async with db.session() as session:
            got = dict((await session.execute(sa.select(RunModel.run_name, RunModel.run_type))).all())
        assert all(isinstance(t, RunType) for t in got.values())
        assert {name: got[name].value for name in ROWS} == {name: want for name, (_, want) in ROWS.items()}
        assert all(got[f"svc-{i:04d}"] is RunType.SERVICE for i in range(600))
    finally:
        await db.dispose()
