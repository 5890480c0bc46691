"""Create the customers table, with personal data in plaintext.

This is the schema of the application before it adopted encryption.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("phone", sa.String(40)),
        sa.Column("birth_date", sa.Date),
        sa.Column("signed_up_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_customers_tenant_id", "customers", ["tenant_id"])
    op.create_index("uq_customers_tenant_email", "customers", ["tenant_id", "email"], unique=True)


def downgrade() -> None:
    op.drop_table("customers")
