"""Apply Alembic migrations at start, on SQLite or PostgreSQL."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from dstack.server.db import Database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


async def upgrade(db: Database) -> None:
    def _run(sync_conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "head")

    async with db.engine.begin() as conn:
        if not db.is_sqlite:
            # Several server replicas may start at once: one migrates, the others wait.
            await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7231991)")
        await conn.run_sync(_run)


async def autogenerate(db: Database, message: str, rev_id: str) -> None:
    """Developer helper: write a new revision from the models' difference to the database."""

    def _run(sync_conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = sync_conn
        command.revision(cfg, message=message, autogenerate=True, rev_id=rev_id)

    async with db.engine.begin() as conn:
        await conn.run_sync(_run)
