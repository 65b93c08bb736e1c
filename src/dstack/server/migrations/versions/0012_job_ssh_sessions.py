"""job ssh sessions: when a dev environment's last SSH session opened and closed, so its
`inactivity_duration` count survives a server restart

Revision ID: 0012_job_ssh_sessions
Revises: 0011_volume_hosts
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_job_ssh_sessions"
down_revision = "0011_volume_hosts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("ssh_opened_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("ssh_closed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("ssh_closed_at")
        batch.drop_column("ssh_opened_at")
