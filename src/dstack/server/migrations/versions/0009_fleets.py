"""fleets: SSH fleets and their hosts (next to their `instances` rows)

Revision ID: 0009_fleets
Revises: 0008_secrets_and_job_metrics
"""
from alembic import op
import sqlalchemy as sa


revision = '0009_fleets'
down_revision = '0008_secrets_and_job_metrics'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('fleets',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('spec', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_fleets_project_name', 'fleets', ['project_id', 'name'])
    op.create_table('fleet_instances',
    sa.Column('instance_id', sa.String(length=36), nullable=False),
    sa.Column('fleet_id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('instance_num', sa.Integer(), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=False),
    sa.Column('internal_ip', sa.String(length=64), nullable=True),
    sa.Column('ssh', sa.Text(), nullable=False),
    sa.Column('status_message', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['fleet_id'], ['fleets.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('instance_id'),
    )
    op.create_index('ix_fleet_instances_fleet', 'fleet_instances', ['fleet_id'])


def downgrade() -> None:
    op.drop_index('ix_fleet_instances_fleet', table_name='fleet_instances')
    op.drop_table('fleet_instances')
    op.drop_index('ix_fleets_project_name', table_name='fleets')
    op.drop_table('fleets')
