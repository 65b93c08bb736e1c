"""Alembic environment: runs on the connection the server hands it (see dstack.server.migrate)."""

from alembic import context

from dstack.server import models  # noqa: F401  (registers tables)
from dstack.server.db import Base
from dstack.server.gateways import models as _gateway_models  # noqa: F401

try:  # optional parts register their tables too
    from dstack.serverless import models as _serverless_models  # noqa: F401
except ImportError:
    pass

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
