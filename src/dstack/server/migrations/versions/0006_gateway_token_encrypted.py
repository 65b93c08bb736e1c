"""gateway tokens are stored encrypted: the column holds `enc:v1:<fernet token>` (longer than 100)

Revision ID: 0006_gateway_token_encrypted
Revises: 0005_serverless_past_workers
"""
from alembic import op
import sqlalchemy as sa


revision = '0006_gateway_token_encrypted'
down_revision = '0005_serverless_past_workers'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('gateways') as batch:
        batch.alter_column('token', existing_type=sa.String(length=100), type_=sa.Text(), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('gateways') as batch:
        batch.alter_column('token', existing_type=sa.Text(), type_=sa.String(length=100), existing_nullable=False)
