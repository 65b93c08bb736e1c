"""secrets (project-scoped, values encrypted) and job_metrics_points (agents' usage samples)

Revision ID: 0008_secrets_and_job_metrics
Revises: 0007_run_type
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_secrets_and_job_metrics"
down_revision = "0007_run_type"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "name", name="uq_secrets_project_name"),
    )
    op.create_table(
        "job_metrics_points",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("timestamp", sa.Float(), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.Column("cpu_seconds", sa.Float(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("gpus", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_metrics_points_job_ts", "job_metrics_points", ["job_id", "timestamp"])
    op.create_index("ix_job_metrics_points_ts", "job_metrics_points", ["timestamp"])


def downgrade() -> None:
    op.drop_index("ix_job_metrics_points_ts", table_name="job_metrics_points")
    op.drop_index("ix_job_metrics_points_job_ts", table_name="job_metrics_points")
    op.drop_table("job_metrics_points")
    op.drop_table("secrets")
