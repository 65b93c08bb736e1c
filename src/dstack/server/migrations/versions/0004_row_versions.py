"""row versions on runs and jobs (optimistic concurrency)

Revision ID: 0004_row_versions
Revises: 0003_serverless
"""
from alembic import op
import sqlalchemy as sa


revision = '0004_row_versions'
down_revision = '0003_serverless'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('runs', 'jobs'):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('version', sa.Integer(), server_default='1', nullable=False))


def downgrade() -> None:
    for table in ('runs', 'jobs'):
        with op.batch_alter_table(table) as batch:
            batch.drop_column('version')
