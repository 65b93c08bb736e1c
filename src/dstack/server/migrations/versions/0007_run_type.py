"""runs.run_type: the configuration's type as a column, filled for older rows from run_spec's JSON

Revision ID: 0007_run_type
Revises: 0006_gateway_token_encrypted
"""
import json

import sqlalchemy as sa
from alembic import op

revision = '0007_run_type'
down_revision = '0006_gateway_token_encrypted'
branch_labels = None
depends_on = None

#: the types a stored run_spec may name (dstack.core.models.runs.RunType); anything else reads as task,
#: as the code that derived the type from run_spec did
_TYPES = ('task', 'service', 'serverless', 'dev-environment')


def upgrade() -> None:
    # Added NOT NULL with a default (SQLite adds such a column in place, no table copy).
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('run_type', sa.String(length=20), server_default='task', nullable=False))
    # Filled in Python, a page at a time: the same on SQLite and PostgreSQL, and a row whose
    # run_spec does not parse keeps 'task' instead of failing the whole upgrade.
    conn = op.get_bind()
    page = sa.text('SELECT id, run_spec FROM runs WHERE id > :after ORDER BY id LIMIT 500')
    update = sa.text('UPDATE runs SET run_type = :run_type WHERE id = :id')
    after = ''
    while True:
        rows = conn.execute(page, {'after': after}).all()
        if not rows:
            break
        changes = [{'id': row_id, 'run_type': t} for row_id, spec in rows if (t := _type_of(spec)) != 'task']
        if changes:
            conn.execute(update, changes)
        after = rows[-1][0]


def _type_of(run_spec: str | None) -> str:
    try:
        kind = json.loads(run_spec or '')['configuration']['type']
    except (ValueError, TypeError, KeyError):
        return 'task'
    return kind if kind in _TYPES else 'task'


def downgrade() -> None:
    with op.batch_alter_table('runs') as batch:
        batch.drop_column('run_type')
