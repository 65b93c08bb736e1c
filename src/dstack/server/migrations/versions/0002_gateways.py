"""gateways

Revision ID: 0002_gateways
Revises: 0001_initial
"""
from alembic import op
import sqlalchemy as sa


revision = '0002_gateways'
down_revision = '0001_initial'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('gateways',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('backend', sa.String(length=30), nullable=False),
    sa.Column('region', sa.String(length=50), nullable=False),
    sa.Column('domain', sa.String(length=253), nullable=False),
    sa.Column('host', sa.String(length=100), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('tls_cert', sa.Text(), nullable=True),
    sa.Column('tls_key', sa.Text(), nullable=True),
    sa.Column('default', sa.Boolean(), nullable=False),
    sa.Column('token', sa.String(length=100), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('server_url', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('status_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'name', name='uq_gateways_project_name'),
    sa.UniqueConstraint('token')
    )


def downgrade() -> None:
    op.drop_table('gateways')
