"""serverless jobs remember the workers they were requeued away from

Revision ID: 0005_serverless_past_workers
Revises: 0004_row_versions
"""
from alembic import op
import sqlalchemy as sa


revision = '0005_serverless_past_workers'
down_revision = '0004_row_versions'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('serverless_jobs') as batch:
        batch.add_column(sa.Column('past_workers', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('serverless_jobs') as batch:
        batch.drop_column('past_workers')
