"""volume hosts: where a fleet (`backend: ssh`) volume lives, and whether its size is enforced

Revision ID: 0011_volume_hosts
Revises: 0010_volumes
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_volume_hosts"
down_revision = "0010_volumes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("volumes") as batch:
        batch.add_column(sa.Column("region", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("size_enforced", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("volumes") as batch:
        batch.drop_column("size_enforced")
        batch.drop_column("host")
        batch.drop_column("region")
