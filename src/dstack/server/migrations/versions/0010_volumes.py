"""volumes: a project's named volumes (`type: volume`)

Revision ID: 0010_volumes
Revises: 0009_fleets
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_volumes"
down_revision = "0009_fleets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("size_gb", sa.Float(), nullable=True),
        sa.Column("external_path", sa.Text(), nullable=True),
        sa.Column("shared", sa.Boolean(), nullable=False),
        sa.Column("configuration", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "name", name="uq_volumes_project_name"),
    )


def downgrade() -> None:
    op.drop_table("volumes")
