"""file archives: `files:` uploaded by dstack's official client, stored once per user and hash

Revision ID: 0013_file_archives
Revises: 0012_job_ssh_sessions
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_file_archives"
down_revision = "0012_job_ssh_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "file_archives",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column("user_id", sa.String(length=36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("blob_hash", sa.String(length=64), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.UniqueConstraint("user_id", "blob_hash"),
    )


def downgrade() -> None:
    op.drop_table("file_archives")
