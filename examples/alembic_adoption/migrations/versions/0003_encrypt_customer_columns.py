"""Encrypt the personal columns of customers, each row under its tenant's keys.

email becomes deterministic so that the application can still look
customers up by email, and the unique constraint on (tenant_id, email)
keeps working. The other columns are randomized. The downgrade decrypts
them back into their original types.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa

from alembic_ext import op  # alembic.op, typed for the encryption operations
from sqlalchemy_encrypted import DeterministicEncrypted, Encrypted

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# (column, plaintext type before, encrypted type after); the encrypted types
# must match the application's model exactly, here models.Customer.
COLUMNS = [
    ("name", sa.String(200), Encrypted(sa.String(200))),
    ("email", sa.String(254), DeterministicEncrypted(sa.String(254))),
    ("phone", sa.String(40), Encrypted(sa.String(40))),
    ("birth_date", sa.Date(), Encrypted(sa.Date())),
]


def upgrade() -> None:
    # Each operation logs its counts on sqlalchemy_encrypted.audit, for example
    # "customers.phone: encrypted 4, already encrypted 0, NULL 2".
    for column, plaintext_type, encrypted_type in COLUMNS:
        op.encrypt_column(
            "customers",
            column,
            type_=encrypted_type,
            existing_type=plaintext_type,
            tenant_column="tenant_id",
        )


def downgrade() -> None:
    for column, plaintext_type, encrypted_type in reversed(COLUMNS):
        op.decrypt_column(
            "customers",
            column,
            type_=plaintext_type,
            from_type=encrypted_type,
            tenant_column="tenant_id",
        )
